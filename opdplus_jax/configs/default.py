r"""Experiment configs: `get_config(arg)` presets (big_vision style).

    opdplus-train --config=configs/default.py:cpu --workdir=runs/demo \
        --config.estimator.divergence=jsd --config.optimizer.learning_rate=3e-4

The presets ship inside the package, so an installed opdplus_jax has them too (the demo imports
this module); the repository's `configs/default.py` only forwards to `get_config` here, because
absl's config flags load a config from a file path.

Presets:
  cpu          the CPU-sized default (`python -m opdplus_jax.demo` builds its models and data
               under runs/demo): tiny same-size student and teacher, synthetic-task prompts
               (see `opdplus_jax.tasks`); minutes on 2 cores.
  strong_to_weak  as cpu, with a smaller student (`runs/demo/models/small_base`) distilled
               from the same teacher.
  qwen3_exopd  the papers' setting (Qwen3-1.7B student, Qwen3-8B teacher, lambda = 1.25,
               OPD+ JSD, reward correction with the teacher's pre-RL base); needs accelerators.
  multi_teacher two task-domain teachers (arithmetic, tool use) merged into one student (models
               and data built by `python -m experiments.multi_teacher`).

Every field is documented in README.md ("Config knobs"). The config is locked: a typo in an
override is an error that suggests the nearest valid name. An optional feature that is off is
None, never a sentinel such as "none" or 0.0; such fields are typed references
(`config_dict.placeholder`), so an override that switches one on is still type-checked.
"""

from ml_collections import config_dict


