"""Forward throughput: our jitted Flax NNX model vs transformers (PyTorch CPU), same checkpoint.

Builds a random Qwen3-shaped checkpoint (~34M parameters by default) with our model and
`save_pretrained` in a temporary folder, times our jitted full forward (after compilation) and
transformers' forward on the same folder, batch and sequence length in a subprocess of a Python
that has torch (`--torch-python`, default `$OPDPLUS_TORCH_PYTHON`), with
`torch.set_num_threads` equal to the CPU cores JAX uses. Prints tokens/s for both and the ratio
(ours / transformers), plus the max |logit difference| on a slice as a sanity check.

    python benchmarks/model_forward.py --torch-python /path/to/venv-with-torch/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opdplus_jax import models

TORCH_SCRIPT = r"""
import json, sys, time
import numpy as np, torch, transformers
folder, ids_path, out_path, threads, iters, dtype = sys.argv[1:7]
torch.set_num_threads(int(threads))
model = transformers.AutoModelForCausalLM.from_pretrained(
    folder, local_files_only=True, dtype=getattr(torch, dtype)).eval()
ids = torch.tensor(np.load(ids_path))
times = []
with torch.inference_mode():
    logits = model(ids).logits  # warm-up
    for _ in range(int(iters)):
        t0 = time.perf_counter()
        logits = model(ids).logits
        times.append(time.perf_counter() - t0)
np.save(out_path, logits[0, :16].float().numpy())
print(json.dumps({"seconds": times, "threads": torch.get_num_threads(),
                  "attn": model.config._attn_implementation, "torch": torch.__version__}))
"""


def qwen3_config(args) -> models.ModelConfig:
    return models.ModelConfig(
        model_type="qwen3",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        rope_theta=1e6,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        qk_norm=True,
        eos_token_id=2,
        pad_token_id=0,
    )


def time_ours(model, ids, iters) -> list[float]:
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
    ids = jnp.asarray(ids)
    forward(params, ids).block_until_ready()  # compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        forward(params, ids).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times, np.asarray(forward(params, ids)[0, :16])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch-python", default=os.environ.get("OPDPLUS_TORCH_PYTHON"))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    args = parser.parse_args()

    cfg = qwen3_config(args)
    dtype = jnp.dtype(args.dtype)
    threads = os.cpu_count() if jax.default_backend() == "cpu" else 1
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    tokens = args.batch * args.seq
    with tempfile.TemporaryDirectory() as folder:
        random_model = models.CausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype)
        models.save_pretrained(random_model, folder)
        del random_model
        model = models.from_pretrained(folder, dtype=dtype)
        print(
            f"checkpoint: Qwen3-shaped, {cfg.num_params() / 1e6:.1f}M params, {args.dtype}; "
            f"batch {args.batch} x seq {args.seq}; {threads} CPU threads; "
            f"jax {jax.__version__} on {jax.default_backend()}"
        )
        ours, ours_slice = time_ours(model, ids, args.iters)
        ours_tps = tokens / float(np.median(ours))
        print(
            f"ours (flax nnx, jit):      {ours_tps:10.0f} tokens/s  (median {np.median(ours):.3f}s)"
        )
        if not args.torch_python:
            print("no --torch-python / OPDPLUS_TORCH_PYTHON: skipping the transformers side")
            return
        ids_path, out_path = os.path.join(folder, "ids.npy"), os.path.join(folder, "out.npy")
        np.save(ids_path, ids)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        cmd = [args.torch_python, "-c", TORCH_SCRIPT, folder, ids_path, out_path]
        cmd += [str(threads), str(args.iters), args.dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode:
            sys.exit(f"transformers side failed:\n{proc.stderr}")
        theirs = json.loads(proc.stdout.strip().splitlines()[-1])
        theirs_tps = tokens / float(np.median(theirs["seconds"]))
        diff = float(np.abs(np.load(out_path) - ours_slice).max())
        print(
            f"transformers (torch {theirs['torch']}, {theirs['attn']}, "
            f"{theirs['threads']} threads): {theirs_tps:10.0f} tokens/s  "
            f"(median {np.median(theirs['seconds']):.3f}s)"
        )
        print(f"ratio ours/transformers: {ours_tps / theirs_tps:.2f}x   (max |dlogit| {diff:.2e})")


if __name__ == "__main__":
    main()
