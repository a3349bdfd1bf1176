"""One full on-policy distillation step: opdplus_jax vs TRL's `DistillationTrainer` (PyTorch CPU).

Both sides train the same random Qwen3-shaped float32 checkpoints (written by
`opdplus_jax.models.random_checkpoint` into a temporary folder): a ~23M-parameter student and a
~87M-parameter teacher with a shared 32768-token vocabulary (a word-level tokenizer with one token
per id, so that both sides sample and score over the same, realistically sized vocabulary: the
output layer is half of the student's parameters and most of its FLOPs, as in small Qwen3 models).
One step = sample 16 prompts x 1 response x exactly 128 tokens (temperature 1, no top-k/top-p),
score with the teacher, reverse-KL loss, backward, grad-norm clip, AdamW.

  ours    `Trainer.rollout` (the static engine: compiled prefill + while_loop decode, no stop
          ids so that every row has 128 tokens) then `Trainer.update` (one jitted, donated step:
          student and teacher forwards, reverse-KL advantages log q - log pi, policy-gradient
          loss, AdamW).
  TRL     `trl.DistillationTrainer` (fully on-policy: the student generates every completion;
          beta = 1 selects the reverse KL(student || teacher), computed over the full vocabulary by
          its chunked divergence), bf16 off, `min_new_tokens` = 128, same prompts, learning rate,
          batch and clipping, in a subprocess of a Python with torch + trl (`--torch-python` or
          $OPDPLUS_TORCH_PYTHON), see `benchmarks/trl_opd_step.py`.

TRL runs with gradient checkpointing off (its default is on, which recomputes the student forward:
slower here, where memory is plenty) and torch with OMP_WAIT_POLICY=PASSIVE: with other jobs on
the cores, OpenMP's default busy-waiting makes transformers' generate 5-10x slower, which would
flatter us (`--torch-omp-wait-policy` and `--trl-gradient-checkpointing` change both).

The two sides run alternately (ours, TRL, ours, ...) after warm-up steps, and the table reports
medians and the ratio of total step times measured in the same run (and process CPU seconds,
which a loaded machine perturbs less). Split: `sample` = the rollout;
`score` = the teacher forward (ours: a separately timed jitted teacher forward on the same batch;
TRL: the teacher backbone's forward, its lm_head is inside the chunked loss); `update` = the rest
of the step (ours: the fused `Trainer.update` minus `score`).

    python benchmarks/opd_step.py --torch-python /path/to/torch-venv/bin/python
"""

from __future__ import annotations

import argparse
import dataclasses
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

from opdplus_jax import sharding, trainer
from opdplus_jax.configs import default
from opdplus_jax.models import qwen3_config, random_checkpoint
from opdplus_jax.rollout import StaticEngine

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
STUDENT = {"hidden_size": 384, "num_layers": 6, "num_heads": 6, "num_kv_heads": 2}
TEACHER = {"hidden_size": 768, "num_layers": 9, "num_heads": 12, "num_kv_heads": 4}
PHASES = ("sample", "score", "update", "total")


def save_word_tokenizer(folder: str, vocab_size: int) -> str:
    """A word-level tokenizer with `vocab_size` ids: 4 special tokens, then "w4".."w{V-1}"."""
    import transformers
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL), vocab_size)})
    raw = RawTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="left",
    )
    tok.save_pretrained(folder)
    return folder


class TrlWorker(JsonLineWorker):
    """`benchmarks/trl_opd_step.py` in a subprocess; `run()` releases and times one TRL step."""

    def __init__(self, python: str, args: dict, omp_wait_policy: str):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.update(HF_DATASETS_OFFLINE="1", OMP_WAIT_POLICY=omp_wait_policy)
        env.pop("PYTHONPATH", None)
        argv = [python, os.path.join(HERE, "trl_opd_step.py"), json.dumps(args)]
        super().__init__(argv, env, "TRL")

    def run(self) -> dict:
        return self.request("step")

    def close(self) -> None:
        super().close(timeout=60)