def _base() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.seed = 0

    # Models: Hugging Face checkpoint folders (config.json + *.safetensors), loaded locally.
    c.student = config_dict.ConfigDict()
    c.student.path = ""
    c.student.dtype = "float32"  # activation dtype: float32 | bfloat16
    c.student.param_dtype = "float32"  # master weights
    c.tokenizer_path = ""  # defaults to the student folder

    # Teachers by name. Each: checkpoint folder, reference model and reward scale lambda (G-OPD),
    # and its prompts per batch. reference: None (no reference model; needs lambda = 1),
    # "student_init" (the student's initial weights) or a checkpoint folder (e.g. the teacher's
    # pre-RL base: "reward correction"). prompts_per_batch: every batch takes this many prompts
    # from the teacher's records (None for every teacher: data.batch_size split equally), so
    # each teacher scores only its own static block of rows.
    c.teachers = config_dict.ConfigDict()
    c.teachers.default = teacher("")

    # The estimator (opdplus_jax.estimators): every knob of the library.
    c.estimator = config_dict.ConfigDict()
    c.estimator.divergence = "reverse_kl"
    c.estimator.divergence_params = config_dict.ConfigDict()  # e.g. {"beta": 0.5} for jsd
    c.estimator.correction = "opd_plus"  # opd_plus | stop_grad
    # The generator's gauge f(u) + c (1 - u) (same divergence; only stop_grad's estimate moves):
    # None = as registered | "sublinear" (c = lim f(u)/u, so f grows sublinearly like reverse
    # KL's -log u: 1/2 log 2 for JSD, 1/2 for TV, 1 for Hellinger; forward KL has none).
    c.estimator.gauge = config_dict.placeholder(str)
    c.estimator.level = "token"  # token | sequence
    c.estimator.discount = 0.0  # gamma in [0, 1]
    # Clamp each log u_t to [-c, c] (biased; see opdplus_jax.estimators); None = off.
    c.estimator.log_ratio_clip = config_dict.placeholder(float)
    # Per-prompt baseline over its n samples: None (off) | loo | mean | mean_std.
    c.estimator.baseline = config_dict.placeholder(str)
    # Which tokens the OPD term sums over: sampled (the sampled token's advantage, every
    # estimator above) | full (the whole vocabulary's divergence at each visited context) |
    # teacher_topk | student_topk (the top_k tokens of that model, with tail: renormalize |
    # bucket). The non-sampled supports are token level and exact (opd_plus), computed
    # memory.logits_chunk positions at a time (opdplus_jax.fullvocab).
    c.estimator.support = "sampled"
    c.estimator.top_k = config_dict.placeholder(int)
    c.estimator.tail = config_dict.placeholder(str)

    # Verifiable task rewards mixed into the advantages: opd_weight x OPD's + task_weight x the
    # verifier reward's (group_norm: (r - mean) / std over a prompt's samples | loo: r - the
    # others' mean). task_weight > 0 verifies every rollout (train.verify_budget_seconds does
    # not apply: an unverified answer would be a wrong reward).
    c.reward = config_dict.ConfigDict()
    c.reward.opd_weight = 1.0
    c.reward.task_weight = 0.0
    c.reward.task_advantage = "group_norm"

    # LoRA student (opdplus_jax.lora, through qwix): rank None trains every weight; a rank
    # trains low-rank adapters W + alpha / rank A B on the target modules (regexes over
    # "layers/attn" (q, k, v, o projections) and "layers/mlp" (gate, up, down)) and freezes the
    # rest; the optimizer state and checkpoints hold the adapters, the export merges them.
    c.lora = config_dict.ConfigDict()
    c.lora.rank = config_dict.placeholder(int)
    c.lora.alpha = 16.0
    c.lora.targets = ("layers/attn", "layers/mlp")

    # Rollouts (opdplus_jax.sampling).
    c.rollout = config_dict.ConfigDict()
    c.rollout.num_samples = 4  # n responses per prompt
    c.rollout.temperature = 1.0
    c.rollout.top_p = 1.0
    c.rollout.top_k = 0
    c.rollout.max_new_tokens = 64
    c.rollout.max_prompt_len = 64
    # static: a call's rows decode together until the last stops (best when lengths are alike);
    # continuous: rollout.slots rows at a time, a stopped row's slot refilled inside the compiled
    # loop, each prompt prefilled once for its samples (long-tailed lengths; README "Rollouts").
    c.rollout.engine = "static"
    c.rollout.slots = 64  # continuous engine: rows decoded together (its KV cache's sequences)
    c.rollout.kv_dtype = config_dict.placeholder(str)  # None = student.dtype; e.g. "bfloat16"
    c.rollout.prefill_chunk = 0  # prefill prompts this many tokens at a time (0 = at once)

    # Loss (opdplus_jax.losses).
    c.loss = config_dict.ConfigDict()
    c.loss.aggregation = "seq_mean_token_sum_norm"  # normaliser B * max_new_tokens
    # PPO clip epsilon; None = off (only matters with several updates per rollout).
    c.loss.ppo_clip = config_dict.placeholder(float)
    c.loss.num_minibatches = 1  # updates per rollout batch (>1: PPO-style, old log-probs fixed)
    # Truncated importance-sampling cap C between learner and sampler; None = off.
    c.loss.tis_cap = config_dict.placeholder(float)

    # Optimizer (optax chain: clip -> AdamW with schedule; MultiSteps for accumulation).
    c.optimizer = config_dict.ConfigDict()
    c.optimizer.learning_rate = 1e-5
    c.optimizer.schedule = "cosine"  # cosine | constant
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.grad_clip = config_dict.FieldReference(1.0, field_type=float)  # None = off
    c.optimizer.grad_accum = 1  # rollout batches per optimizer update

    # Data: local JSONL/Parquet prompt files (fields prompt, answer, optional teacher, domain).
    c.data = config_dict.ConfigDict()
    c.data.train_path = ""
    c.data.eval_path = ""
    c.data.batch_size = 8  # prompts per step (x num_samples responses)
    c.data.system_prompt = config_dict.placeholder(str)

    # Memory of the train step (opdplus_jax.train_step); the results do not depend on them.
    c.memory = config_dict.ConfigDict()
    # Rematerialisation of the student's layers in the backward: None (off) | full | save_dots |
    # offload (models.REMAT_POLICIES). Teachers and references run forward only.
    c.memory.remat = config_dict.placeholder(str)
    # Rollout rows PER DEVICE per microbatch of the step (a lax.scan accumulating the gradient;
    # the global microbatch is this times the mesh's data x fsdp devices); None = the whole
    # batch at once.
    c.memory.microbatch_rows = config_dict.placeholder(int)
    # Completion positions per output-layer chunk: at most [rows, chunk, vocab] float32 logits
    # are live (0.3 GiB per row at 512 x 151936). None = all positions at once.
    c.memory.logits_chunk = config_dict.FieldReference(512, field_type=int)
    # Queries per attention chunk in every model's full forward; None = unchunked.
    c.memory.attention_chunk = config_dict.FieldReference(1024, field_type=int)

    # Mesh (opdplus_jax.sharding): -1 takes the remaining devices.
    c.mesh = config_dict.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    # Loop.
    c.train = config_dict.ConfigDict()
    c.train.num_steps = 100
    c.train.log_every = 1
    c.train.eval_every = 25  # 0 = only at the end
    c.train.checkpoint_every = 25
    c.train.keep_checkpoints = 3
    c.train.max_consecutive_skips = 5  # non-finite loss/grad steps in a row before stopping
    c.train.export_final = True  # write an HF folder of the student at the end
    # Verifier accuracy of the training rollouts: a logged metric only (never in the loss), so
    # bounded: all of a step's rollouts get at most this many seconds (None = no bound; the
    # rest score 0 and count as verifier/skipped). False skips it.
    c.train.verify_rollouts = True
    c.train.verify_budget_seconds = config_dict.FieldReference(10.0, field_type=float)

    # Evaluation (held-out prompts: accuracy, pass@k, student-teacher KL per token).
    c.eval = config_dict.ConfigDict()
    c.eval.num_prompts = 64
    c.eval.num_samples = 1  # samples per problem (pass@k uses k <= num_samples)
    c.eval.temperature = 0.0  # 0 = greedy
    c.eval.max_new_tokens = 64
    c.eval.batch_size = 32
    return c


