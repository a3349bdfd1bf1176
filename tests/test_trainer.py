"""The OPD trainer end to end on tiny random models: learning, resuming, routing, bad input."""

import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opdplus_jax import (
    configs,
    metrics,
    models,
    optim,
    scoring,
    sharding,
    train_step,
    trainer,
)
from opdplus_jax.configs import default as default_config
from opdplus_jax.rollout import Rollout, SamplingParams, StaticEngine
from opdplus_jax.tasks import tokenizer as task_tokenizer
from tests import tiny_run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return tiny_run.build_assets(tmp_path_factory.mktemp("opd"))


_config = tiny_run.config
_model_config = tiny_run.model_config


def _one_device():
    return sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])


def _train(config, workdir):
    return trainer.train_and_evaluate(config, str(workdir), mesh=_one_device())


def _final_params(workdir, config):
    run = trainer.Trainer.setup(config, mesh=_one_device())
    with run.checkpoints(str(workdir)) as manager:
        step, state, _ = run.restore(manager, jax.random.key(0))
    return step, state


def test_opd_plus_reduces_the_divergence_to_the_teacher(assets, tmp_path):
    config = _config(assets, **{"train.num_steps": 8, "estimator.divergence": "jsd"})
    final = _train(config, tmp_path)
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 8]
    assert final["kl_per_token"] < 0.7 * evals[0]["kl_per_token"], evals
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in train)
    keys = ("kl_per_token", "grad_norm", "accuracy", "time/rollout", "time/update")
    for key in (*keys, "tokens_per_second", "verifier/calls"):
        assert key in train[0], key


