"""Checkpoint loading and export faults: tensors the config does not describe, configs that do not
match the weights (caught from the safetensors headers before the model is built), shard indexes
that point outside the folder, malformed JSON files, exports that would write through symlinks,
leave stale shards or overwrite the source folder, and tokenizers that ask to run custom code."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from opdplus_jax import models
from opdplus_jax.models import checkpoint_io
from opdplus_jax.tokenizer import Tokenizer
from tests.files import edited_json

DATA = os.path.join(os.path.dirname(__file__), "testdata", "models")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def tiny_config(**overrides):
    sizes = {"vocab_size": 32, "hidden_size": 16, "num_layers": 2, "num_heads": 2}
    return models.qwen3_config(**{"num_kv_heads": 1, **sizes, **overrides})


def checkpoint(folder, **overrides):
    return models.random_checkpoint(folder, tiny_config(**overrides), seed=0)


def set_layers(folder, n):
    with edited_json(os.path.join(folder, "config.json")) as cfg:
        cfg["num_hidden_layers"] = n
        cfg.pop("layer_types", None)  # transformers checks it against num_hidden_layers


def params(model):
    state = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {k: np.asarray(v.get_value()) for k, v in state}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k])


# ----- tensors the config does not describe -----


def test_config_with_fewer_layers_than_the_weights_is_refused(tmp_path):
    folder = checkpoint(tmp_path / "m")
    set_layers(folder, 1)
    with pytest.raises(ValueError) as e:
        models.from_pretrained(folder)
    msg = str(e.value)
    assert folder in msg and "model.layers.1.input_layernorm.weight" in msg
    assert "11 unexpected tensor(s)" in msg  # qwen3: 11 tensors per layer
    assert "config.json says 1 layers but the weights have 2" in msg


def test_tied_config_over_weights_with_lm_head_is_refused(tmp_path):
    folder = checkpoint(tmp_path / "m", tie_word_embeddings=False)
    with edited_json(os.path.join(folder, "config.json")) as cfg:
        cfg["tie_word_embeddings"] = True
    with pytest.raises(ValueError) as e:
        models.from_pretrained(folder)
    msg = str(e.value)
    assert folder in msg and "'lm_head.weight'" in msg and "1 unexpected tensor(s)" in msg
    assert "tie_word_embeddings is true but lm_head.weight is present" in msg


def test_config_with_more_layers_than_the_weights_names_the_missing_tensors(tmp_path):
    folder = checkpoint(tmp_path / "m")
    set_layers(folder, 3)
    with pytest.raises(KeyError) as e:
        models.from_pretrained(folder)
    msg = str(e.value)
    assert f"{folder}/model.safetensors: missing tensor(s)" in msg
    assert "model.layers.2.input_layernorm.weight" in msg and "and 6 more" in msg
    assert "config.json says 3 layers but the weights have 2" in msg


def test_untied_config_over_tied_weights_explains_the_missing_lm_head(tmp_path):
    folder = checkpoint(tmp_path / "m", tie_word_embeddings=True)
    with edited_json(os.path.join(folder, "config.json")) as cfg:
        cfg["tie_word_embeddings"] = False
    with pytest.raises(KeyError, match=r"lm_head\.weight.*tie_word_embeddings is false"):
        models.from_pretrained(folder)


def test_rotary_inv_freq_buffers_in_old_checkpoints_are_ignored(tmp_path):
    folder = checkpoint(tmp_path / "m")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    models.from_pretrained(folder)


# ----- the config is checked against the checkpoint's headers before the model is built -----


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("num_hidden_layers", 100_000, KeyError, "config.json says 100000 layers"),
        ("num_hidden_layers", 10**12, KeyError, "config.json says 1000000000000 layers"),
        ("vocab_size", 10**9, ValueError, r"embed_tokens\.weight.*\(1000000000, 16\)"),
        ("intermediate_size", 10**7, ValueError, r"gate_proj\.weight.*\(10000000, 16\)"),
    ],
)
def test_oversized_config_fails_before_the_model_is_built(
    tmp_path, monkeypatch, key, value, error, match
):
    folder = checkpoint(tmp_path / "m")
    if key == "num_hidden_layers":
        set_layers(folder, value)
    else:
        with edited_json(os.path.join(folder, "config.json")) as cfg:
            cfg[key] = value

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked against weights")

    monkeypatch.setattr(checkpoint_io, "CausalLM", never)
    start = time.perf_counter()
    with pytest.raises(error, match=match):
        models.from_pretrained(folder)
    assert time.perf_counter() - start < 10


def sharded(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "qwen3_sharded"), folder)
    return folder


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_index_pointing_outside_the_folder_is_refused(tmp_path, where):
    folder = sharded(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    shard = "model-00001-of-00003.safetensors"
    shutil.copy(folder / shard, outside / shard)
    entry = f"../outside/{shard}" if where == "parent" else str(outside / shard)
    with edited_json(folder / "model.safetensors.index.json") as index:
        for name, file in index["weight_map"].items():
            if file == shard:
                index["weight_map"][name] = entry
    with pytest.raises(ValueError, match=re.escape(f"{folder}/model.safetensors.index.json")) as e:
        models.from_pretrained(folder)
    assert entry in str(e.value) and "outside the model folder" in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[1, 2]",
        '{"metadata": {}}',
        '{"weight_map": ["model-00001-of-00003.safetensors"]}',
        '{"weight_map": {"model.norm.weight": 3}}',
        '{"weight_map": {"model.norm.weight": ""}}',
        b"\xff\xfe{}",
    ],
)
def test_malformed_shard_index_names_the_file(tmp_path, text):
    folder = sharded(tmp_path)
    path = folder / "model.safetensors.index.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        models.from_pretrained(folder)


def test_hf_cache_style_symlinked_shards_still_load(tmp_path):
    """Hub snapshots are symlinks into ../../blobs: following a link inside the folder is fine."""
    src = sharded(tmp_path)
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in os.listdir(src):
        shutil.copy(src / name, blobs / name)
        os.symlink(os.path.join("..", "blobs", name), snapshot / name)
    assert_same_params(models.from_pretrained(snapshot), models.from_pretrained(src))


# ----- malformed config files -----


def write_config(folder, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        f.write(data if isinstance(data, str) else json.dumps(data))
    return os.path.join(folder, "config.json")


@pytest.mark.parametrize("text", ["[1, 2]", '"qwen3"', "3", "null"])
def test_config_json_that_is_not_an_object_names_the_file(tmp_path, text):
    path = write_config(tmp_path / "m", text)
    with pytest.raises(ValueError, match=re.escape(path) + ".*JSON object"):
        models.load_config(tmp_path / "m")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden_size", 0),
        ("hidden_size", -16),
        ("vocab_size", 0),
        ("intermediate_size", -1),
        ("num_attention_heads", 0),
        ("num_key_value_heads", 0),
        ("num_key_value_heads", -1),
        ("head_dim", 0),
        ("num_hidden_layers", 0),
        ("num_hidden_layers", -2),
        ("num_hidden_layers", 1e5),
        ("num_hidden_layers", 1.5),
        ("num_hidden_layers", True),
        ("num_hidden_layers", "2"),
        ("max_position_embeddings", 0),
        ("rms_norm_eps", -1e-6),
        ("rms_norm_eps", "tiny"),
    ],
)
def test_bad_sizes_name_the_file_and_key(tmp_path, key, value):
    folder = checkpoint(tmp_path / "m")
    with edited_json(os.path.join(folder, "config.json")) as cfg:
        cfg[key] = value
        cfg.pop("layer_types", None)
    with pytest.raises(ValueError, match=re.escape(f"{folder}/config.json") + f".*{key}"):
        models.from_pretrained(folder)


@pytest.mark.parametrize(
    "text",
    ["{bad json", "[2]", '{"eos_token_id": "2"}', '{"eos_token_id": [2, "x"]}', b"\xff\xfe"],
)
def test_bad_generation_config_names_the_file(tmp_path, text):
    folder = tmp_path / "m"
    shutil.copytree(os.path.join(DATA, "qwen2"), folder)
    path = folder / "generation_config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        Tokenizer.from_pretrained(folder)


# ----- export -----


def test_export_never_writes_through_symlinks(tmp_path):
    model = models.from_pretrained(checkpoint(tmp_path / "src"))
    victims = tmp_path / "victims"
    victims.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    names = [
        "model.safetensors",
        "config.json",
        "model.safetensors.index.json",
        ".part-0.tmp",  # the temporary name the export used to write first
        *(f"model-{i:05d}-of-{n:05d}.safetensors" for n in (1, 2, 3) for i in range(1, n + 1)),
    ]
    for name in names:
        (victims / name).write_text("precious")
        os.symlink(victims / name, out / name)
    models.save_pretrained(model, out)
    models.save_pretrained(model, out, max_shard_size=2**11)  # sharded: index and shards
    models.save_pretrained(model, out)
    for name in names:
        assert (victims / name).read_text() == "precious", name
    assert not (out / "model.safetensors").is_symlink()
    assert not (out / "config.json").is_symlink()
    assert_same_params(models.from_pretrained(out), model)


def test_export_removes_stale_shards_and_keeps_unrelated_files(tmp_path):
    model = models.from_pretrained(checkpoint(tmp_path / "src"))
    out = tmp_path / "out"
    out.mkdir()
    unrelated = [
        "notes.txt",
        "model-00001-of-00009.bin",
        "model-extra.safetensors",
        "tokenizer.json",
    ]
    for name in unrelated:
        (out / name).write_text("keep me")

    def listing():
        names = set(os.listdir(out))
        assert not [n for n in names if n.endswith(".tmp")]
        return names - set(unrelated)

    models.save_pretrained(model, out, max_shard_size=1)  # one tensor per shard
    many = sorted(n for n in listing() if SHARD.fullmatch(n))
    assert len(many) == 24 and "model.safetensors" not in listing()
    models.save_pretrained(model, out, max_shard_size=2**12)
    fewer = sorted(n for n in listing() if SHARD.fullmatch(n))
    assert 1 < len(fewer) < len(many) and listing() == {
        *fewer,
        "model.safetensors.index.json",
        "config.json",
    }
    with open(out / "model.safetensors.index.json") as f:
        assert sorted(set(json.load(f)["weight_map"].values())) == fewer
    assert_same_params(models.from_pretrained(out), model)
    models.save_pretrained(model, out)
    assert listing() == {"model.safetensors", "config.json"}
    assert_same_params(models.from_pretrained(out), model)
    models.save_pretrained(model, out, max_shard_size=2**12)  # single -> sharded
    assert "model.safetensors" not in listing()
    for name in unrelated:
        assert (out / name).read_text() == "keep me"


def test_export_into_the_source_folder_is_refused(tmp_path):
    folder = checkpoint(tmp_path / "m")
    before = {n: (tmp_path / "m" / n).read_bytes() for n in os.listdir(folder)}
    model = models.from_pretrained(folder)
    os.symlink(folder, tmp_path / "link")
    merged = nnx.merge(*nnx.split(model))  # the source survives split/merge (jit, optimizers)
    for m in (model, merged):
        for out in (folder, f"{folder}/", f"{folder}/.", tmp_path / "link"):
            with pytest.raises(ValueError, match="folder the model was loaded from") as e:
                models.save_pretrained(m, out)
            assert folder in str(e.value)
    assert {n: (tmp_path / "m" / n).read_bytes() for n in os.listdir(folder)} == before
    models.save_pretrained(model, tmp_path / "elsewhere")
    assert_same_params(models.from_pretrained(tmp_path / "elsewhere"), model)
    # On purpose: the weights (already on the device) are written back through new files.
    model.embed_tokens.set_value(model.embed_tokens[...] * 2)
    models.save_pretrained(model, folder, overwrite_source=True)
    assert_same_params(models.from_pretrained(folder), model)


# ----- tokenizers never run (or ask to run) code from the folder -----


PROMPT_PROBE = """
import sys
from opdplus_jax.tokenizer import Tokenizer
try:
    Tokenizer.from_pretrained(sys.argv[1])