def teacher(
    path: str,
    *,
    reward_scale: float = 1.0,
    reference: str | None = None,
    prompts_per_batch: int | None = None,
    template: str | None = None,
    context_field: str | None = None,
    context_format: str = "{prompt}\n\n{context}",
    max_prompt_len: int | None = None,
    retokenize: bool = False,
) -> config_dict.ConfigDict:
    """One entry of `config.teachers`: checkpoint folder, reward scale lambda, reference model,
    its prompts per batch, and the prompt it scores after (teacher-side context).

    Args:
      path: the teacher's Hugging Face checkpoint folder.
      reward_scale: G-OPD's lambda; 1 is plain OPD, any other value needs a reference.
      reference: None (no reference model), "student_init" (the student's initial weights) or a
        checkpoint folder. Kept a typed reference, so that overriding None checks the type.
      prompts_per_batch: prompts of every batch drawn from this teacher's records (its rows are
        one static block of the batch). None for every teacher splits data.batch_size equally;
        set it for every teacher (summing to data.batch_size) for other shares.
      template: None (the teacher scores the completion after the student's prompt) or "own"
        (its prompt rendered with the chat template of its own folder's tokenizer).
      context_field: a data field (e.g. "solution") placed in the teacher's user turn with
        `context_format` (privileged context, as in on-policy self-distillation); None: none.
      context_format: str.format template of that user turn, with {prompt} and {context}.
      max_prompt_len: token limit of the teacher's prompt (None: rollout.max_prompt_len); a
        record over it is dropped and counted.
      retokenize: the teacher has its own tokenizer (another vocabulary): it scores the
        student's decoded completion re-tokenised, after its own chat template, and the
        log-ratios are taken over aligned character groups (opdplus_jax.crosstok). Needs
        reward_scale 1 and estimator.support='sampled'.

    Returns:
      An unlocked ConfigDict, to be assigned to `config.teachers.<name>`.
    """
    t = config_dict.ConfigDict()
    t.path = path
    t.reward_scale = reward_scale
    t.reference = config_dict.FieldReference(reference, field_type=str)
    t.prompts_per_batch = config_dict.FieldReference(prompts_per_batch, field_type=int)
    t.template = config_dict.FieldReference(template, field_type=str)
    t.context_field = config_dict.FieldReference(context_field, field_type=str)
    t.context_format = context_format
    t.max_prompt_len = config_dict.FieldReference(max_prompt_len, field_type=int)
    t.retokenize = retokenize
    return t


