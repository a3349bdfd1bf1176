"""Sampling throughput: the static rollout engine (`opdplus_jax.sampling.generate`) vs
transformers `generate` (PyTorch CPU).

Both sides load the same random Qwen3-shaped checkpoint (about 42M parameters, written by
transformers' `save_pretrained` into a temporary folder), sample the same prompts (batch 16,
prompt length 32 by default) at temperature 1 with no top-k/top-p, and generate exactly 128 new
tokens (no EOS on our side, `min_new_tokens` on theirs). PyTorch runs in a subprocess of a Python
that has torch (`--torch-python` or $OPDPLUS_TORCH_PYTHON) with `torch.set_num_threads` equal to
the cores JAX uses. Prints both throughputs (new tokens/s, steady state, prefill included), their
ratio, our compile time, and the achieved GFLOP/s as a fraction of a float32 matmul measured in
the same run.

    python benchmarks/sampler.py --torch-python /path/to/torch-venv/bin/python
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
import jax.numpy as jnp
import numpy as np
from common import JsonLineWorker  # benchmarks/common.py, next to this script

from opdplus_jax import models, sampling
from opdplus_jax.rollout import SamplingParams, StaticEngine

CONFIG = {  # Qwen3 architecture (q/k norm, GQA, tied embeddings), ~42M parameters
    "vocab_size": 32768,
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

TORCH_WORKER = r"""
import json, sys, time
import torch, transformers
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
if args["mode"] == "create":
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**args["config"]))
    model.save_pretrained(args["path"])
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}), flush=True)
    sys.exit()
dtype = getattr(torch, args["dtype"])
model = transformers.AutoModelForCausalLM.from_pretrained(args["path"], dtype=dtype).eval()
ids = torch.tensor(args["prompts"])
n = args["new_tokens"]
kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=n,
          min_new_tokens=n, pad_token_id=0, attention_mask=torch.ones_like(ids))
print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                  "transformers": transformers.__version__}), flush=True)
for line in sys.stdin:  # one timed generate per request line
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        seconds = time.perf_counter() - t
    assert out.shape == (ids.shape[0], ids.shape[1] + n), out.shape
    print(json.dumps({"seconds": seconds}), flush=True)
"""


class TorchWorker(JsonLineWorker):
    """transformers in a subprocess of a Python with torch; `run()` times one generate call."""

    def __init__(self, python: str, args: dict):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        super().__init__([python, "-c", TORCH_WORKER, json.dumps(args)], env, "PyTorch")

    def run(self) -> float:
        return self.request("run")["seconds"]


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of an n x n x n jitted matmul (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, b).block_until_ready()
    best = min(_timed(lambda: f(a, b).block_until_ready()) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def generate_flops(cfg: dict, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Model FLOPs of one generate call: matmuls of every processed token plus attention."""
    d, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    n, k, h, v = (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                  cfg["vocab_size"])  # fmt: skip
    per_token = 2 * (layers * (d * (n + 2 * k) * h + n * h * d + 3 * d * f) + d * v)
    processed = prompt_len + new_tokens - 1  # prefill + one decode step per further token
    # Attention: QK^T and PV over the context seen by each processed token.
    context = sum(range(1, processed + 1))
    attention = 2 * 2 * layers * n * h * context
    return batch * (processed * per_token + attention)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("OPDPLUS_TORCH_PYTHON"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--checkpoint", help="reuse a checkpoint folder instead of a new one")
    parser.add_argument("--cores", type=int, help="pin both sides to this many cores (default all)")
    args = parser.parse_args()
    if args.cores:  # before JAX starts its CPU client; the torch worker inherits the affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    if not args.torch_python:
        sys.exit("pass --torch-python (or set OPDPLUS_TORCH_PYTHON) to a Python with torch")
    cores = len(os.sched_getaffinity(0))
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {cores} cores, "
          f"{jax.device_count()} device(s); dtype {args.dtype}")  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint or os.path.join(tmp, "qwen3-bench")
        if not args.checkpoint:
            maker = TorchWorker(args.torch_python, {
                "mode": "create", "path": path, "config": CONFIG, "threads": cores})  # fmt: skip
            maker.close()
            print(f"random Qwen3-shaped checkpoint: {maker.info['params'] / 1e6:.1f}M parameters")
        rng = np.random.default_rng(0)
        prompts = rng.integers(3, CONFIG["vocab_size"], (args.batch, args.prompt_len)).tolist()

        model = models.from_pretrained(path, dtype=jnp.dtype(args.dtype))
        if sampling.bucket_length(args.prompt_len) != args.prompt_len:
            raise SystemExit(
                f"--prompt-len {args.prompt_len} must be a prompt bucket (16, 32, ...)"
            )
        engine, params = StaticEngine.for_model(
            model, SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0)
        )

        def ours(seed: int) -> None:
            r = engine.generate(params, prompts, rng=jax.random.key(seed))
            jax.block_until_ready(r)
            assert r.tokens.shape == (args.batch, args.new_tokens) and bool(r.mask.all())

        compile_events: list[float] = []

        def listener(name: str, secs: float, **_) -> None:
            if "/compile/" in name:
                compile_events.append(secs)

        jax.monitoring.register_event_duration_secs_listener(listener)
        first = _timed(lambda: ours(0))
        jax.monitoring.unregister_event_duration_listener(listener)
        theirs = TorchWorker(args.torch_python, {
            "mode": "generate", "path": path, "prompts": prompts, "new_tokens": args.new_tokens,
            "threads": cores, "dtype": args.dtype})  # fmt: skip
        theirs.run()  # warm-up
        ours_times, theirs_times = [], []
        for i in range(args.repeats):  # alternate, so that both see the same machine load
            ours_times.append(_timed(lambda i=i: ours(i + 1)))
            theirs_times.append(theirs.run())
        theirs.close()

    ours_s, theirs_s = statistics.median(ours_times), statistics.median(theirs_times)
    new = args.batch * args.new_tokens
    flops = generate_flops(CONFIG, args.batch, args.prompt_len, args.new_tokens)
    peak = matmul_peak_gflops()
    achieved = flops / ours_s / 1e9
    info = theirs.info
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"temperature 1, median of {args.repeats} alternating runs")  # fmt: skip
    print(f"opdplus_jax  : {new / ours_s:9.1f} new tokens/s  ({ours_s * 1e3:8.1f} ms/call)")
    print(f"transformers : {new / theirs_s:9.1f} new tokens/s  ({theirs_s * 1e3:8.1f} ms/call; "
          f"torch {info['torch']}, transformers {info['transformers']}, "
          f"{info['threads']} threads)")  # fmt: skip
    print(f"ratio        : {theirs_s / ours_s:.2f}x  (load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores: other processes share the machine)")  # fmt: skip
    print(f"compile time : {sum(compile_events):.2f} s (trace + lower + compile; first call "
          f"{first:.2f} s)")  # fmt: skip
    print(f"achieved     : {achieved:.1f} GFLOP/s = {achieved / peak:.1%} of the measured "
          f"float32 matmul peak ({peak:.1f} GFLOP/s, 2048^3)")  # fmt: skip


if __name__ == "__main__":
    main()
