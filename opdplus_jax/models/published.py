"""Published architectures: the `config.json` values of public checkpoints, as `ModelConfig`s.

The ahead-of-time planner (`opdplus_jax.plan`) needs the shapes of a config's models on a machine
that does not hold the checkpoints. It reads a folder's `config.json` when the folder exists;
otherwise it matches the folder's name against this table:

    published.lookup("/checkpoints/Qwen3-8B-RL")     # -> ("Qwen3-8B", ModelConfig(...))
    published.get("Qwen3-1.7B").num_params()         # 1.72e9 (the tied embedding counted once)

Names match case-insensitively, with a training-stage suffix allowed (`-Base`, `-RL`, as in a
pre-RL base and its RL-trained teacher). Values are copied from each model's `config.json` on the
Hugging Face hub (Qwen/Qwen3-*, Qwen/Qwen2.5-*, meta-llama/Llama-3.1-8B); only the network's
shape matters here, so generation settings (e.g. the instruct variants' extra EOS ids) follow the
base checkpoints. `TOKENIZER_VOCAB` is the size of each family's tokenizer (its embedding is
padded beyond it).
"""

from __future__ import annotations

import os

from opdplus_jax.models.config import ModelConfig

# Training-stage suffixes a checkpoint folder's name may carry (lower case).
SUFFIXES = ("-base", "-rl")


def _qwen3(hidden, intermediate, layers, heads, tie) -> ModelConfig:
    return ModelConfig(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=tie,
        qk_norm=True,
        bos_token_id=151643,
        eos_token_id=151645,
    )


def _qwen25(vocab, hidden, intermediate, layers, heads, kv_heads, tie) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=tie,
        qkv_bias=True,
        bos_token_id=151643,
        eos_token_id=151643,
    )


LLAMA_31_8B = ModelConfig(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rms_norm_eps=1e-5,
    rope_theta=500_000.0,
    rope_type="llama3",
    rope_params=(
        ("factor", 8.0),
        ("high_freq_factor", 4.0),
        ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 8192),
    ),
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)

# name -> architecture (the hub's spelling; lookups ignore case).
ARCHITECTURES: dict[str, ModelConfig] = {
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, tie=True),
    "Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, tie=True),
    "Qwen3-4B": _qwen3(2560, 9728, 36, 32, tie=True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, tie=False),
    "Qwen3-14B": _qwen3(5120, 17408, 40, 40, tie=False),
    "Qwen2.5-1.5B": _qwen25(151936, 1536, 8960, 28, 12, 2, tie=True),
    "Qwen2.5-7B": _qwen25(152064, 3584, 18944, 28, 28, 4, tie=False),
    "Llama-3.1-8B": LLAMA_31_8B,
}

# Tokenizer vocabulary per model_type (len(tokenizer)): sampling and scoring slice logits to it.
TOKENIZER_VOCAB = {"qwen3": 151669, "qwen2": 151665, "llama": 128256}


def names() -> list[str]:
    """The published names, in table order."""
    return list(ARCHITECTURES)


def get(name: str) -> ModelConfig:
    """The architecture of a published name (case-insensitive, `-Base`/`-RL` allowed).

    Raises:
      KeyError: naming the valid names.
    """
    found = match(name)
    if found is None:
        raise KeyError(f"no published architecture {name!r}; known: {', '.join(names())}")
    return ARCHITECTURES[found]


def match(name: str) -> str | None:
    """The published name that `name` (a name or a folder path) denotes, or None.

    The folder's basename is compared case-insensitively, after removing one `-Base` or `-RL`
    suffix: `/checkpoints/Qwen3-8B-RL` and `qwen3-8b-base` both denote `Qwen3-8B`.
    """
    base = os.path.basename(os.path.normpath(name)).lower()
    candidates = [base] + [base[: -len(s)] for s in SUFFIXES if base.endswith(s)]
    by_lower = {n.lower(): n for n in ARCHITECTURES}
    for candidate in candidates:
        if candidate in by_lower:
            return by_lower[candidate]
    return None


def lookup(path: str) -> tuple[str, ModelConfig] | None:
    """(published name, architecture) for a checkpoint folder's path, or None if unknown."""
    found = match(path)
    return None if found is None else (found, ARCHITECTURES[found])


def tokenizer_vocab(config: ModelConfig) -> int:
    """The tokenizer vocabulary of a published family (the embedding size if unknown)."""
    return TOKENIZER_VOCAB.get(config.model_type, config.vocab_size)
