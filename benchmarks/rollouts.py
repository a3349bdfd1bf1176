"""Rollout throughput on long-tailed response lengths: the continuous-batching engine
(`opdplus_jax.continuous`) vs the static sampler (`opdplus_jax.sampling`) vs transformers
`generate` (PyTorch CPU), all in one run.

Workload (defaults): a random Qwen3-shaped checkpoint (about 5M parameters, vocabulary 8192,
written by `models.factory.random_checkpoint`, loaded by both libraries), 64 prompts of 32
random tokens, 4 samples each (256 rows), temperature 1, at most 512 new tokens. A row stops at
any of the first V/128 = 64 token ids after the reserved ones: the random model's next-token
distribution is close to uniform, so each step stops a row with probability about 1/128 and
response lengths are geometric with mean about 128, capped at 512 (the measured lengths are
printed). Every engine samples the same rows; transformers samples with its own random numbers
from the same distribution (same prompts, stop ids and cap), so its lengths are a fresh draw.

Measured (medians over alternating repeats, float32):
  * useful tokens/s (tokens up to and including each row's stop token, per second);
  * the fraction of decode compute spent on rows that had stopped (or on empty slots);
  * an equal-length workload (no stop ids, every row `--equal-new-tokens` long): continuous vs
    static;
  * shared-prefix prefill: the prefill of P prompts once vs of their n samples separately
    (`--prefix-samples` rows per prompt, `--prefix-prompt-len` tokens), the two prefills the
    engines run.

The last line is one JSON object with `continuous_vs_static`, `continuous_vs_generate`,
`equal_length_vs_static` and `prefix_prefill_fraction`.

    python benchmarks/rollouts.py --torch-python /path/to/torch-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from common import JsonLineWorker  # benchmarks/common.py, next to this script

from opdplus_jax import continuous, models, sampling, scoring
from opdplus_jax.models import factory

CONFIG = {  # Qwen3 architecture (q/k norm, GQA, tied embeddings), ~5M parameters
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_layers": 4,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 64,
}
RESERVED = 3  # ids 0-2 (pad, bos, eos) are never prompt tokens nor stop ids

TORCH_WORKER = r"""
import json, sys, time
import torch, transformers
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
model = transformers.AutoModelForCausalLM.from_pretrained(args["path"], dtype=torch.float32).eval()
ids = torch.tensor(args["prompts"])
stops = torch.tensor(args["stop_ids"])
kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args["new_tokens"],
          num_return_sequences=args["samples"], eos_token_id=args["stop_ids"], pad_token_id=0,
          attention_mask=torch.ones_like(ids))
print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                  "transformers": transformers.__version__}), flush=True)
for line in sys.stdin:  # one timed generate per request line (the line is the seed)
    torch.manual_seed(int(line))
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        seconds = time.perf_counter() - t
    new = out[:, ids.shape[1]:]
    stopped = torch.isin(new, stops)
    first = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, new.shape[1])
    print(json.dumps({"seconds": seconds, "useful": int(first.sum()), "steps": new.shape[1],
                      "rows": new.shape[0]}), flush=True)