def step_flops(student, teacher, batch: int, prompt: int, new: int) -> dict[str, float]:
    """The step's floor in matmul FLOPs by phase (student and teacher are `ModelConfig`s): the
    layers run on every token that needs them, the output layer only where a next-token
    distribution is used (the `new` response positions), attention over the causal context, and
    the student's backward costs twice its forward."""

    def layers(c):  # forward matmul FLOPs per token through the decoder layers
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size
        return 2 * c.num_layers * per_layer

    def head(c):  # output layer per position
        return 2 * c.hidden_size * c.vocab_size

    def attention(c, pairs):  # QK^T and PV over `pairs` (query, key) pairs
        return 2 * 2 * c.num_layers * c.num_heads * c.head_dim * pairs

    length = prompt + new
    causal = length * (length + 1) // 2  # full causal forward
    decoded = causal - length  # prefill, then one token per step (the last one is not fed)
    sample = (length - 1) * layers(student) + new * head(student) + attention(student, decoded)

    def forward(c):
        return length * layers(c) + new * head(c) + attention(c, causal)

    return {
        "sample": batch * sample,
        "score": batch * forward(teacher),
        "update": 3 * batch * forward(student),
    }


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(jnp.matmul)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-python", default=os.environ.get("OPDPLUS_TORCH_PYTHON"))
    parser.add_argument("--batch", type=int, default=16, help="prompts per step (1 sample each)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per side")
    parser.add_argument(
        "--trl-gradient-checkpointing",
        choices=("on", "off"),
        default="off",
        help="TRL's default is on (it then recomputes the student forward in the backward); off "
        "is its faster setting at this size, so the comparison is against the faster one",
    )
    parser.add_argument(
        "--torch-omp-wait-policy",
        default=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        help="OMP_WAIT_POLICY of the PyTorch process (PASSIVE: threads sleep at barriers; with "
        "other jobs on the cores, the default busy-waiting slows transformers' generate ~5-10x)",
    )
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    if not args.torch_python:
        sys.exit("pass --torch-python (or set OPDPLUS_TORCH_PYTHON) to a Python with torch + trl")
    cores = len(os.sched_getaffinity(0))
    compile_secs: list[float] = []

    def listener(name: str, secs: float, **_) -> None:
        if "/compile/" in name:
            compile_secs.append(secs)

    jax.monitoring.register_event_duration_secs_listener(listener)

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = save_word_tokenizer(os.path.join(tmp, "tokenizer"), args.vocab)
        ids = {"bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0}
        cfgs = {
            name: qwen3_config(vocab_size=args.vocab, **shape, **ids)
            for name, shape in (("student", STUDENT), ("teacher", TEACHER))
        }
        paths = {
            name: random_checkpoint(os.path.join(tmp, name), cfg, seed=i)
            for i, (name, cfg) in enumerate(cfgs.items())
        }
        rng = np.random.default_rng(0)
        words = rng.integers(len(SPECIAL), args.vocab, (args.batch, args.prompt_len))
        texts = [" ".join(f"w{i}" for i in row) for row in words]

        config = default.get_config("cpu")
        config.student.path = paths["student"]
        config.tokenizer_path = tok_dir
        config.teachers.default.path = paths["teacher"]
        config.estimator.divergence = "reverse_kl"
        config.estimator.correction = "stop_grad"  # the standard OPD advantage log q - log pi
        config.estimator.level, config.estimator.discount = "token", 0.0
        config.estimator.baseline = None
        config.loss.num_minibatches, config.loss.tis_cap = 1, None  # one fused on-policy update
        config.rollout.num_samples = 1
        config.rollout.max_new_tokens = args.new_tokens
        config.rollout.max_prompt_len = args.prompt_len
        config.data.batch_size = args.batch
        config.optimizer.learning_rate = args.lr
        config.optimizer.schedule, config.optimizer.warmup_steps = "constant", 0
        config.optimizer.grad_accum = 1
        config.optimizer.weight_decay = 0.0
        config.optimizer.grad_clip = 1.0
        mesh = sharding.make_mesh({"fsdp": 1}, jax.devices()[:1])
        run = trainer.Trainer.setup(config, mesh=mesh)
        # No stop ids: every rollout row samples exactly max_new_tokens, as TRL's min_new_tokens.
        no_stop = dataclasses.replace(run.engine.sampling, stop_token_ids=())
        run.engine = StaticEngine(run.step_cfg.student, no_stop)
        # The same call as TRL's prompt tokenization (processing_class(text=prompts)).
        prompt_tokens = run.tokenizer.hf(texts)["input_ids"]
        assert all(len(p) == args.prompt_len for p in prompt_tokens), "tokenizer mismatch"
        prompts_batch = {"prompt_tokens": prompt_tokens, "teacher": np.zeros(args.batch, np.int32)}
        state = run.init_state()
        key = jax.random.key(config.seed)

        def ours(i: int) -> dict:
            nonlocal state
            c0, t0 = time.process_time(), time.perf_counter()
            step_key = jax.random.fold_in(key, i)
            rollout = run.rollout(state.params, prompts_batch, step_key)
            jax.block_until_ready(rollout.tokens)
            t1, c1 = time.perf_counter(), time.process_time()
            state, metrics = run.update(state, rollout)
            metrics = jax.device_get(metrics)  # as the training loop does
            jax.block_until_ready(state)
            t2, c2 = time.perf_counter(), time.process_time()
            assert rollout.tokens.shape == (args.batch, args.new_tokens)
            assert int(np.asarray(rollout.mask).sum()) == args.batch * args.new_tokens
            assert not metrics["skipped"], metrics
            # The teacher forward alone on the same batch: the fused update cannot be split.
            t3, c3 = time.perf_counter(), time.process_time()
            jax.block_until_ready(run.teacher_logprobs(rollout))
            score, score_cpu = time.perf_counter() - t3, time.process_time() - c3
            wall = {"sample": t1 - t0, "score": score, "update": t2 - t1 - score, "total": t2 - t0}
            cpu = {"sample": c1 - c0, "score": score_cpu, "update": c2 - c1 - score_cpu}
            return {**wall, **{f"{k}_cpu": v for k, v in cpu.items()}, "total_cpu": c2 - c0}

        t = time.perf_counter()
        ours(0)
        first = time.perf_counter() - t
        compile_total = sum(compile_secs)
        theirs = TrlWorker(
            args.torch_python,
            {
                "student": paths["student"],
                "teacher": paths["teacher"],
                "tokenizer": tok_dir,
                "prompts": texts,
                "new_tokens": args.new_tokens,
                "lr": args.lr,
                "threads": cores,
                "steps": args.warmup + args.repeats,
                "gradient_checkpointing": args.trl_gradient_checkpointing == "on",
            },
            args.torch_omp_wait_policy,
        )
        for i in range(1, args.warmup):
            ours(i)
        for _ in range(args.warmup):
            theirs.run()
        ours_runs, theirs_runs = [], []
        for i in range(args.repeats):  # alternate, so that both sides see the same machine load
            ours_runs.append(ours(args.warmup + i))
            out = theirs.run()
            assert out["shape"] == [args.batch, args.prompt_len + args.new_tokens], out
            theirs_runs.append(out)
            print(
                f"  step {i + 1}/{args.repeats}: ours {ours_runs[-1]['total']:.2f} s, "
                f"TRL {out['total']:.2f} s",
                flush=True,
            )
        theirs.close()

    _report(args, cores, cfgs, theirs.info, ours_runs, theirs_runs, first, compile_total)


def _report(args, cores, cfgs, info, ours_runs, theirs_runs, first, compile_total) -> None:
    keys = (*PHASES, *(f"{k}_cpu" for k in PHASES))
    ours = {k: statistics.median(r[k] for r in ours_runs) for k in keys}
    theirs = {k: statistics.median(r[k] for r in theirs_runs) for k in keys}
    flops = step_flops(
        cfgs["student"], cfgs["teacher"], args.batch, args.prompt_len, args.new_tokens
    )
    flops["total"] = sum(flops.values())
    peak = matmul_gflops()
    n_s, n_t = cfgs["student"].num_params(), cfgs["teacher"].num_params()
    print()
    print(
        f"models  : Qwen3-shaped, float32, tied embeddings, vocab {args.vocab}; student "
        f"{n_s / 1e6:.2f}M params {STUDENT}; teacher {n_t / 1e6:.2f}M params {TEACHER} "
        f"(torch counts {info['student_params'] / 1e6:.2f}M / {info['teacher_params'] / 1e6:.2f}M)"
    )
    print(
        f"step    : {args.batch} prompts x 1 sample, prompt {args.prompt_len} tokens, exactly "
        f"{args.new_tokens} new tokens, temperature 1, reverse KL, AdamW lr {args.lr}, grad clip "
        f"1.0; median of {args.repeats} alternating steps after {args.warmup} warm-up steps each"
    )
    print(
        f"ours    : opdplus_jax (jax {jax.__version__}, XLA CPU, {jax.device_count()} device, "
        f"1-device mesh, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); reverse_kl stop_grad "
        f"advantages, token-level PG loss, optax AdamW; first step {first:.1f} s of which "
        f"{compile_total:.1f} s compilation"
    )
    print(
        f"TRL     : trl {info['trl']} {info['trainer']} (fully on-policy; beta=1.0 = reverse KL"
        f" over the full vocabulary), torch {info['torch']}, transformers "
        f"{info['transformers']}, torch.set_num_threads({info['threads']}), OMP_WAIT_POLICY="
        f"{info['omp_wait_policy']}, optim {info['optim']}, gradient checkpointing "
        f"{info['gradient_checkpointing']}, attention {info['attn_implementation']}"
    )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine : {cores} cores (os.sched_getaffinity), load average {load}")
    print()
    print(f"{'':8} {'wall time (ms)':^30}  {'process CPU (s)':^26}  {'floor':>6} {'ours':>7}")
    print(
        f"{'phase':8} {'ours':>9} {'TRL':>9} {'TRL/ours':>10}  {'ours':>7} {'TRL':>7} "
        f"{'TRL/ours':>10}  {'GFLOP':>6} {'GFLOP/s':>7}"
    )
    for k in PHASES:
        print(
            f"{k:8} {ours[k] * 1e3:9.0f} {theirs[k] * 1e3:9.0f} {theirs[k] / ours[k]:9.2f}x  "
            f"{ours[k + '_cpu']:7.2f} {theirs[k + '_cpu']:7.2f} "
            f"{theirs[k + '_cpu'] / ours[k + '_cpu']:9.2f}x  {flops[k] / 1e9:6.0f} "
            f"{flops[k] / ours[k] / 1e9:7.1f}"
        )
    print()
    print(f"ratio total TRL / total ours : {theirs['total'] / ours['total']:.2f}x (wall time)")
    print(
        f"float32 matmul (2048^3, jax) : {peak:.1f} GFLOP/s now, i.e. a floor of "
        f"{flops['total'] / peak / 1e9 * 1e3:.0f} ms for this step; TRL achieves "
        f"{flops['total'] / theirs['total'] / 1e9:.1f} GFLOP/s of floor FLOPs"
    )
    print(f"per-step totals ours (ms)    : {[round(r['total'] * 1e3) for r in ours_runs]}")
    print(f"per-step totals TRL  (ms)    : {[round(r['total'] * 1e3) for r in theirs_runs]}")
    print(
        "split   : sample = rollout; score = teacher forward (ours: the jitted teacher scoring "
        "timed on its own after the step; TRL: the teacher backbone's forward, its output layer "
        "runs inside the loss); update = the rest of the step"
    )


if __name__ == "__main__":
    main()