def test_resume_gives_identical_parameters(assets, tmp_path):
    full = _config(assets)
    _train(full, tmp_path / "a")
    half = _config(assets, **{"train.num_steps": 2})
    _train(half, tmp_path / "b")
    _train(full, tmp_path / "b")  # resumes at step 2
    (step_a, a), (step_b, b) = (
        _final_params(tmp_path / "a", full),
        _final_params(tmp_path / "b", full),
    )
    assert step_a == step_b == 4
    chex.assert_trees_all_equal(a.step, b.step)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)
    rows = metrics.read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]
    # Evaluations: before training, at the end of the first (2-step) run, at the end.
    assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 2, 4]
    # The workdir records the config of the latest start and keeps the earlier one.
    with open(tmp_path / "b" / "config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 4
    with open(tmp_path / "b" / "config.1.json") as f:
        assert json.load(f)["train"]["num_steps"] == 2


def _rollout(run, seed=0, teacher=(0, 1, 0, 1)):
    prompts_batch = {
        "prompt_tokens": [[2, 5, 40 + i, 41, 3, 6] for i in range(4)],
        "teacher": np.array(teacher, np.int32),
    }
    rollout = run.rollout(run.init_state().params, prompts_batch, jax.random.key(seed))
    return jax.device_get(rollout)


def test_rollout_rows_are_prompt_major_with_ids(assets):
    run = trainer.Trainer.setup(_config(assets), mesh=_one_device())
    rollout = _rollout(run)
    n = run.config.rollout.num_samples
    assert isinstance(rollout, Rollout)
    chex.assert_shape([rollout.tokens, rollout.mask, rollout.behaviour_logp], (4 * n, 8))
    chex.assert_type([rollout.teacher, rollout.row_id, rollout.group_id], jnp.int32)
    np.testing.assert_array_equal(rollout.row_id, np.arange(4 * n))
    np.testing.assert_array_equal(rollout.group_id, np.repeat(np.arange(4), n))
    np.testing.assert_array_equal(rollout.teacher, np.repeat([0, 1, 0, 1], n))
    # Sampling at temperature 1 without truncation: behaviour and policy log-probs agree, and
    # the one scoring path reproduces them.
    np.testing.assert_allclose(rollout.behaviour_logp, rollout.policy_logp, atol=1e-5)
    params = run.init_state().params
    np.testing.assert_allclose(run.engine.score(params, rollout), rollout.policy_logp, atol=1e-4)


@pytest.mark.parametrize(
    ("layout", "memory"),
    [
        ({"fsdp": 8}, {}),
        # 2 microbatches of 1 row per device (4 rows, 2 prompt groups), logits in chunks of 3.
        ({"fsdp": 4, "tensor": 2}, {"memory.microbatch_rows": 1, "memory.logits_chunk": 3}),
        pytest.param({"data": 2, "fsdp": 4}, {}, marks=pytest.mark.slow),
    ],
)
def test_train_step_on_a_mesh_equals_one_device(assets, layout, memory):
    config = _config(assets)
    one = trainer.Trainer.setup(config, mesh=_one_device())
    many = trainer.Trainer.setup(_config(assets, **memory), mesh=sharding.make_mesh(layout))
    if memory:
        assert many.step_cfg.microbatch_rows == 4 and many.step_cfg.logits_chunk == 3
    rollout = _rollout(one)
    rollout = rollout.replace(teacher=np.zeros_like(rollout.teacher))
    results = []
    for run in (one, many):
        state, out = run.update(run.init_state(), jax.tree.map(jnp.asarray, rollout))
        results.append((jax.device_get(state.params), jax.device_get(out), state))
    chex.assert_trees_all_close(results[0][0], results[1][0], atol=2e-5, rtol=2e-5)
    for key in ("loss", "kl_per_token", "grad_norm"):
        np.testing.assert_allclose(results[0][1][key], results[1][1][key], rtol=1e-4, atol=1e-6)
    # The update really ran sharded: the updated weights are split across the devices.
    leaves = jax.tree.leaves(results[1][2].params)
    assert any(len({s.data.shape for s in x.addressable_shards} - {x.shape}) for x in leaves)


def _two_teachers(assets, **overrides):
    multi = _config(assets, **overrides).unlock()
    multi.teachers.second = default_config.teacher(str(assets / "teacher2"))
    return multi.lock()


def test_multi_teacher_routing_uses_each_rows_teacher(assets):
    run = trainer.Trainer.setup(_two_teachers(assets), mesh=_one_device())
    # Each teacher scores its static block: 2 prompts x 2 samples each, teacher 0's first.
    assert run.step_cfg.teacher_rows == (4, 4)
    rollout = _rollout(run, teacher=(0, 0, 1, 1))
    params = run.init_state().params
    routed, _ = train_step.score_rollout(run.step_cfg, params, run.frozen, rollout)
    for k in range(2):  # each teacher alone, applied to the whole batch
        path = str(assets / ("teacher" if k == 0 else "teacher2"))
        single = trainer.Trainer.setup(
            _config(assets, **{"teachers.default.path": path}), mesh=_one_device()
        )
        alone, _ = train_step.score_rollout(single.step_cfg, params, single.frozen, rollout)
        rows = rollout.teacher == k
        np.testing.assert_allclose(
            routed.advantages[rows], alone.advantages[rows], rtol=1e-5, atol=1e-6
        )
        assert not np.allclose(routed.advantages[~rows], alone.advantages[~rows])
    # The step routes rows by position: a rollout out of the blocks' order is refused.
    with pytest.raises(ValueError, match=r"teacher blocks of \(4, 4\) rows"):
        run.update(run.init_state(), _rollout(run, teacher=(0, 1, 0, 1)))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"data.batch_size": 3}, "data.batch_size=3 prompts do not split equally between the 2"),
        ({"teachers.default.prompts_per_batch": 3}, "set it for every teacher"),
    ],
)
def test_teacher_shares_must_fill_the_batch(assets, overrides, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        trainer.validate(_two_teachers(assets, **overrides))
    shares = _two_teachers(assets, **{"data.batch_size": 3})
    shares.teachers.default.prompts_per_batch = 1
    shares.teachers.second.prompts_per_batch = 2
    assert trainer.teacher_batch_sizes(shares) == (1, 2)
    shares.teachers.second.prompts_per_batch = 3
    with pytest.raises(ValueError, match=re.escape("sum to 4, not data.batch_size=3")):
        trainer.validate(shares)


def test_step_config_is_built_from_graphdefs_without_weights(assets):
    """What an ahead-of-time planner calls: abstract models, no weights loaded."""
    abstract = lambda seed: nnx.eval_shape(
        lambda: models.CausalLM(_model_config(), rngs=nnx.Rngs(seed))
    )
    graphdef = lambda m: nnx.split(m, nnx.Param)[0]
    mesh = sharding.make_mesh({"fsdp": 2}, jax.devices()[:2])
    build = lambda config: trainer.step_config(
        config,
        student=graphdef(abstract(0)),
        teachers=[graphdef(abstract(1)), graphdef(abstract(2))],
        references=[],
        reference_of=[None, None],
        vocab_size=tiny_run.VOCAB,
        mesh=mesh,
    )
    # 2 rows per device x 2 devices: 2 microbatches of 4 rows, 2 of each teacher's 4.
    cfg = build(_two_teachers(assets, **{"memory.microbatch_rows": 2}))
    assert cfg.teacher_rows == (4, 4) and cfg.microbatch_rows == 4 and cfg.mesh is mesh
    assert cfg.logits_chunk == 512 and cfg.group_size == 2
    # 1 row per device: 4 microbatches, but each teacher has only 2 prompts to share out.
    with pytest.raises(ValueError, match="teacher 'default' has 2 prompts per batch: make each"):
        build(_two_teachers(assets, **{"memory.microbatch_rows": 1}))


def test_memory_settings_reach_the_models_and_leave_the_step_unchanged(assets):
    """memory.remat rematerialises the student only (the one differentiated); attention chunks
    apply to every model; the step's result does not depend on either."""
    plain = trainer.Trainer.setup(_config(assets), mesh=_one_device())
    config = _config(assets, **{"memory.remat": "full", "memory.attention_chunk": 4})
    run = trainer.Trainer.setup(config, mesh=_one_device())
    teacher = nnx.merge(run.step_cfg.teachers[0], run.frozen.teachers[0])
    assert run.student.remat == "full" and teacher.remat is None
    assert run.student.attention_chunk_size == teacher.attention_chunk_size == 4
    rollout = jax.tree.map(jnp.asarray, _rollout(plain, teacher=(0, 0, 0, 0)))
    (a, out_a), (b, out_b) = (r.update(r.init_state(), rollout) for r in (run, plain))
    chex.assert_trees_all_close(jax.device_get(a.params), jax.device_get(b.params), atol=1e-5)
    np.testing.assert_allclose(out_a["loss"], out_b["loss"], rtol=1e-5)


def test_non_finite_steps_are_skipped_then_stop_the_run(assets, tmp_path):
    broken = tmp_path / "nan_teacher"
    models.random_checkpoint(broken, _model_config(), seed=1)
    model = models.from_pretrained(broken)
    model.embed_tokens.set_value(model.embed_tokens[...] * jnp.nan)
    models.save_pretrained(model, broken, overwrite_source=True)
    config = _config(
        assets, **{"teachers.default.path": str(broken), "train.max_consecutive_skips": 2}
    )
    with pytest.raises(trainer.NonFiniteError, match="2 consecutive steps"):
        _train(config, tmp_path / "run")
    rows = metrics.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["skipped"] for r in rows if r["split"] == "train"] == [1.0, 1.0]


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"student.path": "/nonexistent/model"}, FileNotFoundError, "/nonexistent/model"),
        ({"estimator.divergence": "kl"}, ValueError, "valid names"),
        ({"teachers.default.reward_scale": 1.25}, ValueError, "needs a reference model"),
        ({"teachers.default.reward_scale": float("nan")}, ValueError, "finite"),
        ({"estimator.baseline": "loo", "rollout.num_samples": 1}, ValueError, "num_samples >= 2"),
    ],
)
def test_bad_config_fails_fast_with_the_fix(assets, tmp_path, overrides, error, match):
    with pytest.raises(error, match=match):
        _train(_config(assets, **overrides), tmp_path)


