"""Temporary memory of the full-vocabulary train step, chunked over time vs unchunked.

    python benchmarks/fullvocab_memory.py [--vocab 151936] [--rows 2] [--tokens 256]

Compiles the fused train step of the `cpu` preset with `estimator.support=full` (and
`teacher_topk`) for a random tiny Qwen3 student and teacher with a 151936-token vocabulary, the
way `opdplus-plan` does (abstract weights, nothing allocated: `plan.train_step_program`), once
with `memory.logits_chunk` = `--chunk` completion positions and once unchunked, and reads XLA's
memory analysis. Unchunked, the step holds several [rows, tokens, vocab] float32 arrays (the
student's, the teacher's and the divergence's); chunked, [rows, chunk, vocab] ones. The sampled
estimator's step at the same chunk is printed for reference. The last line is one JSON object
with `chunked_temp_bytes` and `unchunked_temp_bytes` (support=full) and their ratio.
"""

import argparse
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from opdplus_jax import models, plan
from opdplus_jax.configs import default


def temp_bytes(args, support: str, chunk: int | None, top_k: int | None = None) -> float:
    """XLA's temporary bytes of the compiled train step (one CPU device)."""
    config = default.get_config("cpu").unlock()
    config.data.batch_size = args.rows // 2
    config.rollout.num_samples = 2
    config.rollout.max_new_tokens = args.tokens
    config.rollout.max_prompt_len = args.prompt
    config.estimator.support = support
    if top_k is not None:
        config.estimator.top_k, config.estimator.tail = top_k, "bucket"
    config.memory.logits_chunk = chunk
    config.mesh.fsdp = 1
    cfg = models.qwen3_config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=4,
        num_kv_heads=2,
    )
    shape = lambda role: plan.ModelShape(role, "", cfg, "random tiny Qwen3")
    shapes = plan.Shapes(
        student=shape("student"),
        teachers=(shape("teacher/default"),),
        references=(),
        reference_of=(None,),
        vocab_size=args.vocab,
        vocab_origin="--vocab",
    )
    target = plan.target("cpu:1")
    (result,) = plan.plan(config, target, shapes, programs=("train_step",))
    if result.error:
        raise RuntimeError(result.error)
    return result.temp_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rows", type=int, default=2, help="rollout rows (even)")
    parser.add_argument("--tokens", type=int, default=256, help="completion tokens per row")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--chunk", type=int, default=16, help="memory.logits_chunk")
    parser.add_argument("--top_k", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    if args.rows < 2 or args.rows % 2:
        parser.error("--rows must be an even number >= 2 (2 samples per prompt)")

    logits_bytes = args.rows * args.tokens * args.vocab * 4
    print(
        f"train step temporaries: {args.rows} rows x {args.tokens} completion tokens, vocabulary "
        f"{args.vocab}; one [rows, tokens, vocab] float32 array = {logits_bytes / 2**20:.0f} MiB"
    )
    rows = {}
    for label, support, top_k in (
        ("full", "full", None),
        (f"teacher_topk (k={args.top_k}, bucket)", "teacher_topk", args.top_k),
    ):
        chunked = temp_bytes(args, support, args.chunk, top_k)
        unchunked = temp_bytes(args, support, None, top_k)
        rows[support] = (chunked, unchunked)
        print(
            f"  support={label:32s} chunk {args.chunk}: {chunked / 2**20:8.1f} MiB   unchunked: "
            f"{unchunked / 2**20:8.1f} MiB   ratio {chunked / unchunked:.4f}"
        )
    sampled = temp_bytes(args, "sampled", args.chunk)
    print(
        f"  support=sampled (reference)             chunk {args.chunk}: {sampled / 2**20:8.1f} MiB"
    )
    chunked, unchunked = rows["full"]
    print(
        json.dumps(
            {
                "vocab": args.vocab,
                "rows": args.rows,
                "tokens": args.tokens,
                "chunk": args.chunk,
                "support": "full",
                "chunked_temp_bytes": chunked,
                "unchunked_temp_bytes": unchunked,
                "chunked_over_unchunked": chunked / unchunked,
                "teacher_topk_chunked_temp_bytes": rows["teacher_topk"][0],
                "teacher_topk_unchunked_temp_bytes": rows["teacher_topk"][1],
                "sampled_chunked_temp_bytes": sampled,
            }
        )
    )


if __name__ == "__main__":
    main()
