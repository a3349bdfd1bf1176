"""Compile time of the model's forward + backward against depth.

Builds a Qwen3-shaped model (hidden 256, 4 heads, 2 kv heads, vocab 1024 by default: a realistic
layer structure, small enough for a CPU) at each depth in `--depths`, lowers
`jit(value_and_grad(mean log-prob loss))` on a [batch, seq] batch and compiles it, and prints the
trace+lower and compile seconds per depth, the number of dot ops in the optimised HLO, and the
ratio of the deepest to the shallowest compile time. Compile time is reported as wall seconds
and as CPU seconds of this process (all threads): on a shared machine the wall time varies with
the load, the CPU time much less. Each is the fastest of `--repeats` fresh compilations, after
one untimed warm-up compilation (the backend's one-time set-up).

With the layers scanned (`lax.scan` over the stacked layer parameters) the program does not grow
with depth, so the ratio should stay near 1; an unrolled Python loop over layers gives a
program, and a compile time, linear in depth.

    python benchmarks/compile_depth.py [--depths 4 14 28] [--remat full]

Only abstract parameters are used (`nnx.eval_shape`), so no weights are initialised.
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx

from opdplus_jax import models


def build(depth: int, args) -> tuple[nnx.GraphDef, nnx.State]:
    """Abstract (graphdef, params) of a `depth`-layer model (no weights are materialised)."""
    cfg = models.qwen3_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=depth,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
    )
    kw = {} if args.remat is None else {"remat": args.remat}  # an old CausalLM has no `remat`
    model = nnx.eval_shape(lambda: models.CausalLM(cfg, rngs=nnx.Rngs(0), **kw))
    return nnx.split(model, nnx.Param)


def compile_seconds(depth: int, args) -> tuple[float, float, float, int]:
    """(trace + lower seconds, compile wall seconds, compile CPU seconds, dot ops in the
    optimised HLO) at `depth`; a new function each call, so nothing comes from JAX's caches."""
    graphdef, params = build(depth, args)

    def loss(params, tokens_BL):
        logits_BLV = nnx.merge(graphdef, params)(tokens_BL)
        logp_BLV = jax.nn.log_softmax(logits_BLV[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp_BLV, tokens_BL[:, 1:, None], axis=-1).mean()

    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss))
    t0 = time.perf_counter()
    lowered = step.lower(params, tokens)
    t1, c1 = time.perf_counter(), time.process_time()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    dots = len(re.findall(r"\bdot\(", compiled.as_text()))
    return t1 - t0, t2 - t1, c2 - c1, dots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 14, 28])
    parser.add_argument("--remat", default=None, help="remat policy (default: none)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="compilations per depth (min)")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {jax.default_backend()}; hidden {args.hidden}, heads "
        f"{args.heads}/{args.kv_heads}, vocab {args.vocab}, batch {args.batch} x seq {args.seq}, "
        f"remat {args.remat}"
    )
    compile_seconds(min(args.depths), args)  # warm-up: the backend's one-time set-up
    wall, cpu = {}, {}
    for depth in args.depths:
        runs = [compile_seconds(depth, args) for _ in range(args.repeats)]
        lower_s, wall[depth], cpu[depth] = (min(r[i] for r in runs) for i in range(3))
        print(
            f"layers {depth:3d}: trace+lower {lower_s:6.2f} s  compile {wall[depth]:6.2f} s "
            f"(CPU {cpu[depth]:6.2f} s)  dots in HLO {runs[0][3]}"
        )
    lo, hi = min(args.depths), max(args.depths)
    print(
        f"compile ratio {hi}/{lo} layers: {wall[hi] / wall[lo]:.2f} wall, "
        f"{cpu[hi] / cpu[lo]:.2f} CPU"
    )


if __name__ == "__main__":
    main()
