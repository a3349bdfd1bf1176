"""A named registry: the one way pluggable pieces (divergences, aggregations, ...) are looked up.

    AGGREGATIONS: Registry[AggregationFn] = Registry("aggregation")

    @AGGREGATIONS.register("token_sum")
    def token_sum(terms, fm, max_len):
        ...

    AGGREGATIONS.get("token_sum")      # the function
    AGGREGATIONS.get("token_summ")     # ValueError: unknown aggregation 'token_summ'; valid
                                       # names: token_sum; did you mean 'token_sum'?

An object with a `name` attribute (a class with a `name` class attribute, a dataclass row) can be
registered under that name without spelling it twice: `REG.register(obj)`, or `@REG.register`
on a class. Creating a Registry has no other side effect; entries are added by the modules that
define them (at their import) and by plug-ins or tests (`register` / `unregister`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Any, overload

__all__ = ["Registry"]


class Registry[T]:
    """Objects of one kind by unique name, with helpful errors for unknown names.

    Args:
      kind: what the registry holds, in the singular (e.g. "divergence"); used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    @overload
    def register(
        self, name: str, obj: None = None, *, overwrite: bool = False
    ) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, overwrite: bool = False) -> T: ...

    @overload
    def register(self, name: T, obj: None = None, *, overwrite: bool = False) -> T: ...

    def register(self, name: Any, obj: Any = None, *, overwrite: bool = False) -> Any:
        """Adds an object under a name; usable as a call or as a decorator.

        - `register("name", obj)` adds `obj` and returns it;
        - `@register("name")` decorates a function or class and adds it;
        - `register(obj)` / bare `@register` adds `obj` under `obj.name`.

        Raises:
          ValueError: the name is already taken (unless `overwrite=True`), or an object given
            without a name has no non-empty string attribute `name`.
        """
        if not isinstance(name, str):
            return self._add(_name_of(name, self.kind), name, overwrite)
        if obj is None:
            return lambda target: self._add(name, target, overwrite)
        return self._add(name, obj, overwrite)

    def _add(self, name: str, obj: T, overwrite: bool) -> T:
        if not name:
            raise ValueError(f"a {self.kind} needs a non-empty name to be registered")
        if name in self._entries and not overwrite:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered "
                "(pass overwrite=True to replace it)"
            )
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Removes `name` and returns its object; unknown names raise like `get`."""
        obj = self.get(name)
        del self._entries[name]
        return obj

    def get(self, name: str) -> T:
        """The object registered under `name`.

        Raises:
          ValueError: unknown name; the message lists the valid names and the closest one.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ValueError(self._unknown_message(name)) from None

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        try:
            return name in self._entries
        except TypeError:  # unhashable
            return False

    def __iter__(self) -> Iterator[str]:
        """Iterates over the sorted names (so a registry reads like the tuple of its names)."""
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"

    def _unknown_message(self, name: object) -> str:
        valid = self.names()
        message = f"unknown {self.kind} {name!r}; valid names: {', '.join(valid) or '(none)'}"
        if isinstance(name, str):
            close = difflib.get_close_matches(name, valid, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        return message


def _name_of(obj: object, kind: str) -> str:
    name = getattr(obj, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"cannot register {obj!r} as a {kind}: it has no non-empty string attribute `name`; "
            "pass the name explicitly, register(name, obj)"
        )
    return name
