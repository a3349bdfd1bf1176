"""Training checkpoints: params, optimizer state, RNG key, data-iterator state and metadata.

A thin layer over `orbax.checkpoint.CheckpointManager`. One step is one directory:

    <directory>/<step>/
        params/      orbax pytree (OCDBT/tensorstore), sharded arrays written per shard
        opt_state/   orbax pytree
        rng/         {"key_data": uint32 array}; typed keys are rebuilt with `wrap_key_data`
        data_state/  JSON (e.g. the grain iterator state)
        metadata/    JSON (config, metrics, anything the caller wants back)
        info/        JSON written by this module (step, rng impl, format version, time)

Robustness contract:

- orbax writes a step into `<step>.orbax-checkpoint-tmp*` and renames it when complete (on
  object stores it writes `commit_success.txt` last instead), so a save killed half-way leaves
  an unfinalised directory that is never listed as a step, and is removed when a manager
  opens the directory again.
- A finalised step whose files are damaged (deleted/truncated array files, unreadable JSON or
  metadata) fails to restore: `restore_latest` logs a warning naming the step and the reason,
  moves the step aside to `<step>.corrupt-<utc time>` (so that its number can be saved again
  and orbax does not skip later saves with a smaller step) and tries the next older step.
- A step whose tree structure or array shapes differ from the templates (e.g. the model size
  changed) raises `CheckpointMismatchError` naming the entry; it is never skipped silently.
  dtypes may differ: arrays are cast to the template dtype.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARRAY_ITEMS = ("params", "opt_state", "rng")
JSON_ITEMS = ("data_state", "metadata", "info")
CORRUPT_SUFFIX = ".corrupt-"


class CheckpointMismatchError(ValueError):
    """The stored checkpoint does not fit the templates (tree structure or array shape)."""


class RestoredState(NamedTuple):
    """What `CheckpointManager.restore_latest` / `restore` return."""

    step: int
    params: Any
    opt_state: Any
    rng: Any
    data_state: dict
    metadata: dict


# --------------------------------------------------------------------------------------------
# Helpers: JSON conversion, key paths, templates, RNG keys.
# --------------------------------------------------------------------------------------------


def _jsonable(obj: Any, where: str = "") -> Any:
    """Converts numpy/jax scalars and tuples to plain JSON types; names the offending entry."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if not isinstance(obj, Mapping) and callable(getattr(obj, "to_dict", None)):
        obj = obj.to_dict()  # e.g. ml_collections.ConfigDict
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON keys must be strings, got {k!r} at '{where}'")
            out[k] = _jsonable(v, f"{where}/{k}" if where else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.ndarray, np.generic, jax.Array)) and np.ndim(obj) == 0:
        return np.asarray(obj).item()
    if isinstance(obj, (np.ndarray, jax.Array)):
        return np.asarray(obj).tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__} at '{where or '<root>'}'")


def _key_str(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat_by_path(tree: Any) -> dict[str, Any]:
    """{'a/b/0': leaf} with dict keys, attribute names and sequence indices alike, so that a
    NamedTuple template and orbax's stored dict for it name their entries identically."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(_key_str(e) for e in path): leaf for path, leaf in leaves}


def _is_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _abstract(x: Any, where: str = "") -> jax.ShapeDtypeStruct:
    """Template leaf -> ShapeDtypeStruct carrying its sharding (a default one if it has none).

    Raises TypeError/ValueError for leaves that cannot be templates (caller errors, which must
    not be mistaken for a damaged checkpoint)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"template leaf '{where}' is a {type(x).__name__}, not an array/struct")
    sharding = getattr(x, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    try:
        sharding.shard_shape(tuple(x.shape))
    except Exception as e:
        raise ValueError(f"template leaf '{where}': {sharding} does not fit shape {x.shape}") from e
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _abstract_tree(tree: Any, name: str) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _abstract(x, "/".join([name, *(_key_str(e) for e in path)])), tree
    )


def _rng_key_data_template(rng: Any) -> Any:
    if not _is_key(rng):
        return _abstract(rng, "rng")
    shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(rng.shape, rng.dtype))
    # The key's sharding applies to its leading dims; the trailing key-data dim is replicated.
    sharding = getattr(rng, "sharding", None)
    return _abstract(jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding), "rng")


def _prepare_templates(params: Any, opt_state: Any, rng: Any) -> dict[str, Any]:
    """{item name: abstract tree} for the items to restore (None templates are left out)."""
    if params is None:
        raise ValueError("a params template is required")
    out = {"params": _abstract_tree(params, "params")}
    if opt_state is not None:
        out["opt_state"] = _abstract_tree(opt_state, "opt_state")
    if rng is not None:
        out["rng"] = {"key_data": _rng_key_data_template(rng)}
    return out