def test_bad_data_and_vocabulary_mismatch(assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        _train(_config(assets, **{"data.train_path": str(empty)}), tmp_path)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "x" * 200, "answer": "1"}) + "\n")
    with pytest.raises(ValueError, match="max_prompt_len"):
        _train(_config(assets, **{"data.train_path": str(long)}), tmp_path)
    small = tmp_path / "small_vocab"
    models.random_checkpoint(small, _model_config(vocab_size=64), seed=3)
    with pytest.raises(ValueError, match="64"):
        _train(_config(assets, **{"teachers.default.path": str(small)}), tmp_path)


def test_a_restart_before_the_first_checkpoint_logs_step_0_once(assets, tmp_path):
    # What a run killed after its step-0 evaluation and first train row, before any checkpoint,
    # leaves behind.
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "split": "eval", "accuracy": 0.5}) + "\n"
        + json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n"
    )  # fmt: skip
    _train(_config(assets, **{"train.num_steps": 1}), tmp_path)
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in rows] == [("eval", 0), ("train", 1), ("eval", 1)]
    assert rows[1]["loss"] != 1.0


def test_rollout_verification_is_optional_and_bounded(assets, tmp_path):
    off = _config(assets, **{"train.num_steps": 1, "train.verify_rollouts": False})
    _train(off, tmp_path / "off")
    (row,) = metrics.read_jsonl(tmp_path / "off" / "metrics.jsonl", split="train")
    assert "accuracy" not in row and row["verifier/calls"] == 0
    with pytest.raises(ValueError, match=r"train\.verify_budget_seconds must be None"):
        trainer.validate(_config(assets, **{"train.verify_budget_seconds": 0.0}))


