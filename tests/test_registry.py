"""The Registry class, and one end-to-end test per pluggable piece: a newly registered entry is
usable by name wherever the built-in ones are. Every registration is removed after its test."""

import dataclasses
import random
from types import SimpleNamespace
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from opdplus_jax import divergences, estimators, losses, models, tasks, verifiers
from opdplus_jax.models import config as config_lib
from opdplus_jax.registry import Registry
from tests.test_models import hf_config


@pytest.fixture
def added():
    """`added(registry, name)`: removes `name` from `registry` when the test ends."""
    entries = []
    yield lambda registry, name: entries.append((registry, name))
    for registry, name in reversed(entries):
        if name in registry:
            registry.unregister(name)


# ----- the Registry class -----


def test_register_as_call_decorator_and_by_name_attribute():
    reg = Registry("widget")
    assert reg.register("b", 2) == 2

    @reg.register("a")
    def a():
        return 1

    @reg.register
    class C:
        name = "c"

    assert reg.get("a") is a and reg.get("b") == 2 and reg.get("c") is C
    assert reg.names() == ("a", "b", "c") and list(reg) == ["a", "b", "c"] and len(reg) == 3
    assert "a" in reg and "z" not in reg and ["unhashable"] not in reg
    assert repr(reg) == "Registry('widget': a, b, c)"


def test_duplicate_names_need_overwrite():
    reg = Registry("widget")
    reg.register("a", 1)
    with pytest.raises(ValueError, match=r"a widget named 'a' is already registered.*overwrite"):
        reg.register("a", 2)
    reg.register("a", 2, overwrite=True)
    assert reg.get("a") == 2


def test_unknown_name_lists_valid_names_and_suggests_the_closest():
    reg = Registry("widget")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    with pytest.raises(
        ValueError,
        match=r"^unknown widget 'alpah'; valid names: alpha, beta; did you mean 'alpha'\?$",
    ):
        reg.get("alpah")
    with pytest.raises(ValueError, match=r"^unknown widget 'zzz'; valid names: alpha, beta$"):
        reg.get("zzz")
    with pytest.raises(ValueError, match="unknown widget None"):
        reg.get(None)


def test_unregister():
    reg = Registry("widget")
    reg.register("a", 1)
    assert reg.unregister("a") == 1
    assert "a" not in reg and reg.names() == ()
    with pytest.raises(ValueError, match="unknown widget 'a'"):
        reg.unregister("a")


def test_objects_without_a_name_need_one():
    reg = Registry("widget")
    with pytest.raises(ValueError, match="no non-empty string attribute `name`"):
        reg.register(object())
    with pytest.raises(ValueError, match="non-empty name"):
        reg.register("", 1)


# ----- every pluggable piece, end to end -----


def _batch(seed=0, b=4, t=6):
    rng = np.random.default_rng(seed)
    ls = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
    lt = np.log(rng.uniform(0.05, 1.0, (b, t))).astype(np.float32)
    mask = (np.arange(t)[None] < rng.integers(1, t + 1, b)[:, None]).astype(np.float32)
    return ls, lt, mask


@dataclasses.dataclass(frozen=True)
class TwiceReverseKL(divergences.Divergence):
    """2 KL(pi||q): f(u) = -2 log u, w = 2 (log u - 1)."""

    name: ClassVar[str] = "test_twice_reverse_kl"
    formula: ClassVar[str] = "2 sum pi log(pi/q)"

    def _f(self, x):
        return -2.0 * x

    def _opd_plus(self, x):
        return 2.0 * x - 2.0


def test_new_divergence_is_usable_by_advantages(added):
    added(divergences.REGISTRY, TwiceReverseKL.name)
    divergences.register(TwiceReverseKL)
    assert TwiceReverseKL.name in divergences.names()
    assert divergences.get(TwiceReverseKL.name) == TwiceReverseKL()
    ls, lt, mask = _batch()
    for correction in estimators.CORRECTIONS:
        kw = {"correction": correction, "discount": 0.5}
        got = estimators.advantages(ls, lt, mask, divergence=TwiceReverseKL.name, **kw)
        want = 2.0 * estimators.advantages(ls, lt, mask, divergence="reverse_kl", **kw)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_new_correction_is_usable_by_advantages(added):
    added(estimators.CORRECTIONS, "test_half_opd_plus")

    @estimators.CORRECTIONS.register("test_half_opd_plus")
    def half(divergence, log_u):
        return 0.5 * divergence.opd_plus_advantage(log_u)

    ls, lt, mask = _batch()
    kw = {"divergence": "jsd", "level": "sequence"}
    got = estimators.advantages(ls, lt, mask, correction="test_half_opd_plus", **kw)
    want = 0.5 * estimators.advantages(ls, lt, mask, correction="opd_plus", **kw)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_new_aggregation_is_usable_by_pg_loss(added):
    added(losses.AGGREGATIONS, "test_token_sum")

    @losses.AGGREGATIONS.register("test_token_sum")
    def token_sum(terms, fm, max_len):
        """Normaliser 1."""
        return terms.sum()

    logp, adv, mask = _batch()
    got = losses.pg_loss(jnp.asarray(logp), jnp.asarray(adv), mask, aggregation="test_token_sum")
    assert float(got) == pytest.approx(float(np.sum(-adv * mask)), rel=1e-6)


