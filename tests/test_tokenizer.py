"""Tokenizer wrapper: chat template, special ids, ragged encode/decode, padding, compatibility."""

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from opdplus_jax import models
from opdplus_jax import tokenizer as tok_lib
from opdplus_jax.tokenizer import Tokenizer

DATA = os.path.join(os.path.dirname(__file__), "testdata", "models")


@pytest.fixture(scope="module", params=["qwen3_tied", "llama3"])
def tok(request):
    return Tokenizer.from_pretrained(os.path.join(DATA, request.param))


def test_special_ids_and_vocab(tok):
    assert tok.vocab_size == 280  # the embedding has 304 rows: 24 padding columns
    assert tok.eos_id == 2 and tok.eos_ids == (2,)
    assert tok.pad_id == 0
    assert tok.bos_id is None


def test_chat_template_matches_fixture_prompts(tok):
    with open(os.path.join(DATA, "qwen2", "generate.json")) as f:
        sample = json.load(f)["samples"][0]
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "what is the sum of two and three?"}]
    )
    assert ids == sample["prompt"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=False
    )
    assert no_prompt == tok.encode("<|im_start|>user\nhi<|im_end|>\n")


def test_encode_decode_ragged(tok):
    texts = ["hello world", "the sea", "what is 2 + 3?"]
    batch = tok.encode(texts)
    assert [len(x) for x in batch] == [len(tok.encode(t)) for t in texts]
    assert batch[0] == tok.encode("hello world")
    assert [tok.decode(x) for x in batch] == texts
    ids, mask = tok.pad(batch)
    assert ids.dtype == np.int32 and ids.shape == (3, max(map(len, batch)))
    assert tok.batch_decode(ids, mask) == texts
    assert (ids[mask == 0] == tok.pad_id).all()
    # Left padding: real tokens are right-aligned.
    assert mask[:, -1].all()
    right, right_mask = tok.pad(batch, side="right", length=ids.shape[1] + 2)
    assert right_mask[:, 0].all() and right.shape[1] == ids.shape[1] + 2
    assert tok.decode(tok.encode("<|im_end|>"), skip_special_tokens=False) == "<|im_end|>"
    assert tok.decode(tok.encode("a<|im_end|>")) == "a"


def test_pad_errors():
    with pytest.raises(ValueError, match="length"):
        tok_lib.pad_sequences([[1, 2, 3]], 0, length=2)
    with pytest.raises(ValueError, match="side"):
        tok_lib.pad_sequences([[1]], 0, side="middle")
    ids, mask = tok_lib.pad_sequences([[], [5]], 9)
    assert ids.tolist() == [[9], [5]] and mask.tolist() == [[0], [1]]


def test_slice_logits():
    logits = jnp.ones((2, 3, 304))
    assert tok_lib.slice_logits(logits, 280).shape == (2, 3, 280)
    with pytest.raises(ValueError, match="fewer"):
        tok_lib.slice_logits(np.ones((2, 10)), 11)


def test_check_compatible(tmp_path):
    student = Tokenizer.from_pretrained(os.path.join(DATA, "qwen3_tied"))
    teacher = Tokenizer.from_pretrained(os.path.join(DATA, "llama3"))
    s_cfg = models.load_config(os.path.join(DATA, "qwen3_tied"))
    t_cfg = models.load_config(os.path.join(DATA, "llama3"))
    assert tok_lib.check_compatible(student, teacher, s_cfg, t_cfg) == 280
    # Different embedding sizes are fine (both cover the tokenizer): slice logits to 280.
    bigger = dataclasses.replace(t_cfg, vocab_size=320)
    assert tok_lib.check_compatible(student, teacher, s_cfg, bigger) == 280
    small = dataclasses.replace(t_cfg, vocab_size=200)
    with pytest.raises(ValueError, match=r"teacher.*200.*280"):
        tok_lib.check_compatible(student, teacher, s_cfg, small)
    # A tokenizer with an extra added token has a different size: both sizes are named.
    folder = tmp_path / "tok"
    shutil.copytree(os.path.join(DATA, "llama3"), folder)
    other = Tokenizer.from_pretrained(folder)
    other.hf.add_tokens(["<|extra|>"], special_tokens=True)
    with pytest.raises(ValueError, match=r"student 280 vs teacher 281"):
        tok_lib.check_compatible(student, other, s_cfg, t_cfg)


def test_missing_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")


def test_generation_config_eos_ids_are_added(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "qwen2"), folder)
    with open(folder / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": [2, 0]}, f)
    assert Tokenizer.from_pretrained(folder).eos_ids == (2, 0)
