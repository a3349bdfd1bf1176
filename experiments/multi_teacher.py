"""(d) Multi-teacher merging: an arithmetic teacher and a tool-use teacher into one student.

    python -m experiments.multi_teacher [--quick] [--seeds 5] [--out DIR] [--cache_dir DIR]

Models (SFT, cached in `<cache_dir>/multi_teacher` with the demo's stage keys): a base trained
from random weights on both domains with sloppy solutions (60% of the 2-digit additions forget
every carry, as in the demo; 60% of the tool calls name `add` whatever the question asks), then
one teacher per domain = the base with more SFT on that domain's clean solutions only. The
student starts from the base; every training prompt is routed to its domain's teacher by the
`teacher` field. OPD: λ = 1 for both teachers; ExOPD: λ = 1.25 with reference = the base
(the student's initial weights). Estimator: the cpu preset's OPD+ JSD, token level, γ = 0.
Per domain: greedy held-out accuracy and KL(model ‖ that domain's teacher) per token; ExOPD
minus OPD paired by seed with 95% t intervals. One build of the models serves every seed (the
seed varies the prompt order and rollouts). Writes experiments/results/multi_teacher/.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time

from experiments import common, outputs
from opdplus_jax import configs, demo, models, tasks
from opdplus_jax.tasks import tokenizer as task_tokenizer
from opdplus_jax.tasks.tool_use import format_call
from opdplus_jax.tokenizer import Tokenizer

NAME = "multi_teacher"
DOMAINS = ("arithmetic", "tool_use")
TOOLS = ("add", "sub", "mul", "max", "min")  # integer tools: calls of at most 49 tokens
SLOPPY_FRACTION = 0.6
NUM_TRAIN, NUM_TEST = 3000, 200  # per domain
# Full scale: base 500 SFT steps on the mix, each teacher 200 more on its clean domain.
SETTINGS = dataclasses.replace(demo.Settings(), seq_len=96, base_steps=500, teacher_steps=200)
QUICK = dataclasses.replace(common.QUICK_SETTINGS, seq_len=96)
FULL = {"train.num_steps": 30, "train.eval_every": 5, "data.batch_size": 32}
LENGTHS = {"rollout.max_new_tokens": 52, "rollout.max_prompt_len": 40, "eval.max_new_tokens": 52}


def _sloppy_call(ex: tasks.Example) -> tasks.Example:
    """The same call with the tool name replaced by `add` (right for sums, wrong otherwise)."""
    tool, args = tasks.parse_call(ex.solution)
    solution = format_call("add", args)
    return dataclasses.replace(ex, solution=solution, answer=str(tool.fn(**args)))


def build_data(cache: str, s: demo.Settings, quick: bool) -> dict:
    """Tokenizer, clean per-domain and mixed train/test files, the base's sloppy SFT mix."""
    folder = os.path.join(cache, "data")
    n_train, n_test = (s.num_train, s.num_test) if quick else (NUM_TRAIN, NUM_TEST)
    key = {"n": [n_train, n_test], "tools": TOOLS, "sloppy": SLOPPY_FRACTION, "seed": s.seed,
           "data_version": demo.DATA_VERSION}  # fmt: skip
    info = demo.lookup_stage(folder, key)
    if info is not None:
        return info
    demo.start_stage(folder)
    task_tokenizer.save_tokenizer(os.path.join(cache, "models", "tokenizer"))
    domain_tasks = {
        "arithmetic": tasks.get("addition", min_digits=2, max_digits=2, teacher="arithmetic"),
        "tool_use": tasks.get("tool_use", tools=TOOLS, teacher="tool_use"),
    }
    rng = random.Random(s.seed)
    mix, sloppy, test = [], [], []
    for domain, task in domain_tasks.items():
        train = task.generate("train", n_train, seed=s.seed)
        bad = demo.sloppy_example if domain == "arithmetic" else _sloppy_call
        tasks.write_jsonl(train, os.path.join(folder, f"train_{domain}.jsonl"))
        mix += train
        sloppy += [bad(ex) if rng.random() < SLOPPY_FRACTION else ex for ex in train]
        held_out = task.generate("test", n_test, seed=s.seed)
        tasks.write_jsonl(held_out, os.path.join(folder, f"test_{domain}.jsonl"))
        test.append(held_out)
    rng.shuffle(mix)
    rng.shuffle(sloppy)
    tasks.write_jsonl(mix, os.path.join(folder, "train.jsonl"))
    tasks.write_jsonl(sloppy, os.path.join(folder, "base_sft.jsonl"))
    interleaved = [ex for pair in zip(*test, strict=True) for ex in pair]
    tasks.write_jsonl(interleaved, os.path.join(folder, "test.jsonl"))
    return demo.finish_stage(folder, key)


def make_config(cache: str, overrides: dict, seed: int):
    """The multi_teacher preset pointed into `cache`, plus dotted overrides and the seed."""
    c = demo.preset_config("multi_teacher").unlock()
    m, d = os.path.join(cache, "models"), os.path.join(cache, "data")
    c.student.path, c.tokenizer_path = os.path.join(m, "base"), os.path.join(m, "tokenizer")
    for domain in DOMAINS:
        c.teachers[domain].path = os.path.join(m, f"teacher_{domain}")
    c.data.train_path, c.data.eval_path = f"{d}/train.jsonl", f"{d}/test.jsonl"
    c.train.export_final = True
    c.lock()
    configs.apply_overrides(c, {**overrides, "seed": seed})
    return c


