"""LoRA students (`opdplus_jax.lora`): qwix adapters on the scanned layer stack, the trainable
split, the merge into a plain CausalLM and its Hugging Face export."""

import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from opdplus_jax import lora, models, sampling, scoring
from opdplus_jax import sharding as shd
from opdplus_jax.models.transformer import CausalLM

# qwix still reads `.value` and `nnx.VariableState`, which this flax deprecates.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:qwix.*")

DATA = os.path.join(os.path.dirname(__file__), "testdata", "models")
SPEC = lora.LoraSpec(rank=4, alpha=8.0)
# Left-padded rows longer than the attention chunk (4): the chunked attention path runs too.
TOKENS = jnp.array([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]], jnp.int32)
MASK = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], jnp.int32)
PROMPT, PROMPT_MASK = TOKENS[:, :4], MASK[:, :4]
COMPLETION, COMPLETION_MASK = TOKENS[:, 4:], MASK[:, 4:]


def tiny(family: str = "qwen3_tied", **kwargs) -> CausalLM:
    """A 2-layer random model of tests/testdata/models (qwen3_tied: Qwen3, tied embeddings),
    with attention chunks of 4 queries."""
    return models.from_pretrained(os.path.join(DATA, family), attention_chunk_size=4, **kwargs)


def projection_sizes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one layer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }  # fmt: skip


def perturbed(model: CausalLM, seed: int = 1, scale: float = 0.3) -> CausalLM:
    """`model` with N(0, scale) noise added to every adapter (a stand-in for training)."""
    graphdef, adapters, frozen, rest = lora.split_trainable(model)
    gen = np.random.default_rng(seed)
    noisy = jax.tree.map(lambda x: x + scale * gen.standard_normal(x.shape, np.float32), adapters)
    return nnx.merge(graphdef, noisy, frozen, rest)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, rest, tokens, mask):
    return nnx.merge(graphdef, params, rest)(tokens, attention_mask_BL=mask)


def logits(model) -> np.ndarray:
    """The full forward inside `jax.jit`, from the scoring split (graphdef static)."""
    return np.asarray(forward(*scoring.split_model(model), TOKENS, MASK))


def logprobs(model) -> np.ndarray:
    return np.asarray(
        scoring.token_logprobs(model, PROMPT, PROMPT_MASK, COMPLETION, COMPLETION_MASK)
    )


@pytest.fixture(scope="module")
def base():
    return tiny()


@pytest.fixture(scope="module")
def adapted(base):
    return lora.apply(base, SPEC, rng=0)


@pytest.fixture(scope="module")
def trained(adapted):
    return perturbed(adapted)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0, "alpha": 1.0}, "rank must be an int >= 1"),
        ({"rank": 2.0, "alpha": 1.0}, "rank must be an int >= 1"),
        ({"rank": True, "alpha": 1.0}, "rank must be an int >= 1"),
        ({"rank": 2, "alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": "16"}, "alpha must be a finite number > 0"),
        ({"rank": 2, "alpha": 4.0, "targets": ()}, "targets is empty"),
        ({"rank": 2, "alpha": 4.0, "targets": "layers/attn"}, "tuple of module-path regexes"),
        ({"rank": 2, "alpha": 4.0, "targets": ("layers/(attn",)}, "not a valid regex"),
        ({"rank": 2, "alpha": 4.0, "targets": (3,)}, "is not a string"),
    ],
)
def test_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraSpec(**kwargs)


def test_spec_targets_are_module_path_regexes():
    assert SPEC.targets == ("layers/attn", "layers/mlp") and SPEC.scale == 2.0
    assert lora.LoraSpec(rank=2, alpha=4.0, targets=[".*"]).modules() == SPEC.modules()
    assert lora.LoraSpec(rank=2, alpha=4.0, targets=(".*mlp",)).modules() == ("layers/mlp",)


