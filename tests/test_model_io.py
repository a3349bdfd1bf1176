"""Checkpoint loading and export: round trips, transformers' layout, sharded files, bad input."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from opdplus_jax import models
from opdplus_jax import sharding as shd
from tests.files import edited_json

DATA = os.path.join(os.path.dirname(__file__), "testdata", "models")
FAMILIES = ["qwen3_tied", "qwen3_untied", "qwen2", "llama3"]
TOL = 2e-4


def _params(model):
    return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tensors(folder):
    """name -> array over model.safetensors or all shards."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, name)))
    return out


def _copy(src, dst):
    shutil.copytree(os.path.join(DATA, src), dst)
    return dst


def _without_tensor(src, dst, name):
    """A copy of the fixture `src` in `dst` whose model.safetensors lacks the tensor `name`."""
    folder = _copy(src, dst)
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_what_transformers_wrote(family, tmp_path):
    src = os.path.join(DATA, family)
    model = models.from_pretrained(src)
    models.save_pretrained(model, tmp_path)
    with open(os.path.join(src, "export_reference.json")) as f:
        reference = json.load(f)
    ours = _tensors(tmp_path)
    assert {k: [list(v.shape), str(v.dtype)] for k, v in ours.items()} == {
        k: [v["shape"], v["dtype"]] for k, v in reference["tensors"].items()
    }
    theirs = _tensors(src)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    with open(os.path.join(tmp_path, "config.json")) as f:
        config = json.load(f)
    assert sorted(config) == reference["config_keys"]
    # `transformers_version` records which library release wrote the file, not the model: the
    # export writes the installed one, the reference the one the fixtures were made with.
    version_free = lambda d: {k: v for k, v in d.items() if k != "transformers_version"}
    assert version_free(config) == version_free(reference["config"])
    # Our load of our export is identical to the original load.
    again = models.from_pretrained(tmp_path)
    a, b = _params(model), _params(again)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert again.config == model.config


def test_sharded_checkpoint_written_by_transformers_loads():
    folder = os.path.join(DATA, "qwen3_sharded")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    model = models.from_pretrained(folder)
    single = _params(models.from_pretrained(os.path.join(DATA, "qwen3_tied")))
    for key, value in _params(model).items():
        np.testing.assert_array_equal(value, single[key])


def test_sharded_export_round_trip(tmp_path):
    model = models.from_pretrained(os.path.join(DATA, "llama3"))
    models.save_pretrained(model, tmp_path, max_shard_size=100_000)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(os.path.join(tmp_path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(tmp_path).values())
    again = models.from_pretrained(tmp_path)
    a, b = _params(model), _params(again)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # Re-exporting into the same folder as a single file removes the stale index.
    models.save_pretrained(again, tmp_path, overwrite_source=True)
    assert not os.path.exists(os.path.join(tmp_path, "model.safetensors.index.json"))


def test_bf16_export(tmp_path):
    model = models.from_pretrained(os.path.join(DATA, "qwen2"), dtype=jnp.bfloat16)
    models.save_pretrained(model, tmp_path)
    with open(os.path.join(tmp_path, "config.json")) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="numpy") as f:
        assert str(f.get_tensor("model.norm.weight").dtype) == "bfloat16"
    again = models.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(again.embed_tokens[...]), np.asarray(model.embed_tokens[...])
    )


def test_layer_weights_are_stacked_and_unstack_into_the_hf_tensors():
    folder = os.path.join(DATA, "qwen2")
    model = models.from_pretrained(folder)
    theirs = _tensors(folder)
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    specs = models.tensor_specs(model.config)
    assert {spec.path for spec in specs} == set(ours)
    for spec in specs:
        param = np.asarray(ours[spec.path].get_value())
        if spec.layer is None:
            assert spec.path[0] != "layers"
        else:
            assert spec.hf_name.startswith(f"model.layers.{spec.layer}.")
            assert spec.path[0] == "layers" and param.shape[0] == model.config.num_layers
        np.testing.assert_array_equal(spec.to_hf(spec.select(param)), theirs[spec.hf_name])


@pytest.mark.parametrize("layers_axis", [None, "fsdp"])
def test_sharded_load_and_export_round_trip(tmp_path, layers_axis):
    """With a mesh every weight (layer weights assembled block by block) equals the unsharded
    load, also when the rules split the layers axis itself (each device then holds one layer);
    the export of the sharded model is the original checkpoint."""
    folder = os.path.join(DATA, "llama3")
    rules = tuple((n, layers_axis if n == "layers" else a) for n, a in shd.LOGICAL_RULES)
    mesh = shd.make_mesh({"fsdp": 2, "tensor": 4})
    model = models.from_pretrained(folder, mesh=mesh, rules=rules)
    q = model.layers.attn.q_proj[...]  # [L, D, N, H]: (layers, embed, heads, head_dim)
    held = {s.data.shape for s in q.addressable_shards}
    assert held == ({(1, 64, 1, 16)} if layers_axis else {(2, 32, 1, 16)})
    single = _params(models.from_pretrained(folder))
    for key, value in _params(model).items():
        np.testing.assert_array_equal(value, single[key], err_msg=str(key))
    models.save_pretrained(model, tmp_path)
    theirs, ours = _tensors(folder), _tensors(tmp_path)
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


