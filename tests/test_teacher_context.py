"""Teacher-side context: a teacher's own chat template or privileged fields in its prompt, and
the start-up checks that a teacher expects the student's stops (EOS ids, templates, EOS
log-probs on the first rollouts)."""

import json
import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opdplus_jax import data, metrics, scoring, sharding, trainer
from opdplus_jax.tasks import tokenizer as task_tokenizer
from opdplus_jax.tokenizer import Tokenizer
from tests import tiny_run

OTHER_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tiny_run.build_assets(tmp_path_factory.mktemp("context"))
    # A teacher folder with its own tokenizer: the student's vocabulary, another chat template.
    own = root / "teacher_own_template"
    shutil.copytree(root / "teacher", own)
    task_tokenizer.save_tokenizer(own)
    (own / "chat_template.jinja").write_text(OTHER_TEMPLATE)
    # A teacher whose tokenizer ends sequences with another token than the student's EOS.
    other_eos = root / "teacher_other_eos"
    shutil.copytree(root / "teacher", other_eos)
    task_tokenizer.save_tokenizer(other_eos)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = other_eos / name
        cfg = json.loads(path.read_text())
        cfg["eos_token"] = "<|system|>"
        path.write_text(json.dumps(cfg))
    (other_eos / "generation_config.json").unlink(missing_ok=True)
    return root


def one_device():
    return sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])


def test_the_pipeline_renders_each_teachers_prompt(assets):
    student = Tokenizer.from_pretrained(assets / "tokenizer")
    own = Tokenizer.from_pretrained(assets / "teacher_own_template")
    builder = data.TeacherPrompt(
        own, max_len=80, context_field="answer", context_format="{prompt}\nAnswer: {context}",
        name="t",
    )  # fmt: skip
    pipe = data.PromptPipeline(
        str(assets / "train.jsonl"), student, batch_size=4, max_prompt_len=32,
        teachers=["t"], teacher_prompts=[builder],
    )  # fmt: skip
    batch = next(pipe)
    assert batch["teacher_prompt_ids"].shape == (4, 80)
    for i in range(4):
        ids = batch["teacher_prompt_ids"][i][batch["teacher_prompt_mask"][i] > 0]
        text = own.decode(ids.tolist(), skip_special_tokens=False)
        assert text == f"[user] {batch['prompt'][i]}\nAnswer: {batch['answer'][i]}\n[assistant] "
    # No builder: the student's prompt, and no teacher prompt columns.
    assert "teacher_prompt_ids" not in next(
        data.PromptPipeline(str(assets / "train.jsonl"), student, batch_size=4, max_prompt_len=32)
    )
    # Over its limit: dropped and counted.
    tight = data.TeacherPrompt(student, max_len=22, context_field="answer", name="t")
    pipe = data.PromptPipeline(
        str(assets / "train.jsonl"), student, batch_size=2, max_prompt_len=32, teachers=["t"],
        teacher_prompts=[tight],
    )  # fmt: skip
    assert pipe.stats["dropped"]["teacher_prompt_too_long"] > 0
    assert pipe.stats["num_kept"] + pipe.stats["num_dropped"] == pipe.stats["num_records"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"context_field": "hint"}, "not a data field"),
        ({"context_field": "answer", "context_format": "{prompt}"}, "must contain"),
        ({"max_len": 0}, "int >= 1"),
    ],
)
def test_bad_teacher_prompts_are_refused(assets, kwargs, match):
    tok = Tokenizer.from_pretrained(assets / "tokenizer")
    with pytest.raises(ValueError, match=match):
        data.TeacherPrompt(tok, **{"max_len": 40, **kwargs})


def test_a_record_without_the_context_field_is_named(assets, tmp_path):
    tok = Tokenizer.from_pretrained(assets / "tokenizer")
    builder = data.TeacherPrompt(tok, max_len=80, context_field="solution", name="t")
    rows = [{"prompt": "Reverse: ab", "answer": "ba"}] * 4
    with pytest.raises(ValueError, match=r"record 0: teachers.t.context_field='solution'"):
        data.PromptPipeline(rows, tok, batch_size=2, max_prompt_len=32, teachers=["t"],
                            teacher_prompts=[builder])  # fmt: skip


