"""SFT loop: learning, determinism, sharded equivalence, reloadable output folder, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdplus_jax import models, sft, sharding, tasks
from opdplus_jax.tasks import tokenizer as task_tokenizer
from opdplus_jax.tokenizer import Tokenizer

VOCAB = 112  # >= the task tokenizer's 104 ids (the rest is embedding padding)
STEPS = 4  # one step count (one optimizer, one compilation) for the short runs


def _model(seed=0, vocab=VOCAB):
    cfg = models.qwen3_config(
        vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
        bos_token_id=2, eos_token_id=3, pad_token_id=0,
    )  # fmt: skip
    return models.CausalLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_pretrained(
        task_tokenizer.save_tokenizer(tmp_path_factory.mktemp("sft") / "tokenizer")
    )


@pytest.fixture(scope="module")
def records():
    return tasks.get("reverse", min_len=2, max_len=4).generate("train", 32, seed=0)


def _train(tok, records, steps, *, model=None, mesh=None, seed=0, log=None, log_every=1):
    return sft.train_sft(
        model if model is not None else _model(),
        tok,
        records,
        steps=steps,
        batch_size=8,
        seq_len=32,
        learning_rate=1e-2,
        seed=seed,
        mesh=mesh,
        log=log,
        log_every=log_every,
    )


def _params(model):
    return jax.tree.map(np.asarray, nnx.split(model, nnx.Param)[1])


def test_loss_decreases(tok, records):
    losses = []
    _train(tok, records, 30, log=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    # Untrained: about log(104) nats per token; 30 steps learn at least the format.
    assert losses[0] > 4.0
    assert np.mean(losses[-5:]) < 0.6 * losses[0]


def test_logs_every_and_last_step(tok, records):
    steps = []
    _train(tok, records, STEPS, log=lambda step, m: steps.append(step), log_every=3)
    assert steps == [3, 4]


def test_deterministic_given_seed(tok, records):
    a = _params(_train(tok, records, STEPS, seed=1))
    b = _params(_train(tok, records, STEPS, seed=1))
    c = _params(_train(tok, records, STEPS, seed=2))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: np.abs(x - y).max(), a, c))
    assert max(diffs) > 0  # another data order gives other weights


def test_sharded_matches_single_device(tok, records):
    one = _params(_train(tok, records, STEPS))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    eight = _params(_train(tok, records, STEPS, mesh=mesh))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), one, eight)


def test_saved_folder_reloads_with_identical_logits(tok, records, tmp_path):
    model = _train(tok, records, STEPS)
    folder = sft.save(model, tok, tmp_path / "out")
    reloaded = models.from_pretrained(folder)
    tokens = jnp.asarray([[2, 5, 60, 61, 3, 6, 61, 60, 3]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(reloaded(tokens)))
    again = Tokenizer.from_pretrained(folder)  # a normal HF folder: tokenizer files included
    assert again.hf.get_vocab() == tok.hf.get_vocab() and again.eos_id == tok.eos_id


def test_trains_from_a_folder(tok, records, tmp_path):
    folder = tmp_path / "init"
    models.save_pretrained(_model(), folder)
    from_folder = _params(_train(tok, records, STEPS, model=str(folder)))
    from_module = _params(_train(tok, records, STEPS))
    jax.tree.map(np.testing.assert_array_equal, from_folder, from_module)


def test_bad_input(tok, records):
    with pytest.raises(ValueError, match="steps must be >= 1"):
        _train(tok, records, 0)
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        _train(tok, records, 1, model=_model(vocab=64))