def test_a_target_that_matches_no_module_lists_the_adaptable_ones(base):
    spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("layers/attn", "q_proj"))
    with pytest.raises(ValueError, match="'q_proj' matches no adaptable module") as e:
        lora.apply(base, spec, rng=0)
    for name in ("'layers/attn'", "'layers/mlp'", "o_proj", "gate_proj", "down_proj"):
        assert name in str(e.value)


def test_misuse_is_refused(base, adapted):
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply(adapted, SPEC, rng=0)
    with pytest.raises(TypeError, match=r"lora\.LoraSpec"):
        lora.apply(base, {"rank": 4}, rng=0)
    with pytest.raises(TypeError, match="CausalLM"):
        lora.apply(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), SPEC, rng=0)
    for fn in (lora.merge, lora.split_trainable):
        with pytest.raises(ValueError, match="has no LoRA adapters"):
            fn(base)
    with jax.disable_jit(), pytest.raises(RuntimeError, match=r"jax\.disable_jit"):
        adapted(TOKENS)


def test_fresh_adapters_give_the_base_model(base, adapted):
    assert lora.is_adapted(adapted) and not lora.is_adapted(base)
    for path, value in nnx.to_flat_state(nnx.state(adapted, lora.TRAINABLE)):
        b_side = path[-1].endswith("_lora_b")
        assert bool(jnp.all(value[...] == 0)) == b_side, path  # B = 0, A random
    # The adapters add exact zeros; the compiled program differs only in XLA's fusion.
    chex.assert_trees_all_close(logits(adapted), logits(base), atol=1e-6, rtol=0)


