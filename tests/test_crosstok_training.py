"""Teachers with their own tokenizer in the train step and the trainer (`retokenize=True`).

The step runs the estimator on aligned groups (`opdplus_jax.crosstok`) with the teacher's group
log-probs carried in the rollout: with one group per token (identical tokenizers) that must be
exactly the ordinary step, and with a byte-level teacher over another vocabulary the group
log-probs must sum to the teacher's log-prob of the re-tokenised completion.
"""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdplus_jax import crosstok, data, divergences, metrics, scoring, sharding, trainer
from opdplus_jax.tokenizer import Tokenizer
from tests import test_support as ts
from tests import tiny_run

QWEN = tiny_run.REPO / "tests" / "testdata" / "models" / "qwen3_tied"


def with_identity_groups(batch, teacher_logp_first_half):
    """The batch with teacher 0's rows (the first half) carrying one group per token."""
    b, t = batch.tokens.shape
    mask = np.asarray(batch.mask)
    logp = np.zeros((b, t), np.float32)
    logp[: b // 2] = np.asarray(teacher_logp_first_half)
    return batch.replace(
        teacher_group=jnp.asarray(np.tile(np.arange(t), (b, 1)) * (mask > 0), jnp.int32),
        teacher_group_logp=jnp.asarray(logp),
        teacher_group_mask=jnp.asarray(mask),
    )


@pytest.mark.parametrize(
    "kw",
    [{"divergence": divergences.get("jsd")},
     {"discount": 1.0, "baseline": "loo", "aggregation": "token_mean"},
     {"level": "sequence", "divergence": divergences.get("reverse_kl")}],
)  # fmt: skip
def test_one_group_per_token_is_the_ordinary_step(kw):
    half = jax.tree.map(lambda x: x[: ts.B // 2], ts.BATCH)
    lt = scoring.completion_logprobs(
        nnx.merge(*ts.TEACHERS[0]),
        half.prompt_tokens,
        half.prompt_mask,
        half.tokens,
        half.mask,
        ts.VOCAB,
    )
    batch = with_identity_groups(ts.BATCH, lt)
    common = {"reward_scales": (1.0, 1.0), "reference_of": (None, None), **kw}
    want, m_want = ts.step_gradient(ts.step_config(**common), batch)
    got, m_got = ts.step_gradient(ts.step_config(retokenized=(True, False), **common), batch)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(want))
    assert scale > 1e-3
    chex.assert_trees_all_close(got, want, atol=1e-5 * scale, rtol=0)
    for key in ("loss", "kl_per_token", "advantage_abs_mean", "log_ratio_min", "log_ratio_max"):
        np.testing.assert_allclose(m_got[key], m_want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_a_retokenized_teacher_needs_sampled_support_and_no_reward_scale():
    with pytest.raises(ValueError, match="own tokenizer"):
        ts.step_config(retokenized=(True, False), reward_scales=(1.25, 1.0))
    with pytest.raises(ValueError, match="own tokenizer"):
        ts.step_config(retokenized=(False, True), support="full", reward_scales=(1.0, 1.0),
                       reference_of=(None, None))  # fmt: skip
    with pytest.raises(ValueError, match="one bool per teacher"):
        ts.step_config(retokenized=(True,))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tiny_run.build_assets(tmp_path_factory.mktemp("crosstok"))
    shutil.copytree(QWEN, root / "byte_teacher")  # a byte-level tokenizer of 280 ids, its model
    return root


def one_device():
    return sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])


OWN = {"teachers.default.retokenize": True, "teachers.default.max_prompt_len": 64}


def test_a_byte_level_teacher_scores_the_students_text_exactly(assets):
    config = tiny_run.config(
        assets, **OWN, **{"teachers.default.path": str(assets / "byte_teacher")}
    )
    run = trainer.Trainer.setup(config, mesh=one_device())
    pipe = data.PromptPipeline(
        str(assets / "train.jsonl"), run.tokenizer, batch_size=4, max_prompt_len=32,
        teachers=run.teacher_names, teacher_prompts=run.teacher_prompts,
    )  # fmt: skip
    batch = next(pipe)
    state = run.init_state()
    rollout = run.rollout(state.params, batch, jax.random.key(0))
    # The teacher's prompt is its own chat template in its own ids.
    teacher_tok = Tokenizer.from_pretrained(assets / "byte_teacher")
    first = np.asarray(rollout.teacher_prompt_tokens[0])[
        np.asarray(rollout.teacher_prompt_mask[0]) > 0
    ]
    assert batch["prompt"][0] in teacher_tok.decode(first.tolist())
    # Sequence level: the group log-probs sum to the teacher's log-prob of the re-tokenised text.
    mask = np.asarray(rollout.mask)
    ids, ids_mask, _ = crosstok.retokenize(run.tokenizer, teacher_tok, np.asarray(rollout.tokens),
                                           mask)  # fmt: skip
    direct = scoring.token_logprobs(
        (run.step_cfg.teachers[0], run.frozen.teachers[0]), rollout.teacher_prompt_tokens,
        rollout.teacher_prompt_mask, ids, ids_mask, vocab_size=teacher_tok.vocab_size,
    ).sum(-1)  # fmt: skip
    groups = (np.asarray(rollout.teacher_group_logp) * np.asarray(rollout.teacher_group_mask)).sum(
        -1
    )
    np.testing.assert_allclose(groups, direct, rtol=1e-5, atol=1e-4)
    carried = np.asarray(run.teacher_logprobs(rollout)).sum(-1)
    np.testing.assert_allclose(carried, direct, rtol=1e-5, atol=1e-4)
    # The step's KL per token is the sequence-level log-ratio over the student's tokens.
    student = scoring.rollout_logprobs((run.step_cfg.student, state.params), rollout,
                                       vocab_size=run.step_cfg.vocab_size)  # fmt: skip
    _, out = run.update(state, rollout)
    want = float((np.asarray(student).sum() - np.asarray(direct).sum()) / mask.sum())
    np.testing.assert_allclose(float(out["kl_per_token"]), want, rtol=1e-4, atol=1e-5)


def test_a_run_with_a_retokenizing_teacher_trains_and_evaluates(assets, tmp_path):
    config = tiny_run.config(assets, **OWN, **{
        "teachers.default.path": str(assets / "byte_teacher"), "train.num_steps": 2})  # fmt: skip
    out = trainer.train_and_evaluate(config, str(tmp_path), mesh=one_device())
    rows = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in rows)
    assert np.isfinite(out["kl_per_token"])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"teachers.default.reward_scale": 1.25, "teachers.default.reference": "student_init"},
      "needs reward_scale 1"),
     ({"estimator.support": "full"}, "needs reward_scale 1 and estimator.support='sampled'")],
)  # fmt: skip
def test_bad_retokenizing_teacher_settings_are_refused(assets, overrides, match):
    config = tiny_run.config(assets, **OWN, **overrides)
    with pytest.raises(ValueError, match=match):
        trainer.validate(config)


def test_a_retokenizing_teacher_without_a_tokenizer_is_refused(assets, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(assets / "teacher", bare)
    config = tiny_run.config(assets, **OWN, **{"teachers.default.path": str(bare)})
    with pytest.raises(ValueError, match="no tokenizer files"):
        trainer.Trainer.setup(config, mesh=one_device())
