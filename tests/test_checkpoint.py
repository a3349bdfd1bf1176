"""Tests for opdplus_jax.checkpoint: round trip, retention, resharding, crash/damage recovery."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from opdplus_jax import checkpoint

LOGGER = "opdplus_jax.checkpoint"


def make_state(step: int):
    """A realistic training state whose values depend on `step`."""
    k = jax.random.key(step)
    params = {
        "embed": {"table": jax.random.normal(k, (16, 8), jnp.bfloat16)},
        "layers": {
            "w": jax.random.normal(jax.random.fold_in(k, 1), (2, 8, 8), jnp.float32),
            "b": jnp.full((2, 8), step, jnp.float32),
        },
        "ids": jnp.arange(5, dtype=jnp.int32) + step,
    }
    opt = optax.adamw(1e-3)
    opt_state = opt.init(params)
    grads = jax.tree.map(
        lambda p: jnp.ones_like(p) if jnp.issubdtype(p.dtype, jnp.floating) else p, params
    )
    for _ in range(step + 1):  # non-trivial moments and count
        _, opt_state = opt.update(grads, opt_state, params)
    rng = jax.random.key(1000 + step)
    data_state = {"epoch": 0, "position": 7 * step, "iterator": {"seed": 3, "ids": [1, 2, step]}}
    metadata = {"step": step, "config": {"lr": 1e-3, "name": "tiny"}, "loss": 0.5 / (step + 1)}
    return params, opt_state, rng, data_state, metadata


def save_state(mgr, step: int, **kwargs):
    params, opt_state, rng, data_state, metadata = make_state(step)
    mgr.save(
        step,
        params=params,
        opt_state=opt_state,
        rng=rng,
        data_state=data_state,
        metadata=metadata,
        **kwargs,
    )


def templates(abstract: bool = False):
    params, opt_state, rng, _, _ = make_state(0)
    if abstract:
        return jax.eval_shape(lambda: (params, opt_state, rng))
    return params, opt_state, rng


def assert_state_equals(restored, step: int):
    params, opt_state, rng, data_state, metadata = make_state(step)
    assert restored.step == step
    chex.assert_trees_all_equal(restored.params, params)
    chex.assert_trees_all_equal(restored.opt_state, opt_state)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)
    assert restored.rng.dtype == rng.dtype
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    assert restored.data_state == data_state
    assert restored.metadata == metadata


def restore(mgr, abstract: bool = False):
    params, opt_state, rng = templates(abstract)
    return mgr.restore_latest(params=params, opt_state=opt_state, rng=rng)


@pytest.mark.parametrize("abstract", [False, True], ids=["arrays", "shape_dtype_structs"])
def test_round_trip_exact(tmp_path, abstract):
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as mgr:
        assert mgr.latest_step() is None
        assert restore(mgr) is None
        save_state(mgr, 3)
        assert mgr.all_steps() == [3] and mgr.latest_step() == 3
    with checkpoint.CheckpointManager(tmp_path / "ckpt") as mgr:  # a fresh process would do this
        restored = restore(mgr, abstract)
        assert_state_equals(restored, 3)
        # A continued rng stream is the same as the uninterrupted one.
        _, _, rng, _, _ = make_state(3)
        np.testing.assert_array_equal(
            jax.random.normal(restored.rng, (4,)), jax.random.normal(rng, (4,))
        )
        only_params = mgr.restore(3, params=templates()[0])
        chex.assert_trees_all_equal(only_params.params, make_state(3)[0])
        assert only_params.opt_state is None and only_params.rng is None


def test_nnx_state_round_trip_and_async(tmp_path):
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    _, params = nnx.split(model, nnx.Param)
    opt_state = optax.sgd(0.1).init(params)  # no arrays at all: saved as an empty item
    with checkpoint.CheckpointManager(tmp_path, async_save=True) as mgr:
        expected = jax.tree.map(np.array, params)
        mgr.save(1, params=params, opt_state=opt_state, rng=jax.random.key(0), data_state={})
        # An async save has copied the arrays when it returns: the trainer may donate them.
        jax.tree.map(lambda x: x.delete(), params)
        mgr.wait()
        assert mgr.all_steps() == [1]
        _, abstract = nnx.split(
            nnx.eval_shape(lambda: nnx.Linear(4, 3, rngs=nnx.Rngs(1))), nnx.Param
        )
        restored = mgr.restore_latest(params=abstract, opt_state=opt_state, rng=jax.random.key(5))
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, restored.params), expected)
    assert jax.tree.structure(restored.opt_state) == jax.tree.structure(opt_state)
    assert restored.data_state == {} and restored.metadata == {}


def test_keep_last_two_and_existing_step(tmp_path, caplog):
    with checkpoint.CheckpointManager(tmp_path, keep=2) as mgr:
        for step in (1, 2, 3, 4):
            save_state(mgr, step)
        assert mgr.all_steps() == [3, 4]
        assert sorted(os.listdir(tmp_path)) == ["3", "4"]
        # Saving an existing step again keeps the stored one unless forced.
        params, opt_state, rng, _, _ = make_state(4)
        assert not mgr.save(4, params=params, opt_state=opt_state, rng=rng, data_state={"new": 1})
        assert restore(mgr).data_state == make_state(4)[3]
        assert mgr.save(
            4, params=params, opt_state=opt_state, rng=rng, data_state={"new": 1}, force=True
        )
        assert restore(mgr).data_state == {"new": 1}
        assert mgr.all_steps() == [3, 4]


def test_json_conversion_and_errors(tmp_path):
    params, opt_state, rng, _, _ = make_state(1)
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(
            1,
            params=params,
            opt_state=opt_state,
            rng=rng,
            data_state={"pos": np.int64(5), "ids": (1, 2), "loss": jnp.float32(0.5)},
            metadata={"config": ml_collections.ConfigDict({"lr": 0.1, "model": {"layers": 2}})},
        )
        restored = restore(mgr)
        assert restored.data_state == {"pos": 5, "ids": [1, 2], "loss": 0.5}
        assert restored.metadata == {"config": {"lr": 0.1, "model": {"layers": 2}}}
        with pytest.raises(TypeError, match="data_state/bad"):
            mgr.save(2, params=params, opt_state=opt_state, rng=rng, data_state={"bad": object()})
        assert mgr.all_steps() == [1]


def test_restore_onto_a_different_mesh(tmp_path):
    mesh8 = jax.make_mesh((8,), ("fsdp",))
    mesh42 = jax.make_mesh((4, 2), ("data", "fsdp"))
    w = jnp.arange(16 * 6, dtype=jnp.float32).reshape(16, 6)
    b = jnp.arange(8, dtype=jnp.bfloat16)
    params = {
        "w": jax.device_put(w, NamedSharding(mesh8, P("fsdp", None))),
        "b": jax.device_put(b, NamedSharding(mesh8, P("fsdp"))),
    }
    opt_state = optax.adamw(1e-2).init(params)
    rng = jax.device_put(jax.random.key(7), NamedSharding(mesh8, P()))
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(5, params=params, opt_state=opt_state, rng=rng, data_state={"i": 1})

    def target(x, spec):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh42, spec))

    params_t = {"w": target(w, P("data", "fsdp")), "b": target(b, P(("data", "fsdp")))}
    opt_t = jax.eval_shape(optax.adamw(1e-2).init, params_t)
    opt_t = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh42, P())), opt_t
    )
    rng_t = jax.ShapeDtypeStruct((), rng.dtype, sharding=NamedSharding(mesh42, P()))
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        restored = mgr.restore_latest(params=params_t, opt_state=opt_t, rng=rng_t)
    chex.assert_trees_all_equal(restored.params, {"w": w, "b": b})
    chex.assert_trees_all_equal(restored.opt_state, opt_state)
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params_t), strict=True):
        assert got.sharding == want.sharding
        assert got.dtype == want.dtype
    assert restored.params["w"].addressable_shards[0].data.shape == (4, 3)
    assert restored.rng.sharding == rng_t.sharding
    np.testing.assert_array_equal(
        jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(7))
    )


def test_sigkill_during_save_falls_back_to_complete_step(tmp_path, caplog):
    directory = tmp_path / "ckpt"
    worker = Path(__file__).with_name("checkpoint_kill_worker.py")
    root = str(worker.parent.parent)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    )
    proc = subprocess.run(
        [sys.executable, str(worker), str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert "SAVING" in proc.stdout, proc.stderr[-3000:]
    sys.path.insert(0, str(worker.parent))
    try:
        import checkpoint_kill_worker as w
    finally:
        sys.path.pop(0)
    params, opt_state, rng = w.small_state(0)
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        checkpoint.CheckpointManager(directory) as mgr,
    ):
        if "COMPLETED" in proc.stdout:  # the kill came too late: step 2 must then be whole
            restored = mgr.restore_latest(params=w.big_params(), opt_state=opt_state, rng=rng)
            assert restored.step == 2
            chex.assert_trees_all_equal(restored.params, w.big_params())
            return
        assert mgr.all_steps() == [1]
        restored = mgr.restore_latest(params=params, opt_state=opt_state, rng=rng)
        assert any(
            "step 2" in r.getMessage() and "never finalised" in r.getMessage()
            for r in caplog.records
        )
        expected = w.small_state(1)
        assert restored.step == 1
        chex.assert_trees_all_equal(restored.params, expected[0])
        chex.assert_trees_all_equal(restored.opt_state, expected[1])
        np.testing.assert_array_equal(
            jax.random.key_data(restored.rng), jax.random.key_data(expected[2])
        )
        assert restored.data_state == {"step": 1}
        # Training resumes and saves step 2 again.
        mgr.save(2, params=params, opt_state=opt_state, rng=rng, data_state={"step": 2})
        assert mgr.all_steps() == [1, 2]
        assert sorted(p.name for p in directory.iterdir()) == ["1", "2"]


def _damage_latest(directory: Path, how: str) -> None:
    step = directory / "2"
    if how == "array_files":  # every data file of the params item
        files = [p for p in (step / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
        assert files
        for f in files:
            f.unlink()
    elif how == "truncated":
        files = [p for p in (step / "params").rglob("*") if p.is_file() and p.parent.name == "d"]
        for f in files:
            f.write_bytes(f.read_bytes()[:8])
    elif how == "array_metadata":
        (step / "opt_state" / "_METADATA").unlink()
    elif how == "json":
        (step / "data_state" / "metadata").write_text('{"epoch": ')
    elif how == "empty_dir":
        for p in sorted(step.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
    else:
        raise ValueError(how)


# A failing orbax restore can leave tensorstore callbacks aimed at its closed event loop.
unraisable_ok = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@unraisable_ok
@pytest.mark.parametrize("how", ["array_files", "truncated", "array_metadata", "json", "empty_dir"])
def test_damaged_latest_step_falls_back(tmp_path, caplog, how):
    with checkpoint.CheckpointManager(tmp_path, keep=5) as mgr:
        save_state(mgr, 1)
        save_state(mgr, 2)
    _damage_latest(tmp_path, how)
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        checkpoint.CheckpointManager(tmp_path, keep=5) as mgr,
    ):
        restored = restore(mgr)
        assert_state_equals(restored, 1)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("step 2" in m and "unusable" in m for m in warnings), warnings
        # The damaged step is moved aside, so steps after the restored one are saved again.
        assert mgr.all_steps() == [1]
        assert any(p.name.startswith("2.corrupt-") for p in tmp_path.iterdir())
        save_state(mgr, 2)
        assert mgr.all_steps() == [1, 2]
        assert_state_equals(restore(mgr), 2)


@unraisable_ok
def test_all_steps_damaged_returns_none(tmp_path, caplog):
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        save_state(mgr, 2)
    _damage_latest(tmp_path, "array_files")
    with (
        caplog.at_level(logging.WARNING, logger=LOGGER),
        checkpoint.CheckpointManager(tmp_path) as mgr,
    ):
        assert restore(mgr) is None
    assert any("step 2" in r.getMessage() for r in caplog.records)


def test_template_mismatch_is_a_clear_error(tmp_path):
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        save_state(mgr, 1)
        params, opt_state, rng = templates()
        bigger = dict(params, embed={"table": jnp.zeros((32, 8), jnp.bfloat16)})
        with pytest.raises(
            checkpoint.CheckpointMismatchError, match=r"params/embed/table.*\(16, 8\).*\(32, 8\)"
        ):
            mgr.restore_latest(params=bigger, opt_state=opt_state, rng=rng)
        extra = dict(params, head=jnp.zeros((3,)))
        with pytest.raises(checkpoint.CheckpointMismatchError, match="head"):
            mgr.restore_latest(params=extra, opt_state=opt_state, rng=rng)
        with pytest.raises(checkpoint.CheckpointMismatchError, match="opt_state"):
            mgr.restore_latest(
                params=params, opt_state=optax.adam(1e-3).init({"x": jnp.zeros(2)}), rng=rng
            )
        with pytest.raises(checkpoint.CheckpointMismatchError, match="rng"):
            mgr.restore_latest(
                params=params, opt_state=opt_state, rng=jax.random.key(0, impl="rbg")
            )
        # Caller errors in the templates raise before any step is read.
        with pytest.raises(TypeError, match="params/ids"):
            mgr.restore_latest(params=dict(params, ids=1.0), opt_state=opt_state, rng=rng)
        uneven = NamedSharding(jax.make_mesh((8,), ("fsdp",)), P("fsdp"))
        bad = dict(params, ids=jax.ShapeDtypeStruct((5,), jnp.int32, sharding=uneven))
        with pytest.raises(ValueError, match="params/ids"):
            mgr.restore_latest(params=bad, opt_state=opt_state, rng=rng)
        # Nothing was skipped or moved: the step is still there and restores with right templates.
        assert mgr.all_steps() == [1]
        assert_state_equals(restore(mgr), 1)


def test_dtype_follows_template(tmp_path):
    params = {"w": jnp.linspace(0, 1, 6, dtype=jnp.float32)}
    with checkpoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(1, params=params, opt_state=(), rng=jax.random.key(0), data_state={})
        restored = mgr.restore_latest(
            params={"w": jnp.zeros((6,), jnp.bfloat16)}, opt_state=(), rng=None
        )
    assert restored.params["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(restored.params["w"], params["w"].astype(jnp.bfloat16))