# --------------------------------------------------------------------------------------------
# Manager.
# --------------------------------------------------------------------------------------------


class CheckpointManager:
    """Saves and restores training state under `directory`, keeping the last `keep` steps.

    Args:
      directory: local path or a path orbax understands (e.g. gs://bucket/run/checkpoints).
      keep: number of most recent steps kept (None keeps all).
      async_save: write in a background thread (`save` returns after the device-to-host copy;
        call `wait()` before reading the files, `close()` at exit).
      read_only: never write, delete or clean up (e.g. an evaluator next to a running trainer).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None = 3,
        async_save: bool = False,
        read_only: bool = False,
    ):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        directory = os.fspath(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        self.read_only = read_only
        self._warn_unfinalised()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
        )
        handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in JSON_ITEMS})
        self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _warn_unfinalised(self) -> None:
        """Logs saves that never finalised (e.g. the process was killed while writing)."""
        try:
            names = ocp.step.tmp_checkpoints(self.directory) if self.directory.exists() else []
        except Exception as e:
            logger.warning("could not list unfinalised checkpoints in %s: %s", self.directory, e)
            return
        for name in sorted(names):
            match = re.match(r"\D*(\d+)", name)
            step = match.group(1) if match else "?"
            logger.warning(
                "checkpoint step %s in %s was never finalised (interrupted save: %s); "
                "ignoring%s it",
                step,
                self.directory,
                name,
                "" if self.read_only else " and removing",
            )

    # ---- listing -----------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalised steps, ascending (unfinalised/interrupted saves are never listed)."""
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---- saving ------------------------------------------------------------------------

    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any,
        rng: Any,
        data_state: Mapping[str, Any],
        metadata: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves one step. Returns whether a save was started.

        A step that already exists is kept (returns False) unless `force`, which replaces it.
        `data_state` and `metadata` must be JSON-serialisable (numpy scalars are converted).
        """
        if self.read_only:
            raise RuntimeError(f"checkpoint directory {self.directory} was opened read-only")
        step = int(step)
        data_state = _jsonable(dict(data_state), "data_state")
        metadata = _jsonable(dict(metadata or {}), "metadata")
        if step in self.all_steps():
            if not force:
                logger.info("checkpoint step %d already exists; not saving again", step)
                return False
            logger.info("replacing existing checkpoint step %d", step)
            self._mgr.wait_until_finished()
            self._mgr.delete(step)
        latest = self.latest_step()
        if latest is not None and step < latest:
            logger.warning("saving step %d below the latest saved step %d", step, latest)
        typed = _is_key(rng)
        info = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "rng_typed": typed,
            "rng_impl": str(jax.random.key_impl(rng)) if typed else None,
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        key_data = jax.random.key_data(rng) if typed else rng
        trees = {"params": params, "opt_state": opt_state, "rng": {"key_data": key_data}}
        # orbax refuses trees without arrays (e.g. the state of optax.sgd): record them instead.
        info["empty_items"] = [n for n, t in trees.items() if not jax.tree.leaves(t)]
        items = {n: ocp.args.StandardSave(t) for n, t in trees.items() if jax.tree.leaves(t)}
        args = ocp.args.Composite(
            **items,
            data_state=ocp.args.JsonSave(data_state),
            metadata=ocp.args.JsonSave(metadata),
            info=ocp.args.JsonSave(info),
        )
        # `force` here only bypasses orbax's save-interval policy: the caller decides when to save.
        return bool(self._mgr.save(step, args=args, force=True))

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are written and finalised."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- restoring ---------------------------------------------------------------------

    def restore_latest(
        self, *, params: Any, opt_state: Any = None, rng: Any = None
    ) -> RestoredState | None:
        """Restores the newest usable step onto the templates, or returns None if there is none.

        Templates are arrays or `jax.ShapeDtypeStruct`s (with `.sharding`); every restored array
        gets its template's sharding and dtype. `opt_state` / `rng` templates may be None to skip
        restoring them (the result then holds None). Damaged steps are skipped with a warning
        (and moved aside); a template mismatch raises `CheckpointMismatchError`.
        """
        abstract = _prepare_templates(params, opt_state, rng)  # caller errors raise here
        self._mgr.wait_until_finished()
        self._mgr.reload()
        for step in reversed(self.all_steps()):
            try:
                return self._restore(step, abstract, opt_state, rng)
            except CheckpointMismatchError:
                raise
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception as e:  # any read failure means a damaged step
                reason = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                logger.warning(
                    "checkpoint step %d in %s is unusable (%s); falling back to an older step",
                    step,
                    self.directory,
                    reason,
                )
                self._quarantine(step)
        return None

    def restore(
        self, step: int, *, params: Any, opt_state: Any = None, rng: Any = None
    ) -> RestoredState:
        """Restores one step (no fallback); see `restore_latest` for the template semantics."""
        return self._restore(int(step), _prepare_templates(params, opt_state, rng), opt_state, rng)

    def _restore(
        self, step: int, abstract: dict[str, Any], opt_state: Any, rng: Any
    ) -> RestoredState:
        self._mgr.wait_until_finished()
        info = self._mgr.restore(step, args=ocp.args.Composite(info=ocp.args.JsonRestore()))["info"]
        if not isinstance(info, dict) or info.get("step") != step:
            raise ValueError(f"unreadable or inconsistent info item: {info!r}")
        empty = set(info.get("empty_items", ()))
        stored = self._mgr.item_metadata(step)
        args, restored = {}, {}
        for name, template in abstract.items():
            if name in empty:
                _check_template(name, template, None)
                restored[name] = opt_state if name == "opt_state" else template
                continue
            _check_template(name, template, _stored_tree(stored, name))
            args[name] = ocp.args.StandardRestore(template)
        args["data_state"] = ocp.args.JsonRestore()
        args["metadata"] = ocp.args.JsonRestore()
        out = dict(self._mgr.restore(step, args=ocp.args.Composite(**args)))
        out.update(restored)
        for name in ("data_state", "metadata"):
            if not isinstance(out[name], dict):
                raise ValueError(f"unreadable {name} item: {out[name]!r}")
        restored_rng = None
        if rng is not None:
            restored_rng = _rebuild_rng(out["rng"]["key_data"], rng, info)
        return RestoredState(
            step=step,
            params=out["params"],
            opt_state=out["opt_state"] if opt_state is not None else None,
            rng=restored_rng,
            data_state=out["data_state"],
            metadata=out["metadata"],
        )

    def _quarantine(self, step: int) -> None:
        """Moves a damaged step out of orbax's view so its number (and later ones) can be saved."""
        if self.read_only:
            return
        if jax.process_index() == 0:
            src = self.directory / str(step)
            stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%f")
            dst = self.directory / f"{step}{CORRUPT_SUFFIX}{stamp}"
            try:
                src.rename(dst)
                logger.warning("moved damaged checkpoint step %d to %s", step, dst)
            except Exception as e:
                logger.warning("could not move damaged step %d aside (%s); deleting it", step, e)
                try:
                    self._mgr.delete(step)
                except Exception as e2:
                    logger.warning("could not delete damaged step %d either (%s)", step, e2)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"opdplus_jax.checkpoint.quarantine.{step}")
        self._mgr.reload()


