"""Mesh construction, logical-axis rules, and the model on 8 fake CPU devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from opdplus_jax import models
from opdplus_jax import sharding as shd

DATA = os.path.join(os.path.dirname(__file__), "testdata", "models")
LAYOUTS = [{"fsdp": 8}, {"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}]


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize(
    ("shape", "sizes"),
    [
        (None, (1, 8, 1)),
        ({"fsdp": 4, "tensor": 2}, (1, 4, 2)),
        ({"data": 2, "fsdp": -1}, (2, 4, 1)),
        (shd.ShardingConfig(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    ],
)
def test_make_mesh(shape, sizes):
    mesh = shd.make_mesh(shape)
    assert mesh.axis_names == shd.MESH_AXES
    assert tuple(mesh.shape[a] for a in shd.MESH_AXES) == sizes


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"fsdp": 3}, "3 devices"),
        ({"model": 8}, "unknown mesh axes"),
        ({"fsdp": -1, "tensor": -1}, "at most one"),
        ({"fsdp": -1, "tensor": 3}, "not divisible"),
    ],
)
def test_make_mesh_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        shd.make_mesh(shape)


def test_logical_to_spec_rules_and_divisibility():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    assert shd.logical_to_spec(("embed", "heads", "head_dim")) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("embed", "heads"), mesh=mesh, shape=(64, 4)) == P("fsdp", "tensor")
    # 3 heads do not split over tensor=2: that dimension is replicated instead.
    assert shd.logical_to_spec(("embed", "heads"), mesh=mesh, shape=(64, 3)) == P("fsdp")
    # size-1 mesh axes are dropped; batch maps to (data, fsdp).
    assert shd.logical_to_spec(("batch", "length"), mesh=mesh, shape=(8, 5)) == P("fsdp")
    assert shd.logical_to_spec(("batch",)) == P(("data", "fsdp"))
    # A mesh axis is used at most once per array.
    assert shd.logical_to_spec(("embed", "embed"), mesh=mesh, shape=(8, 8)) == P("fsdp")
    assert shd.logical_to_spec(("norm",)) == P()


def test_shard_batch():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    batch = shd.shard_batch({"ids": np.arange(32).reshape(8, 4), "n": np.int32(3)}, mesh)
    assert batch["ids"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in batch["ids"].addressable_shards} == {(2, 4)}
    np.testing.assert_array_equal(np.asarray(batch["ids"]), np.arange(32).reshape(8, 4))
    with pytest.raises(ValueError, match="not divisible"):
        shd.shard_batch(np.zeros((3, 2)), mesh)


@pytest.fixture(scope="module")
def reference():
    path = os.path.join(DATA, "qwen2")
    ref = dict(np.load(os.path.join(path, "reference.npz")))
    model = models.from_pretrained(path)
    # Batch of 8 (divisible by every layout's data x fsdp): the padded batch tiled.
    ids = np.tile(ref["padded_input_ids"], (3, 1))[:8]
    mask = np.tile(ref["padded_attention_mask"], (3, 1))[:8]
    logits = np.asarray(_forward(model)(model_params(model), ids, mask))
    return path, ids, mask, logits


def model_params(model):
    return nnx.split(model)[1]


def _forward(model):
    graphdef = nnx.split(model)[0]
    return jax.jit(
        lambda params, ids, mask: nnx.merge(graphdef, params)(ids, attention_mask_BL=mask)
    )


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda s: "x".join(f"{k}{v}" for k, v in s.items()))
def test_sharded_forward_equals_single_device(reference, layout):
    path, ids, mask, expected = reference
    mesh = shd.make_mesh(layout)
    model = models.from_pretrained(path, mesh=mesh)
    batch = shd.shard_batch({"ids": ids, "mask": mask}, mesh)
    logits = _forward(model)(model_params(model), batch["ids"], batch["mask"])
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)
    # The parameters are really split: each device holds 1/n of a sharded weight.
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    gate = model.layers.mlp.gate_proj[...]  # [L, D, F]: (layers, embed -> fsdp, mlp -> tensor)
    assert gate.sharding.spec == (P(None, "fsdp", "tensor") if tensor > 1 else P(None, "fsdp"))
    assert {s.data.shape for s in gate.addressable_shards} == {(2, 64 // fsdp, 128 // tensor)}
    assert len(gate.addressable_shards) == 8
    q = model.layers.attn.q_proj[...]  # [L, D, N, H]
    assert {s.data.shape for s in q.addressable_shards} == {(2, 64 // fsdp, 4 // tensor, 16)}
    embed = model.embed_tokens[...]  # [V, D]: vocab -> tensor, embed -> fsdp
    assert {s.data.size for s in embed.addressable_shards} == {embed.size // (fsdp * tensor)}
    if fsdp * tensor == 8:
        distinct = {s.index for s in gate.addressable_shards}
        assert len(distinct) == 8  # no two devices hold the same block
    # Norm scales are replicated.
    assert model.norm[...].sharding.spec == P()


def test_sharded_cached_decode_equals_single_device(reference):
    path, ids, mask, expected = reference
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    model = models.from_pretrained(path, mesh=mesh)
    batch, length = ids.shape
    cache = model.init_cache(batch, length)
    assert cache["k"].sharding.spec == P(None, "fsdp", "tensor")
    graphdef, params = nnx.split(model)

    @jax.jit
    def decode(params, tokens, positions, cache, write_index, kv_mask):
        return nnx.merge(graphdef, params).decode(tokens, positions, cache, write_index, kv_mask)

    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    kv_mask = np.zeros((batch, length), bool)
    kv_mask[:, :8] = mask[:, :8]
    logits, cache = decode(params, ids[:, :8], positions[:, :8], cache, jnp.int32(0), kv_mask)
    steps = [np.asarray(logits)]
    for t in range(8, length):
        kv_mask[:, t] = mask[:, t]
        step = (ids[:, t : t + 1], positions[:, t : t + 1], cache, jnp.int32(t), kv_mask)
        logits, cache = decode(params, *step)
        steps.append(np.asarray(logits))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.concatenate(steps, axis=1)[real], expected[real], atol=1e-5)


def test_param_shardings_tree_matches_state():
    mesh = shd.make_mesh({"fsdp": 4, "tensor": 2})
    cfg = models.load_config(os.path.join(DATA, "llama3"))
    abstract = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0)))
    shardings = shd.param_shardings(abstract, mesh)
    flat = dict(nnx.to_flat_state(shardings))
    assert flat[("lm_head",)].get_value().spec == P("fsdp", "tensor")
    assert flat[("layers", "attn", "o_proj")].get_value().spec == P(None, "tensor", None, "fsdp")
    assert shd.logical_axes_of(nnx.state(abstract)["norm"]) == ("norm",)


def test_shard_module_in_place():
    mesh = shd.make_mesh({"fsdp": 8})
    model = models.from_pretrained(os.path.join(DATA, "qwen3_tied"))
    shd.shard_module(model, mesh)
    assert model.embed_tokens[...].sharding.spec == P(None, "fsdp")