def test_the_filter_selects_exactly_the_adapters(base, adapted):
    _, adapters, frozen, rest = lora.split_trainable(adapted)
    sizes = projection_sizes(base.config)
    flat = dict(nnx.to_flat_state(adapters))
    expected = {
        ("layers", module, f"{weight}_lora_{side}")
        for module, weights in (("attn", list(sizes)[:4]), ("mlp", list(sizes)[4:]))
        for weight in weights
        for side in "ab"
    }
    assert set(flat) == expected
    assert all(isinstance(v, nnx.LoRAParam) for v in flat.values())
    # The frozen part is the base model's parameters, untouched (the same arrays).
    chex.assert_trees_all_equal(nnx.to_pure_dict(frozen), nnx.to_pure_dict(nnx.state(base)))
    assert not jax.tree.leaves(rest)
    # rank * (in + out) per adapted projection and layer.
    count = base.config.num_layers * SPEC.rank * sum(i + o for i, o in sizes.values())
    assert lora.num_adapter_params(adapted) == count == 8192
    assert sum(x.size for x in jax.tree.leaves(adapters)) == count
    # The scoring split carries the adapters with the weights (LoRAParam is a Param).
    _, params, _ = scoring.split_model(adapted)
    assert len(jax.tree.leaves(params)) == len(jax.tree.leaves(frozen)) + len(flat)
    assert lora.num_adapter_params(base) == 0

    attention_only = lora.apply(base, lora.LoraSpec(rank=2, alpha=4.0, targets=(".*attn",)), rng=1)
    attn = sum(sum(sizes[w]) for w in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert lora.num_adapter_params(attention_only) == base.config.num_layers * 2 * attn


def test_merged_model_matches_the_adapted_one(base, trained):
    merged = lora.merge(trained)
    assert not lora.is_adapted(merged) and lora.num_adapter_params(merged) == 0
    # A plain CausalLM: the base model's graphdef, so its compiled functions serve it too.
    assert nnx.graphdef(merged) == nnx.graphdef(base)
    assert np.abs(logits(trained) - logits(base)).max() > 0.1  # the adapters matter
    chex.assert_trees_all_close(logits(merged), logits(trained), atol=2e-5, rtol=2e-5)
    chex.assert_trees_all_close(logprobs(merged), logprobs(trained), atol=2e-5, rtol=2e-5)
    # The sampler's cached decode runs the adapters too: its log-probs are the merged model's.
    out = sampling.generate(trained, [[5, 6, 7], [8, 9]], max_new_tokens=5, temperature=0.0)
    ref = scoring.token_logprobs(merged, out.prompt_tokens, out.prompt_mask, out.tokens, out.mask)
    chex.assert_trees_all_close(out.logprobs, ref, atol=2e-5, rtol=2e-5)


def test_scale_is_alpha_over_rank(base, trained):
    """W + (alpha / rank) * A @ B, recomputed here for one projection of one layer."""
    merged = lora.merge(trained)
    attn = trained.layers.attn
    a, b = attn.o_proj_lora_a[1], attn.o_proj_lora_b[1]  # layer 1: [K, G, H, r], [r, D]
    delta = SPEC.alpha / SPEC.rank * (a.reshape(-1, SPEC.rank) @ b)
    want = base.layers.attn.o_proj[1] + delta.reshape(base.layers.attn.o_proj.shape[1:])
    chex.assert_trees_all_close(merged.layers.attn.o_proj[1], want, atol=1e-6, rtol=1e-6)


def test_gradients_and_updates_touch_only_the_adapters(base, adapted):
    graphdef, adapters, frozen, rest = lora.split_trainable(adapted)

    @jax.jit
    def loss_and_grad(adapters):
        def loss(adapters):
            model = nnx.merge(graphdef, adapters, frozen, rest)
            lp = scoring.completion_logprobs(
                model, PROMPT, PROMPT_MASK, COMPLETION, COMPLETION_MASK
            )
            return -lp.sum()

        return jax.value_and_grad(loss)(adapters)

    loss0, grads = loss_and_grad(adapters)
    for path, g in nnx.to_flat_state(grads):
        # B = 0 at the start, so only B gets a gradient (dL/dA carries a factor B).
        assert (float(jnp.abs(g[...]).max()) > 0) == path[-1].endswith("_lora_b"), path
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapters)
    assert (
        sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * lora.num_adapter_params(adapted) + 1
    )  # Adam's two moments of the adapters, and its step count

    @jax.jit
    def step(grads, opt_state, adapters):
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates)

    new = step(grads, opt_state, adapters)
    model = nnx.merge(graphdef, new, frozen, rest)
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(model, nnx.Not(lora.TRAINABLE))),
        nnx.to_pure_dict(nnx.state(base)),
    )
    assert float(loss_and_grad(new)[0]) < float(loss0)


def test_merged_model_exports_and_reloads(tmp_path):
    base = tiny("qwen2")  # untied embeddings, q/k/v biases
    trained = perturbed(lora.apply(base, lora.LoraSpec(rank=2, alpha=3.0), rng=2), seed=3)
    merged = lora.merge(trained)
    models.save_pretrained(merged, tmp_path)
    reloaded = models.from_pretrained(tmp_path)
    chex.assert_trees_all_equal(
        nnx.to_pure_dict(nnx.state(reloaded)), nnx.to_pure_dict(nnx.state(merged))
    )
    chex.assert_trees_all_close(logits(reloaded), logits(trained), atol=2e-5, rtol=2e-5)


def test_adapters_are_replicated_on_the_weights_mesh(trained):
    mesh = shd.make_mesh({"fsdp": 2, "tensor": 4})
    sharded = tiny(mesh=mesh)
    adapted = lora.apply(sharded, SPEC, rng=0)
    for _, value in nnx.to_flat_state(nnx.state(adapted, lora.TRAINABLE)):
        assert value.get_metadata()["out_sharding"][0] == "layers"
        assert value[...].sharding == shd.named_sharding(mesh)
    # The same seeds give the same adapters as the unsharded model's, and the same log-probs.
    chex.assert_trees_all_close(
        logprobs(perturbed(adapted)), logprobs(trained), atol=2e-5, rtol=2e-5
    )