def get_config(arg: str = "cpu") -> config_dict.ConfigDict:
    """Returns the locked config of preset `arg` (see the module docstring)."""
    c = _base()
    if arg == "cpu":
        # The demo's distillation (`python -m opdplus_jax.demo` builds these folders): 2-digit
        # addition; the student starts from a base SFT-trained on sloppy solutions, the teacher
        # is the same network with more SFT on clean ones; OPD+ with JSD, 64 prompts x 4 samples
        # per step for 80 steps, greedy held-out accuracy on 200 problems every 10 steps.
        models = "runs/demo/models"
        c.student.path = f"{models}/base"
        c.tokenizer_path = f"{models}/tokenizer"
        c.teachers.default = teacher(f"{models}/teacher")
        c.data.train_path = "runs/demo/data/train.jsonl"
        c.data.eval_path = "runs/demo/data/test.jsonl"
        c.data.batch_size = 64
        c.rollout.num_samples = 4
        c.estimator.divergence = "jsd"
        c.rollout.max_new_tokens = 32
        c.rollout.max_prompt_len = 32
        c.optimizer.learning_rate = 1e-3
        c.optimizer.warmup_steps = 5
        c.optimizer.schedule = "constant"
        c.train.num_steps = 80
        c.train.eval_every = 10
        c.train.checkpoint_every = 40
        c.eval.num_prompts = 200
        c.eval.batch_size = 200
        c.eval.max_new_tokens = 32
    elif arg == "strong_to_weak":
        # The cpu setting with a smaller student (the demo's `small_base`: a narrower network
        # SFT-trained on the same sloppy solutions) distilled from the same teacher.
        c = get_config("cpu").unlock()
        c.student.path = "runs/demo/models/small_base"
    elif arg == "qwen3_exopd":
        # Qwen3-1.7B student, Qwen3-8B (RL-trained) teacher; ExOPD lambda = 1.25 with reward
        # correction (reference = the teacher's pre-RL base); OPD+ with JSD.
        c.student.path = "/checkpoints/Qwen3-1.7B"
        c.student.dtype = "bfloat16"
        c.teachers.default = teacher(
            "/checkpoints/Qwen3-8B-RL", reward_scale=1.25, reference="/checkpoints/Qwen3-8B-Base"
        )
        c.estimator.divergence = "jsd"
        c.rollout.num_samples = 8
        c.rollout.max_new_tokens = 8192
        c.rollout.max_prompt_len = 1024
        c.data.batch_size = 64
        c.data.train_path = "/data/math/train.jsonl"
        c.data.eval_path = "/data/math/test.jsonl"
        c.optimizer.learning_rate = 1e-6
        c.optimizer.warmup_steps = 10
        c.optimizer.grad_accum = 4
        c.loss.tis_cap = 2.0
        c.mesh.data = -1
        c.mesh.fsdp = 8
        # 512 rows of 1024 + 8192 tokens: one row per device per microbatch, every student layer
        # recomputed in the backward, [1, 512, 151936] float32 logits at a time (0.3 GiB).
        c.memory.microbatch_rows = 1
        c.memory.remat = "full"
        c.memory.logits_chunk = 512
        c.memory.attention_chunk = 1024
        c.train.num_steps = 500
        c.eval.max_new_tokens = 8192
        c.eval.num_samples = 8
        c.eval.temperature = 0.6
    elif arg == "multi_teacher":
        # Two task-domain teachers merged into one student, as `python -m
        # experiments.multi_teacher` builds them: rows are routed by the data's `teacher` field.
        c = get_config("cpu").unlock()
        root = "runs/experiments/cache/multi_teacher"
        c.student.path = f"{root}/models/base"
        c.tokenizer_path = f"{root}/models/tokenizer"
        del c.teachers["default"]
        for domain in ("arithmetic", "tool_use"):
            c.teachers[domain] = teacher(f"{root}/models/teacher_{domain}")
        c.data.train_path = f"{root}/data/train.jsonl"
        c.data.eval_path = f"{root}/data/test.jsonl"
        c.rollout.max_prompt_len = 40  # tool-use prompts are longer, and so are the calls
        c.rollout.max_new_tokens = 52
        c.eval.max_new_tokens = 52
    else:
        raise ValueError(
            f"unknown preset {arg!r}; valid: cpu, strong_to_weak, qwen3_exopd, multi_teacher"
        )
    c.lock()
    return c