def test_new_baseline_is_usable_by_group_baseline(added):
    added(estimators.BASELINES, "test_first")

    @estimators.BASELINES.register("test_first")
    def first(adv, fm, eps):
        """b = the group's first sample (not an unbiased baseline; a test of the plumbing)."""
        return adv - adv[:, :1]

    adv = np.arange(12, dtype=np.float32).reshape(4, 3)
    mask = np.ones_like(adv)
    got = estimators.group_baseline(adv, mask, 2, kind="test_first")
    np.testing.assert_array_equal(got, adv - np.repeat(adv[::2], 2, axis=0))


def test_new_verifier_is_used_for_its_domain(added):
    added(verifiers.VERIFIERS, "test_domain")
    verifiers.register("test_domain", lambda text, example: float("yes" in text))
    example = {"answer": "42", "domain": "test_domain"}
    assert verifiers.resolve(example)[0] == "test_domain"
    scores, stats = verifiers.batch_verify(["yes", "no"], [example, example])
    np.testing.assert_array_equal(scores, [1.0, 0.0])
    assert stats.by_key["test_domain"]["calls"] == 2


@dataclasses.dataclass(frozen=True)
class Echo(tasks.Task):
    """Repeat a number."""

    name: ClassVar[str] = "test_echo"
    domain: ClassVar[str] = "test"
    max_value: int = 999

    def sample(self, rng: random.Random) -> tasks.Example:
        n = str(rng.randint(0, self.max_value))
        return self.example(f"Echo {n}", n, f"#### {n}")


def test_new_task_is_usable_by_get_generate_and_verify(added):
    added(tasks.TASKS, Echo.name)
    tasks.TASKS.register(Echo)
    assert Echo.name in tasks.names() and tasks.knobs(Echo.name)["max_value"] == 999
    train = tasks.get(Echo.name, max_value=50).generate("train", 5, seed=1)
    assert len({ex.prompt for ex in train}) == 5 and all(ex.task == Echo.name for ex in train)
    assert verifiers.resolve(train[0])[0] == Echo.name
    assert verifiers.verify(train[0].solution, train[0]) == 1.0
    assert verifiers.verify("#### x", train[0]) == 0.0


def _hf_config(model_type, **overrides):
    return SimpleNamespace(**hf_config(model_type=model_type, **overrides))


def test_new_model_family_row_parses_configs(added):
    added(models.FAMILIES, "test_qwen3_copy")
    row = dataclasses.replace(models.FAMILIES.get("qwen3"), model_type="test_qwen3_copy")
    models.FAMILIES.register(row)
    cfg = config_lib.config_from_hf(_hf_config("test_qwen3_copy", attention_bias=True))
    assert cfg.family is row and cfg.model_type == "test_qwen3_copy"
    assert (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.qk_norm) == (True, True, False, True)
    exported = cfg.hf_config_dict()
    assert exported["architectures"] == ["Qwen3ForCausalLM"] and exported["attention_bias"]
    with pytest.raises(NotImplementedError, match=r"^here: unknown model_type 'qwen33'.*'qwen3'"):
        config_lib.config_from_hf(_hf_config("qwen33"), where="here")


def test_new_model_family_row_loads_with_from_pretrained(added, tmp_path):
    import transformers

    class CopyConfig(transformers.Qwen3Config):
        model_type = "test_qwen3_copy"

    # transformers must know the model_type too: it parses and writes config.json.
    transformers.AutoConfig.register("test_qwen3_copy", CopyConfig, exist_ok=True)
    added(models.FAMILIES, "test_qwen3_copy")
    models.FAMILIES.register(
        dataclasses.replace(models.FAMILIES.get("qwen3"), model_type="test_qwen3_copy")
    )
    shape = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4}
    qwen3 = models.qwen3_config(**shape, num_kv_heads=2)
    copy = dataclasses.replace(qwen3, model_type="test_qwen3_copy")
    models.random_checkpoint(tmp_path / "qwen3", qwen3, seed=0)
    models.random_checkpoint(tmp_path / "copy", copy, seed=0)
    loaded, reference = (models.from_pretrained(tmp_path / n) for n in ("copy", "qwen3"))
    assert loaded.config.model_type == "test_qwen3_copy"
    assert loaded.config == dataclasses.replace(reference.config, model_type="test_qwen3_copy")
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    np.testing.assert_array_equal(loaded(tokens), reference(tokens))
    params = jax.tree.leaves(nnx.state(loaded, nnx.Param))
    assert sum(x.size for x in params) == copy.num_params()


def test_readme_extension_example_runs(added):
    """The README's "Extending" snippet registers working entries."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Extending", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    added(divergences.REGISTRY, "twice_reverse_kl")
    added(losses.AGGREGATIONS, "token_sum")
    added(estimators.BASELINES, "half_loo")
    exec(compile(code, "README.md", "exec"), {})
    ls, lt, mask = _batch()
    got = estimators.advantages(ls, lt, mask, divergence="twice_reverse_kl", correction="opd_plus")
    want = 2.0 * estimators.advantages(ls, lt, mask, divergence="reverse_kl")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    loss = losses.pg_loss(jnp.asarray(ls), jnp.asarray(lt), mask, aggregation="token_sum")
    assert float(loss) == pytest.approx(float(np.sum(-lt * mask)), rel=1e-6)
    adv = np.arange(8, dtype=np.float32).reshape(4, 2)
    half = estimators.group_baseline(adv, np.ones_like(adv), 2, kind="half_loo")
    loo = estimators.group_baseline(adv, np.ones_like(adv), 2, kind="loo")
    np.testing.assert_allclose(half, 0.5 * (adv + loo))
