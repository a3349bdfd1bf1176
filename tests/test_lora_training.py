"""LoRA students in the trainer (`config.lora`): only the adapters train, the optimizer state and
checkpoints hold only them, a resumed run equals an uninterrupted one, and the export merges the
adapters into weights that our loader and transformers read with the adapted model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdplus_jax import lora, models, sharding, train_step, trainer
from tests import tiny_run
from tests.test_model_io import torch_logits

LORA = {"lora.rank": 4, "lora.alpha": 8.0, "train.num_steps": 2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_run.build_assets(tmp_path_factory.mktemp("lora"))


def one_device():
    return sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])


def final_state(config, workdir):
    run = trainer.Trainer.setup(config, mesh=one_device())
    return run, run.restore_from(str(workdir))


def test_only_the_adapters_train_and_are_checkpointed(assets, tmp_path):
    config = tiny_run.config(assets, **LORA, **{"train.export_final": True})
    trainer.train_and_evaluate(config, str(tmp_path), mesh=one_device())
    run, state = final_state(config, tmp_path)
    start = run.init_state()
    adapters = lora.TRAINABLE
    # Base weights unchanged, adapters trained (B starts at 0).
    base_now = nnx.filter_state(state.params, nnx.Not(adapters))
    base_then = nnx.filter_state(start.params, nnx.Not(adapters))
    jax.tree.map(np.testing.assert_array_equal, base_now, base_then)
    now, then = (nnx.filter_state(s.params, adapters) for s in (state, start))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), now, then))
    assert max(moved) > 0
    # The optimizer state (Adam: two moments) covers the adapters only.
    count = lora.num_adapter_params(run.student)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * count, (moments, count)
    # The checkpoint holds the adapters: its params are the trainable part.
    trained = train_step.trainable_params(run.step_cfg, state.params)
    assert sum(x.size for x in jax.tree.leaves(trained)) == count
    # The export merges the adapters: our loader's logits equal the adapted student's.
    exported = models.from_pretrained(tmp_path / "export")
    assert not lora.is_adapted(exported)
    nnx.update(run.student, state.params)
    ids = jnp.asarray(np.random.default_rng(0).integers(4, 100, (2, 12)), jnp.int32)
    np.testing.assert_allclose(exported(ids), run.student(ids), atol=2e-5, rtol=0)
    # transformers reads the export with the same logits (via the reference interpreter).
    (theirs,) = torch_logits([(tmp_path / "export", np.asarray(ids))], tmp_path)
    np.testing.assert_allclose(theirs, np.asarray(run.student(ids)), atol=1e-4, rtol=0)


def test_a_resumed_lora_run_equals_an_uninterrupted_one(assets, tmp_path):
    once = tiny_run.config(assets, **LORA)
    trainer.train_and_evaluate(once, str(tmp_path / "once"), mesh=one_device())
    half = tiny_run.config(assets, **{**LORA, "train.num_steps": 1})
    trainer.train_and_evaluate(half, str(tmp_path / "twice"), mesh=one_device())
    trainer.train_and_evaluate(once, str(tmp_path / "twice"), mesh=one_device())
    _, a = final_state(once, tmp_path / "once")
    _, b = final_state(once, tmp_path / "twice")
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("lora.rank", 0, "rank"),
        ("lora.alpha", -1.0, "alpha"),
        ("lora.targets", ("q_proj",), "q_proj"),
    ],
)
def test_bad_lora_settings_are_refused_before_any_model_loads(assets, field, value, match):
    config = tiny_run.config(assets, **{field: value, "lora.rank": 4} if field != "lora.rank"
                             else {field: value})  # fmt: skip
    with pytest.raises(ValueError, match=match):
        trainer.validate(config)
