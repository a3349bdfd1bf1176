"""Tests for opdplus_jax.analysis.audit: the bias audit of a training config (opdplus-audit)."""

import json
import math

import pytest

from opdplus_jax import divergences
from opdplus_jax.analysis import audit
from opdplus_jax.configs import default

CONFIG_FILE = "configs/default.py"


@pytest.mark.parametrize(
    "name, c",
    [("reverse_kl", 0.0), ("jsd", 0.5 * math.log(2)), ("tv", 0.5), ("hellinger", 1.0),
     ("forward_kl", None)],
)  # fmt: skip
def test_the_sublinear_gauge_of_each_generator(name, c):
    got = divergences.sublinear_gauge(divergences.get(name))
    assert (got is None) if c is None else got == pytest.approx(c, abs=1e-6)


def _rows(config, **kw):
    return {r["name"]: r for r in audit.audit(config, **kw)}


def test_jsd_stop_grad_follows_the_gradient_only_in_the_sublinear_gauge():
    config = default.get_config("cpu")
    config.estimator.divergence, config.estimator.correction = "jsd", "stop_grad"
    rows = _rows(config)
    configured = [r for r in rows.values() if r["configured"]]
    assert [r["name"] for r in configured] == ["configured"]
    assert configured[0]["correction"] == "stop_grad" and configured[0]["gauge"] is None
    assert rows["opd_plus"]["relative_bias"] < 1e-6 and rows["opd_plus"]["cosine"] > 0.999999
    registered = rows["stop_grad, registered gauge"]
    gauged = rows["stop_grad, sublinear gauge c=0.3466"]
    # Token level, gamma = 0, seed 0, V = T = 3: the registered gauge points against the
    # myopic gradient; the sublinear one along it, still biased.
    assert registered["cosine"] < -0.5 and gauged["cosine"] > 0.99
    assert 0.1 < gauged["relative_bias"] < registered["relative_bias"]
    assert gauged["target"].startswith("myopic gradient")


def test_the_cli_prints_one_json_object_per_row(capsys):
    audit.main(["opdplus-audit", f"--config={CONFIG_FILE}:cpu", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    keys = {"name", "correction", "gauge", "relative_bias", "variance", "cosine", "target",
            "configured"}  # fmt: skip
    assert all(keys <= set(r) for r in rows) and sum(r["configured"] for r in rows) == 1
    names = {r["name"] for r in rows}
    assert {"opd_plus", "stop_grad, registered gauge", "baseline=loo"} <= names
    assert sum(n.startswith("peer: ") for n in names) == 4
    audit.main(["opdplus-audit", f"--config={CONFIG_FILE}:cpu"])
    table = capsys.readouterr().out
    assert "**(configured)**" in table and "| estimator |" in table


def test_a_bad_config_is_refused_in_plain_words():
    with pytest.raises(SystemExit, match="--config"):
        audit.main(["opdplus-audit"])
    with pytest.raises(SystemExit, match="divergence"):
        audit.main(["opdplus-audit", f"--config={CONFIG_FILE}:cpu",
                    "--config.estimator.divergence=nope"])  # fmt: skip


def test_a_full_vocabulary_support_is_audited_as_configured():
    """estimator.support reaches the audit: full is exact, a teacher top-k support of fewer
    tokens than the vocabulary is biased, and the sampled alternative is listed."""
    config = default.get_config("cpu")
    config.estimator.support = "full"
    rows = _rows(config)
    assert rows["configured"]["correction"] == "opd_plus (full vocabulary)"
    assert rows["configured"]["relative_bias"] < 1e-9
    assert "support=sampled" in rows and "support=full" not in rows
    config.estimator.support, config.estimator.top_k = "teacher_topk", 1
    config.estimator.tail = "renormalize"
    rows = _rows(config)
    assert (
        rows["configured"]["relative_bias"] > 0.1 and rows["support=full"]["relative_bias"] < 1e-9
    )
    config.estimator.top_k = 50  # more than the problem's 3 tokens: the whole vocabulary
    assert _rows(config)["configured"]["relative_bias"] < 1e-9


def test_a_configured_gauge_is_audited():
    config = default.get_config("cpu")
    config.estimator.correction, config.estimator.gauge = "stop_grad", "sublinear"
    rows = _rows(config)
    gauged = rows["stop_grad, sublinear gauge c=0.3466"]
    assert rows["configured"]["gauge"] == pytest.approx(gauged["gauge"])
    assert rows["configured"]["relative_bias"] == pytest.approx(gauged["relative_bias"])
    assert rows["stop_grad, registered gauge"]["gauge"] is None