def domain_eval(config, cache: str, policy_path: str) -> dict:
    """`<domain>_accuracy` and `<domain>_kl_per_token` (to the domain's teacher) of a model."""
    tok = Tokenizer.from_pretrained(config.tokenizer_path)
    model, row = models.from_pretrained(policy_path), {}
    for domain in DOMAINS:
        cfg = config.copy_and_resolve_references()
        cfg.data.eval_path = os.path.join(cache, "data", f"test_{domain}.jsonl")
        teacher = models.from_pretrained(config.teachers[domain].path)
        out = demo.evaluate_model(model, tok, cfg, teacher)
        row[f"{domain}_accuracy"], row[f"{domain}_kl_per_token"] = (
            out["accuracy"],
            out["kl_per_token"],
        )
    return row


def main(argv=None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    common.setup(args)
    t0 = time.perf_counter()
    settings = QUICK if args.quick else SETTINGS
    _, base_overrides = common.scale(args, FULL)
    base_overrides.update(LENGTHS if not args.quick else {"rollout.max_prompt_len": 40})
    cache = os.path.join(args.cache_dir, NAME)
    data_info = build_data(cache, settings, args.quick)
    config = make_config(cache, base_overrides, 0)
    built = {}
    parent = demo.ModelStage("base", "base_sft.jsonl", settings.base_steps)
    built["base"] = demo.build_model(parent, cache, settings, config, data_info["key"])
    for i, domain in enumerate(DOMAINS):
        st = demo.ModelStage(f"teacher_{domain}", f"train_{domain}.jsonl",
                             settings.teacher_steps, init="base", seed_offset=1 + i)  # fmt: skip
        built[st.name] = demo.build_model(st, cache, settings, config, built["base"]["key"])
    paths = {"base": config.student.path}
    paths.update({f"teacher ({d})": config.teachers[d].path for d in DOMAINS})
    refs = [{"label": k, **domain_eval(config, cache, p)} for k, p in paths.items()]
    both = lambda lam, ref: {f"teachers.{d}.{k}": v for d in DOMAINS
                             for k, v in (("reward_scale", lam), ("reference", ref))}  # fmt: skip
    variants = [
        common.Variant("OPD (λ=1)", both(1.0, None), {"lambda": 1.0}),
        common.Variant("ExOPD (λ=1.25, ref=base)", both(1.25, "student_init"), {"lambda": 1.25}),
    ]
    runs, curves = common.run_grid(
        args, variants, lambda o, seed: make_config(cache, {**base_overrides, **o}, seed),
        kl_teacher={d: config.teachers[d].path for d in DOMAINS},
        eval_sets={d: os.path.join(cache, "data", f"test_{d}.jsonl") for d in DOMAINS},
    )  # fmt: skip
    keys = [f"{d}_{m}" for d in DOMAINS for m in ("accuracy", "kl_per_token")]
    summary = outputs.aggregate(runs, ["label", "lambda"], [*keys, *common.RUN_METRICS[2:]])
    outputs.write_csv(os.path.join(args.out, "summary.csv"), summary)
    outputs.write_csv(os.path.join(args.out, "references.csv"), refs)
    cols = [(k, k.replace("_kl_per_token", " KL/tok").replace("_accuracy", " acc."), 3)
            for k in keys]  # fmt: skip
    table = outputs.summary_table(summary, ["label"], cols, refs)
    for d in DOMAINS:  # per-domain curves: the trainer's eval on the mixed held-out set
        key = f"verifier/{'addition' if d == 'arithmetic' else d}/mean_score"
        outputs.plot_curves(os.path.join(args.out, f"curve_{d}.png"),
                            [{**c, "accuracy": c.get(key)} for c in curves if key in c],
                            refs={r["label"]: r[f"{d}_accuracy"] for r in refs},
                            title=f"{d}: held-out accuracy (mean ± std over seeds)")  # fmt: skip
    outputs.plot_bars(
        os.path.join(args.out, "final.png"), summary, lambda s: s["label"],
        [(f"{d}_accuracy", f"{d} accuracy") for d in DOMAINS],
        refs={r["label"]: r for r in refs}, title="Multi-teacher merging",
    )  # fmt: skip
    built_info = {k: {"cached": v["cached"], "seconds": v["seconds"]} for k, v in built.items()}
    meta = common.run_meta(args, __doc__.split("\n\n")[2], settings, base_overrides, t0, built_info)
    paired_metrics = [(k, f"Δ {title}", 4 if "KL" in title else 3) for k, title, _ in cols]
    tables = {
        "Per-domain held-out accuracy and KL to the domain's teacher": table,
        "ExOPD minus OPD of the same seed (mean [95% t interval])": outputs.write_paired(
            args.out, runs, "OPD (λ=1)", paired_metrics
        ),
    }
    outputs.write_results(args, tables, meta)
    return {"runs": runs, "curves": curves, "summary": summary, "refs": refs}


if __name__ == "__main__":
    main()