# ----- live comparison with transformers (PyTorch) -----

LIVE_SCRIPT = """
import sys, numpy as np, torch, transformers
for folder, ids_path, out_path in zip(*[iter(sys.argv[1:])] * 3):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        np.save(out_path, model(torch.tensor(np.load(ids_path))).logits.float().numpy())
"""


def torch_logits(jobs, tmp_path):
    """transformers' logits for each (folder, ids): with this interpreter when torch is
    importable, else with the one named by OPDPLUS_TORCH_PYTHON, else skip."""
    if importlib.util.find_spec("torch") is not None:
        python = sys.executable
    elif os.environ.get("OPDPLUS_TORCH_PYTHON"):
        python = os.environ["OPDPLUS_TORCH_PYTHON"]
    else:
        pytest.skip("torch is not importable and OPDPLUS_TORCH_PYTHON is not set")
    args = []
    for i, (folder, ids) in enumerate(jobs):
        np.save(tmp_path / f"ids{i}.npy", ids)
        args += [str(folder), str(tmp_path / f"ids{i}.npy"), str(tmp_path / f"out{i}.npy")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([python, "-c", LIVE_SCRIPT, *args], check=True, env=env)
    return [np.load(tmp_path / f"out{i}.npy") for i in range(len(jobs))]


def test_transformers_loads_export_with_same_logits(tmp_path):
    """Export every family; transformers loads each export and gives our logits."""
    jobs, ours = [], []
    for family in FAMILIES:
        ref = np.load(os.path.join(DATA, family, "reference.npz"))
        model = models.from_pretrained(os.path.join(DATA, family))
        models.save_pretrained(model, tmp_path / family)
        jobs.append((tmp_path / family, ref["input_ids"]))
        ours.append(ref["logits"])  # our logits == these (test_models); compare the export to them
    for family, theirs, expected in zip(FAMILIES, torch_logits(jobs, tmp_path), ours, strict=True):
        np.testing.assert_allclose(theirs, expected, atol=TOL, rtol=0, err_msg=family)


# ----- bad input -----


def test_missing_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("family", "removed"),
    [("qwen2", "model.safetensors"), ("qwen3_sharded", "model-00002-of-00003.safetensors")],
)
def test_missing_weights_file_is_named(tmp_path, family, removed):
    folder = _copy(family, tmp_path / "m")
    os.remove(folder / removed)
    with pytest.raises(FileNotFoundError, match=re.escape(removed)):
        models.from_pretrained(folder)


def test_missing_tensor_names_file_and_tensor(tmp_path):
    folder = _without_tensor("qwen2", tmp_path / "m", "model.layers.1.self_attn.k_proj.bias")
    with pytest.raises(
        KeyError, match=r"m/model\.safetensors: missing.*model\.layers\.1\.self_attn\.k_proj\.bias"
    ):
        models.from_pretrained(folder)


def test_untied_checkpoint_without_lm_head(tmp_path):
    folder = _without_tensor("llama3", tmp_path / "m", "lm_head.weight")
    with pytest.raises(KeyError, match=r"lm_head\.weight"):
        models.from_pretrained(folder)


def test_shape_mismatch_names_file_and_tensor(tmp_path):
    folder = _copy("qwen3_untied", tmp_path / "m")
    with edited_json(folder / "config.json") as config:
        config["intermediate_size"] = 96
    with pytest.raises(ValueError, match=r"model\.safetensors.*model\.layers\.0\.mlp\.gate_proj"):
        models.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "header"])
def test_corrupt_safetensors_names_file(tmp_path, damage):
    folder = _copy("qwen2", tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if damage == "garbage":
        data = b"\x00\x01not a safetensors file" * 10
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = data[:8] + b"[garbage" + data[16:]  # invalid JSON header
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"model\.safetensors.*(corrupt|truncated|cannot read)"):
        models.from_pretrained(folder)


def test_sharded_index_listing_absent_tensor(tmp_path):
    folder = _copy("qwen3_sharded", tmp_path / "m")
    wrong = "model-00001-of-00003.safetensors"
    with edited_json(folder / "model.safetensors.index.json") as index:
        name = next(k for k, v in index["weight_map"].items() if v != wrong)
        index["weight_map"][name] = wrong
    with pytest.raises(KeyError, match=name.replace(".", r"\.")):
        models.from_pretrained(folder)


def test_loaded_arrays_are_committed_jax_arrays():
    model = models.from_pretrained(os.path.join(DATA, "qwen3_tied"))
    for value in jax.tree.leaves(nnx.state(model, nnx.Param)):
        assert isinstance(value, jax.Array) and value.dtype == jnp.float32