def test_a_record_naming_an_unknown_teacher_is_an_error(assets, tmp_path):
    rows = [json.loads(line) for line in (assets / "train.jsonl").read_text().splitlines()]
    rows[3]["teacher"] = "nope"  # the run's only teacher is "default"
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="unknown teacher 'nope'; valid teachers: default"):
        _train(_config(assets, **{"data.train_path": str(path)}), tmp_path / "run")


def test_cli_rejects_a_misspelt_config_field_with_a_suggestion(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "opdplus_jax.main",
            "train",
            "--config=configs/default.py:cpu",
            f"--workdir={tmp_path}",
            "--config.estimator.divergnce=jsd",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "divergence" in done.stderr and "divergnce" in done.stderr, done.stderr[-2000:]


def test_cli_none_overrides_switch_features_off():
    argv = ["prog", "--config=c.py:cpu", "--config.loss.tis_cap=None", "--config.seed=3"]
    kept, fields = configs.split_none_overrides(argv)
    assert kept == ["prog", "--config=c.py:cpu", "--config.seed=3"]
    assert fields == ["loss.tis_cap"]
    config = default_config.get_config("qwen3_exopd")
    assert config.loss.tis_cap == 2.0
    configs.apply_overrides(config, dict.fromkeys(fields))
    assert config.loss.tis_cap is None
    with pytest.raises(ValueError, match="tis_capp"):
        configs.apply_overrides(config, {"loss.tis_capp": None})


def test_equal_optimizer_settings_share_one_optimizer_object():
    # The jitted steps take the optimizer as a static argument: one object per setting means one
    # compilation per setting in a process that runs many distillations (sweeps, tests).
    a = default_config.get_config("cpu").optimizer
    b = default_config.get_config("cpu").optimizer
    assert optim.from_config(a, 80) is optim.from_config(b, 80)
    assert optim.from_config(a, 80) is not optim.from_config(a, 40)
    b.learning_rate = a.learning_rate / 2
    assert optim.from_config(a, 80) is not optim.from_config(b, 80)
    b.schedule = "linear"
    with pytest.raises(ValueError, match="must be 'cosine' or 'constant'"):
        optim.from_config(b, 80)


@pytest.mark.parametrize(
    ("field", "old"),
    [
        ("estimator.baseline", "none"),
        ("estimator.log_ratio_clip", 0.0),
        ("loss.tis_cap", 0.0),
        ("loss.ppo_clip", -0.2),
        ("teachers.default.reference", "none"),
        ("memory.remat", "none"),
        ("memory.microbatch_rows", 0),
        ("memory.logits_chunk", 0),
        ("memory.attention_chunk", 0),
    ],
)
def test_off_is_spelt_none(assets, tmp_path, field, old):
    with pytest.raises(ValueError, match="None"):
        trainer.validate(_config(assets, **{field: old}))


# ----------------------------------------------------------------- faults: nothing lost or wrong


def test_nan_learning_rate_is_refused_before_any_model_loads(assets):
    config = _config(assets, **{"optimizer.learning_rate": float("nan")})
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate must be a finite number"):
        trainer.validate(config)


def test_a_non_finite_update_is_skipped_and_never_saved(assets, tmp_path):
    run = trainer.Trainer.setup(_config(assets), mesh=_one_device())
    # Bypass the config check: an optimizer whose updates are NaN while loss and grads are not.
    run.optimizer = optim.make_optimizer(10, learning_rate=1e-2)
    run.optimizer = optax.chain(run.optimizer, optax.scale(float("nan")))
    state = run.init_state()
    before = jax.device_get(state.params)
    state, out = run.update(state, jax.tree.map(jnp.asarray, _rollout(run)))
    assert float(out["skipped"]) == 1.0 and np.isfinite(float(out["loss"]))
    chex.assert_trees_all_equal(jax.device_get(state.params), before)
    assert int(state.step) == 0
    # Params that are not finite are refused by save, and nothing is written.
    bad = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    with run.checkpoints(str(tmp_path)) as manager:
        with pytest.raises(trainer.NonFiniteError, match="not finite"):
            run.save(manager, 1, bad, rng=jax.random.key(0), data_state={})
        assert manager.all_steps() == []


def test_eval_and_export_never_modify_the_run_directory(assets, tmp_path):
    config = _config(assets, **{"train.num_steps": 2})
    workdir = tmp_path / "run"
    _train(config, workdir)
    # A save in progress by a running trainer, which a reader must leave alone.
    in_progress = workdir / "checkpoints" / "4.orbax-checkpoint-tmp-1234"
    in_progress.mkdir()
    (in_progress / "part").write_text("being written")
    listing = lambda: sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    before = listing()
    out = trainer.evaluate_checkpoint(config, str(workdir))
    assert np.isfinite(out["accuracy"])
    trainer.export(config, str(workdir), str(tmp_path / "hf"))
    assert listing() == before
    typo = tmp_path / "runn"
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        trainer.evaluate_checkpoint(config, str(typo))
    assert not typo.exists()


def test_a_refused_resume_writes_nothing(assets, tmp_path):
    config = _config(assets, **{"train.num_steps": 2})
    _train(config, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    rows = metrics.read_jsonl(tmp_path / "metrics.jsonl")
    shorter = _config(assets, **{"train.num_steps": 1})
    with pytest.raises(ValueError, match=r"past train\.num_steps=1"):
        _train(shorter, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no config.1.json
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == rows
    # Re-running the finished run adds no rows and returns its last evaluation.
    again = _train(config, tmp_path)
    assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == rows
    assert again["accuracy"] == [r for r in rows if r["split"] == "eval"][-1]["accuracy"]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("train.checkpoint_every", 0, "train.checkpoint_every must be an int >= 1"),
        ("train.log_every", 0, "train.log_every must be an int >= 1"),
        ("loss.num_minibatches", 0, "loss.num_minibatches must be an int >= 1"),
        ("eval.batch_size", 0, "eval.batch_size must be an int >= 1"),
        ("eval.num_samples", 0, "eval.num_samples must be an int >= 1"),
        ("eval.num_prompts", 0, "eval.num_prompts must be an int >= 1"),
        ("rollout.num_samples", 0, "rollout.num_samples must be an int >= 1"),
        ("train.max_consecutive_skips", 0, "train.max_consecutive_skips must be an int >= 1"),
        ("optimizer.grad_accum", -2, "optimizer.grad_accum must be an int >= 1"),
        ("rollout.temperature", -1.0, "rollout: temperature must be a finite number >= 0"),
        ("eval.max_new_tokens", 0, "eval: max_new_tokens must be an int >= 1"),
        ("rollout.top_p", 0.0, "rollout: top_p must be in"),
        ("estimator.discount", 1.5, "estimator.discount must be in"),
        ("estimator.level", "tokens", "estimator.level must be one of"),
        ("loss.aggregation", "token_meen", "did you mean 'token_mean'"),
        ("memory.remat", "fulll", "memory.remat must be None (off) or one of full, save_dots"),
        ("memory.logits_chunk", -8, "memory.logits_chunk must be None (off) or an int >= 1"),
        ("teachers.default.prompts_per_batch", 3, "sum to 3, not data.batch_size=4"),
        # 8 rows of 4 prompts x 2 samples, on one device:
        ("memory.microbatch_rows", 3, "3 rows per microbatch is not a multiple of rollout."),
        ("memory.microbatch_rows", 6, "6 rows per microbatch does not divide the 8 rows"),
        ("estimator.support", "topk", "estimator.support must be one of sampled, full"),
        ("estimator.top_k", 4, "estimator.support='sampled' takes no top_k or tail"),
        ("reward.task_weight", -1.0, "reward.task_weight must be a number >= 0"),
        ("reward.opd_weight", 0.0, "reward.opd_weight and task_weight are both 0"),
        ("reward.task_advantage", "mean_std", "reward.task_advantage must be one of"),
    ],
)
def test_bad_settings_are_refused_before_any_model_loads(assets, tmp_path, field, value, match):
    config = _config(assets, **{field: value, "student.path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=re.escape(match)):
        _train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------ evaluation KL, reference tokenizer, off-policy


def _two_teacher_eval_config(assets, tmp_path, **overrides):
    """Two teachers; the eval rows alternate between them by their `teacher` field."""
    rows = [json.loads(line) for line in (assets / "test.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["teacher"] = ("default", "second")[i % 2]
    path = tmp_path / "test_two_teachers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(assets, **{"data.eval_path": str(path), **overrides})
    config.unlock()
    config.teachers.second = default_config.teacher(str(assets / "teacher2"))
    config.lock()
    return config


def _generate_calls(monkeypatch):
    """Records the temperature of every StaticEngine.generate call."""
    calls, generate = [], StaticEngine.generate

    def recording(self, *args, **kw):
        calls.append(self.sampling.temperature)
        return generate(self, *args, **kw)

    monkeypatch.setattr(StaticEngine, "generate", recording)
    return calls


def _hand_kl(run, assets, params, key, temperature):
    """k1 KL(student || row's teacher) per token, overall and per teacher index, of the eval rows
    sampled at `temperature` with the evaluation's key (one engine call: fold_in(key, 0))."""
    examples, prompts = run.eval_set()
    n, c = run.config.eval.num_samples, run.config.eval
    assert len(examples) * n <= c.batch_size  # one engine call in evaluate
    row_prompts = [list(p) for p in prompts for _ in range(n)]
    row_teacher = np.repeat([i % 2 for i in range(len(examples))], n)  # as the file says
    sampling = SamplingParams.for_tokenizer(
        run.tokenizer, max_new_tokens=c.max_new_tokens, temperature=temperature
    )
    engine = StaticEngine(run.step_cfg.student, sampling)
    r = engine.generate(params, row_prompts, rng=jax.random.fold_in(key, 0))
    student = np.asarray(engine.score(params, r), np.float64)
    teachers = [models.from_pretrained(assets / name) for name in ("teacher", "teacher2")]
    by = [
        np.asarray(scoring.rollout_logprobs(t, r, vocab_size=run.step_cfg.vocab_size), np.float64)
        for t in teachers
    ]
    m = np.asarray(r.mask, np.float64)
    own = np.where((row_teacher == 0)[:, None], by[0], by[1])
    kl = lambda lt, rows: ((student - lt) * m)[rows].sum() / m[rows].sum()
    every = np.ones(len(row_teacher), bool)
    return {
        "all": kl(own, every),
        0: kl(by[0], row_teacher == 0),
        1: kl(by[1], row_teacher == 1),
        "first_teacher_only": kl(by[0], every),
    }


def test_eval_kl_is_on_temperature_1_samples_scored_by_each_rows_teacher(
    assets, tmp_path, monkeypatch
):
    config = _two_teacher_eval_config(assets, tmp_path, **{"eval.temperature": 0.0})
    run = trainer.Trainer.setup(config, mesh=_one_device())
    examples, _ = run.eval_set()
    assert [ex["teacher"] for ex in examples] == [0, 1] * 4
    assert [ex["teacher_name"] for ex in examples] == ["default", "second"] * 4
    params, key = run.init_state().params, jax.random.key(7)
    calls = _generate_calls(monkeypatch)
    out = run.evaluate(params, key)
    assert calls == [0.0, 1.0]  # greedy for accuracy, a temperature-1 pass for the KL
    hand = _hand_kl(run, assets, params, key, temperature=1.0)
    np.testing.assert_allclose(out["kl_per_token"], hand["all"], rtol=1e-4)
    np.testing.assert_allclose(out["kl_per_token/default"], hand[0], rtol=1e-4)
    np.testing.assert_allclose(out["kl_per_token/second"], hand[1], rtol=1e-4)
    # Not the greedy paths' log-ratio, and not everything against the first teacher.
    greedy = _hand_kl(run, assets, params, key, temperature=0.0)
    assert abs(greedy["all"] - out["kl_per_token"]) > 0.05 * abs(out["kl_per_token"]), greedy
    assert abs(hand["first_teacher_only"] - out["kl_per_token"]) > 0.05, hand


def test_eval_at_temperature_1_reuses_its_samples_for_the_kl(assets, tmp_path, monkeypatch):
    config = _two_teacher_eval_config(assets, tmp_path, **{"eval.temperature": 1.0})
    run = trainer.Trainer.setup(config, mesh=_one_device())
    params, key = run.init_state().params, jax.random.key(3)
    calls = _generate_calls(monkeypatch)
    out = run.evaluate(params, key)
    assert calls == [1.0]  # no second pass
    hand = _hand_kl(run, assets, params, key, temperature=1.0)
    np.testing.assert_allclose(out["kl_per_token"], hand["all"], rtol=1e-4)
    np.testing.assert_allclose(out["kl_per_token/second"], hand[1], rtol=1e-4)


def test_a_reference_with_another_vocabulary_is_refused(assets, tmp_path):
    ref = tmp_path / "reference"
    models.random_checkpoint(ref, _model_config(), seed=5)  # the same embedding size
    task_tokenizer.save_tokenizer(ref)
    path = ref / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = (k for k, v in vocab.items() if v in (20, 21))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens trade ids: another vocabulary
    path.write_text(json.dumps(tok))
    config = _config(
        assets,
        **{"teachers.default.reward_scale": 1.25, "teachers.default.reference": str(ref)},
    )
    with pytest.raises(ValueError, match=r"teachers\.default\.reference .*different token -> id"):
        trainer.Trainer.setup(config, mesh=_one_device())
    for f in ("tokenizer.json", "tokenizer_config.json"):  # without its own tokenizer: accepted
        (ref / f).unlink()
    trainer.Trainer.setup(config, mesh=_one_device())


@pytest.mark.parametrize(
    ("field", "value"),
    [("rollout.temperature", 0.7), ("rollout.top_p", 0.9), ("rollout.top_k", 5)],
)
def test_off_policy_sampling_needs_the_is_correction(assets, field, value):
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r}")) as err:
        trainer.validate(_config(assets, **{field: value}))
    assert "set loss.tis_cap, e.g. 2.0, to correct with truncated importance sampling" in str(
        err.value
    )
    assert "or sample at temperature 1 without truncation" in str(err.value)
    trainer.validate(_config(assets, **{field: value, "loss.tis_cap": 2.0}))
    for preset in ("cpu", "strong_to_weak", "qwen3_exopd", "multi_teacher"):
        trainer.validate(default_config.get_config(preset))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"estimator.support": "full", "estimator.level": "sequence"}, "needs level='token'"),
        ({"estimator.support": "teacher_topk", "estimator.top_k": 4}, "tail must be one of"),
        ({"estimator.support": "full", "loss.num_minibatches": 2}, "loss.num_minibatches=1"),
        ({"reward.task_weight": 1.0, "rollout.num_samples": 1}, "at least 2 samples per prompt"),
        ({"reward.task_weight": 1.0, "train.verify_rollouts": False}, "verify_rollouts is False"),
        ({"estimator.gauge": "linear"}, "estimator.gauge: gauge must be None"),
        (
            {"estimator.divergence": "forward_kl", "estimator.gauge": "sublinear"},
            "forward_kl has no sublinear gauge",
        ),
    ],
)
def test_support_and_reward_combinations_are_refused_with_the_fix(assets, tmp_path, overrides,
                                                                   match):  # fmt: skip
    config = _config(assets, **overrides, **{"student.path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match=re.escape(match)):
        trainer.validate(config)


def test_teacher_topk_with_task_rewards_trains_end_to_end(assets, tmp_path):
    """support=teacher_topk (chunked) mixed with verifier rewards: a short run whose metrics
    show both parts of the advantage, against the same run without task rewards."""
    common = {
        "train.num_steps": 2,
        "estimator.support": "teacher_topk",
        "estimator.top_k": 8,
        "estimator.tail": "bucket",
        "estimator.discount": 1.0,
        "memory.logits_chunk": 4,
    }
    mixed = _config(assets, **common, **{"reward.task_weight": 0.5})
    _train(mixed, tmp_path / "mixed")
    rows = [r for r in metrics.read_jsonl(tmp_path / "mixed" / "metrics.jsonl")
            if r["split"] == "train"]  # fmt: skip
    assert len(rows) == 2
    for row in rows:
        assert row["skipped"] == 0.0 and np.isfinite(row["loss"])
        assert row["divergence_mean"] > 0
        assert row["task_reward_mean"] == pytest.approx(row["accuracy"])
        for key in ("opd_advantage_abs_mean", "task_advantage_abs_mean"):
            assert key in row
    _train(_config(assets, **common), tmp_path / "pure")
    pure = metrics.read_jsonl(tmp_path / "pure" / "metrics.jsonl")
    assert "task_reward_mean" not in next(r for r in pure if r["split"] == "train")