except ValueError as e:
    print("ERROR:", e)
else:
    print("LOADED")
"""


@pytest.mark.parametrize("with_config", [False, True])
def test_tokenizer_with_custom_code_never_prompts_or_runs_it(tmp_path, with_config):
    folder = tmp_path / "tok"
    folder.mkdir()
    src = os.path.join(DATA, "qwen3_tied")
    for name in ["tokenizer.json", "chat_template.jinja"] + ["config.json"] * with_config:
        shutil.copy(os.path.join(src, name), folder / name)
    with open(folder / "tokenizer_config.json", "w") as f:
        json.dump(
            {
                "backend": "tokenizers",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "EvilTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
            },
            f,
        )
    (folder / "tokenization_evil.py").write_text(
        "import pathlib\n"
        "pathlib.Path(__file__).with_name('EXECUTED').write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", PROMPT_PROBE, str(folder)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "[y/N]" not in out and "Do you wish to run the custom code" not in out
    assert not (folder / "EXECUTED").exists()
    if with_config:  # the model type's own tokenizer class: loads without the custom code
        assert "LOADED" in proc.stdout
    else:
        assert f"ERROR: {folder}" in proc.stdout and "custom code" in proc.stdout


def test_tokenizer_save_never_writes_through_symlinks(tmp_path):
    from opdplus_jax.tasks import tokenizer as task_tokenizer
    from opdplus_jax.tokenizer import Tokenizer

    task_tokenizer.save_tokenizer(tmp_path / "tok")
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("not yours")
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").symlink_to(elsewhere)
    tok.save_pretrained(out)
    assert elsewhere.read_text() == "not yours"
    assert not (out / "tokenizer.json").is_symlink()
    assert Tokenizer.from_pretrained(out).vocab_size == tok.vocab_size
    assert not [p for p in out.iterdir() if p.name.startswith(".tokenizer.")]
