"""TRL side of `benchmarks/opd_step.py`: one `trl.DistillationTrainer` step per request.

Runs in a Python with torch + transformers + trl (it imports nothing from opdplus_jax). Started by
`opd_step.py` with one JSON argument; prints one JSON line of setup info, then drives
`DistillationTrainer.train()` for `warmup + repeats` optimizer steps. Each step waits at its start
for a line on stdin (so the caller can alternate it with its own step), and after the optimizer
step prints one JSON line with the step's wall time and its split (and the same in process CPU
seconds, keys `*_cpu`):

    sample  the student's `generate` (transformers, KV cache, `min_new_tokens` = `max_new_tokens`)
    score   the teacher backbone's forward (its lm_head projection is fused into TRL's chunked
            divergence and is counted in `update`)
    update  everything else: student forward, chunked full-vocabulary divergence, backward,
            grad-norm clip, AdamW step (the step total minus the two above)

    python benchmarks/trl_opd_step.py '{"student": ..., "teacher": ..., "tokenizer": ...,
        "prompts": [...], "new_tokens": 128, "lr": 3e-4, "threads": 2, "steps": 4}'
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch

    torch.set_num_threads(args["threads"])
    import datasets
    import transformers
    import trl

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        args["tokenizer"], local_files_only=True, padding_side="left"
    )
    load = {"dtype": torch.float32, "local_files_only": True}
    student = transformers.AutoModelForCausalLM.from_pretrained(args["student"], **load)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(args["teacher"], **load)
    n = args["new_tokens"]
    config = trl.DistillationConfig(
        output_dir=os.path.join(tempfile.mkdtemp(), "trl"),
        use_cpu=True,
        bf16=False,  # float32 end to end, like our side
        beta=1.0,  # generalized JSD with beta = 1: reverse KL(student || teacher)
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_completion_length=n,
        generation_kwargs={"min_new_tokens": n},  # exactly n tokens (EOS suppressed before n)
        per_device_train_batch_size=len(args["prompts"]),
        gradient_accumulation_steps=1,
        gradient_checkpointing=args["gradient_checkpointing"],
        learning_rate=args["lr"],
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args["steps"],
        logging_steps=10**6,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    dataset = datasets.Dataset.from_dict({"prompt": args["prompts"]})
    trainer = trl.DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    phases = {"sample": 0.0, "score": 0.0, "sample_cpu": 0.0, "score_cpu": 0.0}

    # Time the student's generate (the trainer calls it on the unwrapped model, this object).
    model = trainer.model
    generate = model.generate

    def timed_generate(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        out = generate(*a, **kw)
        phases["sample"] += time.perf_counter() - t
        phases["sample_cpu"] += time.process_time() - c
        phases["shape"] = list(out.shape)
        return out

    model.generate = timed_generate

    # Time the teacher backbone's forward with hooks.
    backbone = trainer.accelerator.unwrap_model(trainer.teacher_model).base_model
    start = {}
    backbone.register_forward_pre_hook(
        lambda *_: start.update(t=time.perf_counter(), c=time.process_time())
    )

    def after(*_):
        phases["score"] += time.perf_counter() - start["t"]
        phases["score_cpu"] += time.process_time() - start["c"]

    backbone.register_forward_hook(after)

    class Sync(transformers.TrainerCallback):
        """Waits for the caller at each step's start; reports the step's times at its end."""

        def on_step_begin(self, *_, **__):
            if not sys.stdin.readline():
                raise SystemExit(0)
            phases.update(sample=0.0, score=0.0, sample_cpu=0.0, score_cpu=0.0)
            start["cpu"] = time.process_time()
            start["step"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            total = time.perf_counter() - start["step"]
            cpu = time.process_time() - start["cpu"]
            out = {k: phases[k] for k in ("sample", "score", "sample_cpu", "score_cpu")}
            out.update(total=total, update=total - out["sample"] - out["score"], total_cpu=cpu)
            out["update_cpu"] = cpu - out["sample_cpu"] - out["score_cpu"]
            out["shape"] = phases.get("shape")
            print(json.dumps(out), flush=True)

    trainer.add_callback(Sync())
    count = lambda m: sum(p.numel() for p in m.parameters())
    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "trainer": type(trainer).__name__,
        "threads": torch.get_num_threads(),
        "student_params": count(student),
        "teacher_params": count(teacher),
        "optim": str(config.optim),
        "gradient_checkpointing": config.gradient_checkpointing,
        "attn_implementation": student.config._attn_implementation,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }
    print(json.dumps(info), flush=True)
    trainer.train()


if __name__ == "__main__":
    main()