def _stored_tree(stored: Any, name: str) -> Any:
    meta = stored[name] if stored is not None else None
    if meta is None:
        raise ValueError(f"no readable metadata for item '{name}'")
    return getattr(meta, "tree", meta)


def _check_template(name: str, template: Any, stored_tree: Any) -> None:
    """Raises CheckpointMismatchError naming the first entry whose structure or shape differs."""
    want = _flat_by_path(template)
    have = _flat_by_path(stored_tree)
    missing = sorted(set(want) - set(have))
    extra = sorted(set(have) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"in the template but not in the checkpoint: {missing[:5]}")
        if extra:
            parts.append(f"in the checkpoint but not in the template: {extra[:5]}")
        raise CheckpointMismatchError(f"'{name}' tree structure differs; " + "; ".join(parts))
    for path, leaf in want.items():
        stored_shape = tuple(getattr(have[path], "shape", ()) or ())
        shape = tuple(getattr(leaf, "shape", np.shape(leaf)))
        if stored_shape != shape:
            raise CheckpointMismatchError(
                f"'{name}/{path}': checkpoint has shape {stored_shape}, template has {shape}"
            )


def _rebuild_rng(key_data: jax.Array, template: Any, info: Mapping[str, Any]) -> jax.Array:
    if not _is_key(template):
        if info.get("rng_typed"):
            raise CheckpointMismatchError("'rng': checkpoint holds a typed key, template is raw")
        return key_data
    impl = info.get("rng_impl")
    if not info.get("rng_typed") or impl is None:
        raise CheckpointMismatchError("'rng': checkpoint holds raw key data, template is a key")
    probe = jax.eval_shape(
        lambda d: jax.random.wrap_key_data(d, impl=impl),
        jax.ShapeDtypeStruct(key_data.shape, jnp.uint32),
    )
    if probe.dtype != template.dtype:
        raise CheckpointMismatchError(
            f"'rng': checkpoint key impl {impl} ({probe.dtype}) != template {template.dtype}"
        )
    key = jax.random.wrap_key_data(key_data, impl=impl)
    sharding = getattr(template, "sharding", None)
    return jax.device_put(key, sharding) if sharding is not None else key