"""


class TorchWorker(JsonLineWorker):
    """transformers in a subprocess of a Python with torch; `run(seed)` times one generate."""

    def __init__(self, python: str, args: dict):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        super().__init__([python, "-c", TORCH_WORKER, json.dumps(args)], env, "PyTorch")

    def run(self, seed: int) -> dict:
        return self.request(str(seed))


def timed(fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("OPDPLUS_TORCH_PYTHON"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--stop-every", type=int, default=128, help="1 / per-step stop chance")
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--equal-new-tokens", type=int, default=128)
    parser.add_argument("--prefix-samples", type=int, default=8)
    parser.add_argument("--prefix-prompt-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {cores} cores; float32")
    V, N, n, T = CONFIG["vocab_size"], args.prompts, args.samples, args.max_new_tokens
    if sampling.bucket_length(args.prompt_len) != args.prompt_len:
        sys.exit(f"--prompt-len {args.prompt_len} must be a prompt bucket (16, 32, ...)")
    rng = np.random.default_rng(0)
    prompts = rng.integers(RESERVED, V, (N, args.prompt_len)).tolist()
    stop_ids = tuple(range(RESERVED, RESERVED + V // args.stop_every))

    with tempfile.TemporaryDirectory() as tmp:
        path = factory.random_checkpoint(
            os.path.join(tmp, "model"),
            factory.qwen3_config(**CONFIG, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        )
        model = models.from_pretrained(path)
        # The engines' own calls (`StaticEngine` / `ContinuousEngine.generate` wrap these), for
        # their schedule statistics (steps run, busy slots) besides the rollout.
        rows_of = [p for p in prompts for _ in range(n)]
        kw = {"temperature": 1.0, "max_new_tokens": T, "stop_token_ids": stop_ids}
        eq_kw = {"temperature": 1.0, "max_new_tokens": args.equal_new_tokens}
        engines = {
            "static": lambda key: sampling.generate(model, rows_of, rng=key, **kw),
            "cont": lambda key: continuous.generate(
                model, prompts, num_samples=n, slots=args.slots, rng=key, **kw
            ),
            "static_eq": lambda key: sampling.generate(model, rows_of, rng=key, **eq_kw),
            "cont_eq": lambda key: continuous.generate(
                model, prompts, num_samples=n, slots=args.slots, rng=key, **eq_kw
            ),
        }
        run = lambda name, seed: engines[name](jax.random.key(seed))
        theirs = None
        if args.torch_python:
            theirs = TorchWorker(args.torch_python, {
                "path": path, "prompts": prompts, "stop_ids": list(stop_ids), "new_tokens": T,
                "samples": n, "threads": cores})  # fmt: skip
            theirs.run(0)  # warm-up
        else:
            print("no --torch-python (or $OPDPLUS_TORCH_PYTHON): transformers is not measured")
        first = {}  # the first call compiles
        for name in engines:
            first[name] = timed(lambda name=name: run(name, 0).tokens)[0]
        rows: dict[str, list] = {k: [] for k in (*engines, "hf")}
        for i in range(1, args.repeats + 1):  # alternate, so that all see the same load
            for name in engines:
                rows[name].append(timed(lambda name=name, i=i: run(name, i)))
        for i in range(args.repeats + 1, 2 * args.repeats + 3):  # the short pair: more repeats
            for name in ("static_eq", "cont_eq"):
                rows[name].append(timed(lambda name=name, i=i: run(name, i)))
            if theirs is not None:
                rows["hf"].append(theirs.run(i))
        if theirs is not None:
            theirs.close()

        # Shared-prefix prefill: the engines' own prefill, once per prompt vs once per row.
        k, Pp = args.prefix_samples, args.prefix_prompt_len
        base = sampling.SamplerStatic(cache_length=Pp)
        unique = np.asarray(rng.integers(RESERVED, V, (N, Pp)), np.int32)
        gd, prm, rest = scoring.split_model(model)

        def prefill(tokens):
            return sampling.prefill(gd, prm, rest, tokens, np.ones_like(tokens), static=base)

        repeated = np.repeat(unique, k, axis=0)
        prefill(unique)[0].block_until_ready()
        prefill(repeated)[0].block_until_ready()
        once = [timed(lambda: prefill(unique))[0] for _ in range(args.repeats)]
        separate = [timed(lambda: prefill(repeated))[0] for _ in range(args.repeats)]

    R = N * n
    med = statistics.median

    def ours(key):
        secs = [t for t, _ in rows[key]]
        outs = [o for _, o in rows[key]]
        useful = [int(np.asarray(o.mask).sum()) for o in outs]
        return med(secs), med(u / t for u, t in zip(useful, secs, strict=True)), outs

    s_t, s_tps, s_out = ours("static")
    c_t, c_tps, c_out = ours("cont")
    lengths = np.concatenate([np.asarray(o.mask).sum(1) for o in s_out])
    print(f"workload: {N} prompts x {n} samples = {R} rows, prompt {args.prompt_len} tokens, "
          f"at most {T} new tokens, stop ids {stop_ids[0]}..{stop_ids[-1]} ({len(stop_ids)} of "
          f"{V}); lengths over {len(s_out)} draws: mean {lengths.mean():.1f}, median "
          f"{np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, at the cap "
          f"{(lengths == T).mean():.1%}")  # fmt: skip
    # Decode compute on stopped rows: (rows x steps run) against the tokens decoded for live
    # rows; the first token of each row comes from the prefill in every engine.
    s_waste = med(1 - (int(np.asarray(o.mask).sum()) - R) / (R * (int(o.num_steps) - 1))
                  for o in s_out)  # fmt: skip
    c_waste = med(1 - int(o.busy_steps) / int(o.slot_steps) for o in c_out)
    same = sum(int((np.asarray(a.tokens) == np.asarray(b.tokens)).all(1).sum())
               for a, b in zip(s_out, c_out, strict=True))  # fmt: skip
    draws = len(s_out)
    print(f"static sampler   : {s_tps:8.1f} useful tokens/s ({s_t:6.2f} s/call); "
          f"{s_waste:.1%} of decode on stopped rows")  # fmt: skip
    print(f"continuous (S={min(args.slots, R)}): {c_tps:8.1f} useful tokens/s ({c_t:6.2f} s/call); "
          f"{c_waste:.1%} of decode on stopped rows or empty slots; rows identical to the "
          f"static sampler's: {same}/{R * draws} over {draws} draws")  # fmt: skip
    print(f"first call (compiles): static {first['static']:.1f} s, continuous "
          f"{first['cont']:.1f} s")  # fmt: skip
    result = {"continuous_vs_static": c_tps / s_tps}
    if rows["hf"]:
        h = rows["hf"]
        h_tps = med(r["useful"] / r["seconds"] for r in h)
        h_waste = med(1 - (r["useful"] - r["rows"]) / (r["rows"] * (r["steps"] - 1)) for r in h)
        print(f"transformers     : {h_tps:8.1f} useful tokens/s "
              f"({med(r['seconds'] for r in h):6.2f} s/call; torch {theirs.info['torch']}, "
              f"transformers {theirs.info['transformers']}); {h_waste:.1%} of decode on "
              "stopped rows")  # fmt: skip
        result["continuous_vs_generate"] = c_tps / h_tps
        result["static_vs_generate"] = s_tps / h_tps
    else:
        result["continuous_vs_generate"] = None
    se_t = med(t for t, _ in rows["static_eq"])
    ce_t = med(t for t, _ in rows["cont_eq"])
    print(f"equal lengths ({R} rows x {args.equal_new_tokens} tokens): static {se_t:.2f} s, "
          f"continuous {ce_t:.2f} s: {se_t / ce_t:.2f}x")  # fmt: skip
    result["equal_length_vs_static"] = se_t / ce_t
    frac = med(once) / med(separate)
    print(f"prefill of {N} prompts x {Pp} tokens once: {med(once) * 1e3:.1f} ms; of their "
          f"{k} samples separately: {med(separate) * 1e3:.1f} ms; fraction {frac:.3f} "
          f"(1/{k} = {1 / k:.3f})")  # fmt: skip
    result["prefix_prefill_fraction"] = frac
    result["rows_identical_to_static"] = same / (R * draws)
    result["stopped_row_compute"] = {"static": s_waste, "continuous": c_waste}
    if rows["hf"]:
        result["stopped_row_compute"]["generate"] = h_waste
    print(json.dumps(result))


if __name__ == "__main__":
    main()
