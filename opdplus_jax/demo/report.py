"""The demo's evaluation (greedy accuracy, KL to the teacher), plots and printed table."""

from __future__ import annotations

import os
from typing import Any

import jax

from opdplus_jax import evaluation, metrics, scoring, trainer
from opdplus_jax.rollout import SamplingParams, StaticEngine
from opdplus_jax.tokenizer import Tokenizer


def _log(msg: str) -> None:
    print(msg, flush=True)


def evaluate_model(model, tok: Tokenizer, config, teacher=None) -> dict[str, float]:
    """Greedy held-out accuracy (as the trainer's eval); with `teacher`, also KL(model ||
    teacher) per token: k1 on the model's own samples at temperature 1, as the trainer's
    `kl_per_token`."""
    examples, prompts = trainer.eval_set(config, tok)
    length = {"max_new_tokens": config.eval.max_new_tokens}
    greedy, params = StaticEngine.for_model(
        model, SamplingParams.for_tokenizer(tok, temperature=0.0, **length)
    )
    kw = {"batch_size": config.eval.batch_size}
    out = evaluation.evaluate_policy(greedy, params, tok, examples, prompts, **kw)
    result = {"accuracy": out["accuracy"], "num_problems": len(examples)}
    if teacher is not None:
        sampled = evaluation.evaluate_policy(
            StaticEngine(greedy.graphdef, SamplingParams.for_tokenizer(tok, **length)),
            params,
            tok,
            examples,
            prompts,
            rng=jax.random.key(config.seed),
            teacher_logprobs=lambda r: scoring.rollout_logprobs(
                teacher, r, vocab_size=tok.vocab_size
            ),
            **kw,
        )
        result["kl_per_token"] = sampled["kl_per_token"]
        result["sampled_accuracy"] = sampled["accuracy"]
    return result


def write_plots(workdir: str, base_acc: float, teacher_acc: float, label: str = "") -> list[str]:
    """accuracy_vs_step.png and divergence_vs_step.png from `workdir/metrics.jsonl`; `label`
    (e.g. "opd_plus, jsd") goes into the titles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    evals = metrics.read_jsonl(workdir, split="eval")
    train = [r for r in metrics.read_jsonl(workdir, split="train") if r.get("kl_per_token")]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in evals], [r["accuracy"] for r in evals], "o-", label="student")
    ax.axhline(teacher_acc, color="tab:green", ls="--", label="teacher")
    ax.axhline(base_acc, color="tab:red", ls=":", label="base (student at step 0)")
    ax.set(xlabel="OPD step", ylabel="held-out accuracy (greedy)", ylim=(-0.02, 1.02))
    ax.set_title(
        f"On-policy distillation ({label}): accuracy" if label else "On-policy distillation"
    )
    ax.legend(loc="lower right")
    paths = [os.path.join(workdir, "accuracy_vs_step.png")]
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    steps, kl = [r["step"] for r in train], [r["kl_per_token"] for r in train]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, kl, ".", alpha=0.5, label="per step")
    k = 5
    if len(kl) >= k:
        smooth = [sum(kl[i - k + 1 : i + 1]) / k for i in range(k - 1, len(kl))]
        ax.plot(steps[k - 1 :], smooth, "-", lw=2, label=f"mean of {k} steps")
    ax.set(xlabel="OPD step", ylabel="KL(student || teacher) per token", ylim=(0, None))
    ax.set_title("On the student's rollouts (k1 estimate)")
    ax.legend()
    paths.append(os.path.join(workdir, "divergence_vs_step.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def format_table(summary: dict[str, Any]) -> str:
    acc, kl = summary["accuracy"], summary["kl_per_token"]
    base = "small base" if summary["preset"] == "strong_to_weak" else "base"
    rows = [
        f"{'model':<12} {'accuracy':>9} {'KL(model || teacher)/token':>27}",
        f"{base:<12} {acc['base']:>9.3f} {kl['base']:>27.4f}",
        f"{'teacher':<12} {acc['teacher']:>9.3f} {'0':>27}",
        f"{'student':<12} {acc['student']:>9.3f} {kl['student']:>27.4f}",
        f"accuracy: greedy, {summary['num_eval_problems']} held-out problems; KL: k1 estimate "
        "on the model's own samples (temperature 1)",
        "",
        f"{'stage':<12} {'seconds':>8}",
    ]
    for stage, sec in summary["seconds"].items():
        built = summary["built_seconds"].get(stage)
        note = f"  (cached; built in {built:.0f} s)" if stage in summary["cached"] else ""
        rows.append(f"{stage:<12} {sec:>8.1f}{note}")
    return "\n".join(rows)
