"""Experiment configs shipped with the package: `default.get_config(preset)` presets, and
`apply_overrides` for dotted overrides of a locked config."""

from __future__ import annotations

from typing import Any

from ml_collections import config_dict


def get_field(config: config_dict.ConfigDict, dotted: str) -> Any:
    """The value of a dotted field (`"rollout.temperature"`); KeyError for a missing one."""
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def apply_overrides(config: config_dict.ConfigDict, overrides: dict[str, Any]) -> None:
    """Sets dotted fields (`{"train.num_steps": 20, "loss.tis_cap": None}`) of a locked config in
    place; None switches a feature off.

    A misspelt field or a value of the wrong type is a ValueError naming the field (and the
    closest valid name): the config is locked, so nothing new is created."""
    if not config.is_locked:
        raise ValueError("apply_overrides expects a locked config (call config.lock() first)")
    for dotted, value in overrides.items():
        parent, _, leaf = dotted.rpartition(".")
        try:
            node = get_field(config, parent) if parent else config
            current = node[leaf]
        except (KeyError, TypeError, AttributeError) as e:
            message = e.args[0] if e.args else e
            raise ValueError(f"config override {dotted}={value!r}: {message}") from None
        if isinstance(current, config_dict.ConfigDict):
            # A section is set field by field: {"rollout": {"temperature": 0.7}}.
            if not isinstance(value, dict | config_dict.ConfigDict):
                raise ValueError(
                    f"config override {dotted}={value!r}: {dotted} is a section; set its fields "
                    f"instead (e.g. {dotted}.<field>=...)"
                )
            for key in value:
                if not isinstance(key, str) or "." in key or not key:
                    raise ValueError(
                        f"config override {dotted}={value!r}: {key!r} is not a field name"
                    )
            apply_overrides(config, {f"{dotted}.{k}": v for k, v in dict(value).items()})
            continue
        try:
            node[leaf] = value
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            message = e.args[0] if e.args else e
            raise ValueError(f"config override {dotted}={value!r}: {message}") from None


OVERRIDE_PREFIX = "--config."


def split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the `--config.<field>=None` flags, the dotted fields they switch off).

    The command lines take these out of argv before absl parses it (ml-collections would read
    "None" as a string, or fail to convert it to a float) and pass the fields to
    `apply_overrides` as None once the config is loaded. Free of JAX, so that a command can call
    it before JAX starts."""
    kept, fields = [], []
    for arg in argv:
        name, eq, value = arg.partition("=")
        if name.startswith(OVERRIDE_PREFIX) and eq and value == "None":
            fields.append(name[len(OVERRIDE_PREFIX) :])
        else:
            kept.append(arg)
    return kept, fields