def test_teachers_score_after_their_own_prompt_in_the_train_step(assets):
    """The step's teacher log-probs (its `kl_per_token`) are those of the completion after
    the teacher's prompt, which differ from those after the student's."""
    overrides = {
        "teachers.default.path": str(assets / "teacher_own_template"),
        "teachers.default.template": "own",
        "teachers.default.context_field": "answer",
        "teachers.default.max_prompt_len": 64,
    }
    run = trainer.Trainer.setup(tiny_run.config(assets, **overrides), mesh=one_device())
    pipe = data.PromptPipeline(
        str(assets / "train.jsonl"), run.tokenizer, batch_size=4, max_prompt_len=32,
        teachers=run.teacher_names, teacher_prompts=run.teacher_prompts,
    )  # fmt: skip
    batch = next(pipe)
    state = run.init_state()
    rollout = run.rollout(state.params, batch, jax.random.key(0))
    assert rollout.teacher_prompt_tokens.shape == (8, 64)
    np.testing.assert_array_equal(
        np.asarray(rollout.teacher_prompt_tokens), np.repeat(batch["teacher_prompt_ids"], 2, 0)
    )
    vocab = run.step_cfg.vocab_size
    student = scoring.rollout_logprobs((run.step_cfg.student, state.params), rollout,
                                       vocab_size=vocab)  # fmt: skip
    own = run.teacher_logprobs(rollout)
    after_student_prompt = scoring.rollout_logprobs(
        (run.step_cfg.teachers[0], run.frozen.teachers[0]), rollout
    )
    fm = np.asarray(rollout.mask, np.float32)
    assert float(np.abs((np.asarray(own) - np.asarray(after_student_prompt)) * fm).max()) > 1e-3
    _, out = run.update(state, rollout)
    want = float(((np.asarray(student) - np.asarray(own)) * fm).sum() / fm.sum())
    np.testing.assert_allclose(float(out["kl_per_token"]), want, rtol=1e-4, atol=1e-6)


def test_a_run_with_teacher_context_trains_and_reports_eos_logprobs(assets, tmp_path):
    config = tiny_run.config(assets, **{
        "train.num_steps": 2,
        "teachers.default.context_field": "answer",
        "teachers.default.max_prompt_len": 48,
    })  # fmt: skip
    trainer.train_and_evaluate(config, str(tmp_path), mesh=one_device())
    rows = [r for r in metrics.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    first = rows[0]
    if "eos_logprob/student" in first:  # some row stopped in the first rollout
        assert "eos_logprob/default" in first
    assert "eos_logprob/student" not in rows[1]


def test_a_mismatched_eos_and_template_are_reported_at_setup(assets, caplog):
    config = tiny_run.config(assets, **{"teachers.default.path": str(assets / "teacher_other_eos")})
    found = trainer.teacher_mismatches(config, Tokenizer.from_pretrained(assets / "tokenizer"))
    assert len(found) == 1 and "ends sequences with token ids [4]" in found[0]
    assert f"the student with 3 ({task_tokenizer.EOS!r})" in found[0]
    with caplog.at_level(logging.WARNING, logger="opdplus_jax.trainer"):
        trainer.Trainer.setup(config, mesh=one_device())
    assert any("ends sequences with token ids [4]" in r.getMessage() for r in caplog.records)
    # A teacher with its own template that scores the student's prompt.
    config = tiny_run.config(assets, **{
        "teachers.default.path": str(assets / "teacher_own_template")})  # fmt: skip
    (message,) = trainer.teacher_mismatches(config, Tokenizer.from_pretrained(assets / "tokenizer"))
    assert "template='own'" in message
    config.teachers.default.template = "own"
    assert trainer.teacher_mismatches(config, Tokenizer.from_pretrained(assets / "tokenizer")) == []


def test_a_teacher_that_does_not_expect_the_students_stops_is_reported(assets, tmp_path, caplog):
    """teacher2 is an unrelated random network: on the first rollout it gives the student's
    EOS tokens far less probability than the student, and the run says so with the numbers."""
    config = tiny_run.config(
        assets, **{"train.num_steps": 1, "teachers.default.path": str(assets / "teacher2")}
    )
    run = trainer.Trainer.setup(config, mesh=one_device())
    pipe = data.PromptPipeline(str(assets / "train.jsonl"), run.tokenizer, batch_size=4,
                               max_prompt_len=32)  # fmt: skip
    batch = next(pipe)
    state = run.init_state()
    rollout = run.rollout(state.params, batch, jax.random.key(1))
    got = run.eos_logprobs(state.params, rollout)
    mask, tokens = np.asarray(rollout.mask), np.asarray(rollout.tokens)
    ends = mask.sum(1) - 1
    stopped = [i for i in range(len(ends)) if mask[i].any() and tokens[i, ends[i]] == 3]
    if not stopped:
        assert got == {}
        return
    student = np.asarray(
        scoring.rollout_logprobs(
            (run.step_cfg.student, state.params), rollout, vocab_size=run.step_cfg.vocab_size
        )
    )
    np.testing.assert_allclose(
        got["eos_logprob/student"], np.mean([student[i, ends[i]] for i in stopped]), rtol=1e-5
    )
    with caplog.at_level(logging.WARNING, logger="opdplus_jax.trainer"):
        trainer.train_and_evaluate(config, str(tmp_path), mesh=one_device())
    teacher = np.asarray(run.teacher_logprobs(rollout))
    gap = np.median([student[i, ends[i]] - teacher[i, ends[i]] for i in stopped])
    np.testing.assert_allclose(got["eos_gap/default"], gap, rtol=1e-5, atol=1e-6)
    said = [r.getMessage() for r in caplog.records if "end-of-sequence" in r.getMessage()]
    assert (len(said) == 1) == (gap > trainer.EOS_GAP_NATS), (gap, said)
    assert jnp.isfinite(gap)
