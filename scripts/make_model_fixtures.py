"""Build the tiny Hugging Face checkpoints and reference outputs under tests/testdata/models/.

Run with a Python that has PyTorch (CPU) and transformers, from the repository root:

    python3.11 -m venv /path/to/torch-venv
    /path/to/torch-venv/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors numpy \
        jinja2 tokenizers
    HF_HUB_OFFLINE=1 /path/to/torch-venv/bin/python scripts/make_model_fixtures.py

Everything is deterministic (fixed seeds, float32, eager attention) and nothing is downloaded.
For each family (`qwen3_tied`; `qwen3_untied` with yarn RoPE and head_dim 32 != hidden/heads, as
in Qwen3-4B; `qwen2` with q/k/v biases and GQA; `llama3` with rope_type "llama3", untied) it
writes a folder that is exactly what transformers' `save_pretrained` wrote (config.json,
model.safetensors, tokenizer files), plus:

- `reference.npz`: `input_ids` [3, 12] and transformers' float32 `logits` [3, 12, V]; a
  left-padded batch `padded_input_ids`, `padded_attention_mask`, `padded_position_ids`
  (cumsum(mask) - 1) and `padded_logits`;
- `generate.json`: per prompt (ragged token-id lists built with the chat template) the greedy
  `generate` continuation with `max_new_tokens=8` and EOS disabled: `tokens` over all V logit
  columns, `tokens_tokenizer_vocab` with the padding columns (>= the tokenizer's vocabulary)
  suppressed, i.e. logits sliced to the tokenizer; plus the smallest top-1/top-2 logit margin
  along the way (ties would make greedy decoding ill-defined);
- `export_reference.json`: tensor names, shapes and dtypes, and the config.json keys, as written
  by transformers.

`qwen3_sharded` holds the `qwen3_tied` weights saved by transformers with a small
`max_shard_size` (model.safetensors.index.json + shards). The tokenizer (a 280-token byte-level
BPE with Qwen2's pre-tokenizer, trained on a fixed text with the `tokenizers` library, ChatML chat
template) is shared by all families; the models' embeddings have 304 rows, so logits carry 24
padding columns, as in real checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "testdata", "models")
VOCAB = 304  # embedding rows (> tokenizer vocabulary: padded like real checkpoints)
TOKENIZER_VOCAB = 280  # 256 bytes + 3 special tokens + 21 merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SPLIT_PATTERN = (  # Qwen2's pre-tokenizer regex
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    "the student samples a sequence and the teacher scores every token of it",
    "on policy distillation trains the student on its own samples",
    "a reverse kl advantage is the log ratio of teacher and student probabilities",
    "the quick brown fox jumps over the lazy dog while the cat sleeps",
    "numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like , . ? ! : ; ( ) + - = appear too",
    "what is the sum of two and three? the answer is five.",
    "please write a short poem about the sea and the wind",
]
PROMPTS = [
    "what is the sum of two and three?",
    "write a poem about the sea",
    "hello",
]
COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 256,
}


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's pre-tokenizer (what AutoTokenizer rebuilds for qwen folders)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def save_tokenizer(tok, folder: str, model_type: str) -> None:
    """Save like real checkpoints: Qwen folders name Qwen2Tokenizer, Llama 3 the fast tokenizer."""
    tok.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = (
        "PreTrainedTokenizerFast" if model_type == "llama" else "Qwen2Tokenizer"
    )
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    loaded = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "hello world, what is  the sum?\n\n<|im_end|> 123"
    assert loaded.encode(text) == tok.encode(text), f"{folder}: tokenizer does not round-trip"


def family_configs(tok) -> dict[str, transformers.PretrainedConfig]:
    ids = {
        "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
        "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "bos_token_id": None,
    }
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return {
        "qwen3_tied": transformers.Qwen3Config(
            **COMMON, **ids, head_dim=16, tie_word_embeddings=True
        ),
        "qwen3_untied": transformers.Qwen3Config(
            **COMMON, **ids, head_dim=32, tie_word_embeddings=False, rope_parameters=yarn
        ),
        "qwen2": transformers.Qwen2Config(**COMMON, **ids, tie_word_embeddings=False),
        "llama3": transformers.LlamaConfig(
            **COMMON, **ids, tie_word_embeddings=False, rope_parameters=llama3
        ),
    }


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (transformers initialises biases to 0 and norms to 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


def reference_logits(model, tok) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(len(SPECIALS), TOKENIZER_VOCAB, size=(3, 12))
    lengths = [12, 7, 4]
    pad = tok.pad_token_id
    padded = np.full_like(ids, pad)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):
        padded[b, 12 - n :] = ids[b, :n]
        mask[b, 12 - n :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits.float().numpy()
        padded_logits = (
            model(
                torch.tensor(padded),
                attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(positions),
            )
            .logits.float()
            .numpy()
        )
    return {
        "input_ids": ids.astype(np.int32),
        "logits": logits.astype(np.float32),
        "padded_input_ids": padded.astype(np.int32),
        "padded_attention_mask": mask.astype(np.int32),
        "padded_position_ids": positions.astype(np.int32),
        "padded_lengths": np.array(lengths, np.int32),
        "padded_logits": padded_logits.astype(np.float32),
    }


def _greedy(model, prompt, tok, max_new_tokens, suppress):
    with torch.no_grad():
        res = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_token_id,
            suppress_tokens=suppress,
            output_scores=True,
            return_dict_in_generate=True,
        )
    new = res.sequences[0, len(prompt) :].tolist()
    margins = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in res.scores]
    return new, min(margins)


def greedy(model, tok, max_new_tokens: int = 8) -> dict:
    out = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": None,
        "tokenizer_vocab_size": len(tok),
        "samples": [],
    }
    for text in PROMPTS:
        messages = [{"role": "user", "content": text}]
        enc = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        prompt = list(enc["input_ids"])
        tokens, margin = _greedy(model, prompt, tok, max_new_tokens, None)
        padding_columns = list(range(len(tok), model.config.vocab_size))
        tokens_sliced, margin_sliced = _greedy(model, prompt, tok, max_new_tokens, padding_columns)
        out["samples"].append(
            {
                "prompt": prompt,
                "tokens": tokens,
                "tokens_tokenizer_vocab": tokens_sliced,
                "min_margin": min(margin, margin_sliced),
            }
        )
    return out


def export_reference(folder: str) -> dict:
    from safetensors import safe_open

    tensors = {}
    with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(name)
            tensors[name] = {"shape": list(t.shape), "dtype": str(t.dtype)}
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return {"tensors": tensors, "config_keys": sorted(config), "config": config}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    tok = build_tokenizer()
    for seed, (family, config) in enumerate(family_configs(tok).items()):
        folder = os.path.join(OUT, family)
        shutil.rmtree(folder, ignore_errors=True)
        config.architectures = None
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="eager", dtype=torch.float32
        ).eval()
        randomize(model, seed=1000 + seed)
        model.save_pretrained(folder)
        save_tokenizer(tok, folder, config.model_type)
        np.savez(os.path.join(folder, "reference.npz"), **reference_logits(model, tok))
        gen = greedy(model, tok)
        with open(os.path.join(folder, "generate.json"), "w") as f:
            json.dump(gen, f, indent=1)
        with open(os.path.join(folder, "export_reference.json"), "w") as f:
            json.dump(export_reference(folder), f, indent=1, sort_keys=True)
        margin = min(s["min_margin"] for s in gen["samples"])
        print(f"{family}: {sum(p.numel() for p in model.parameters())} params, margin {margin:.4f}")
        if family == "qwen3_tied":
            sharded = os.path.join(OUT, "qwen3_sharded")
            shutil.rmtree(sharded, ignore_errors=True)
            model.save_pretrained(sharded, max_shard_size="150KB")
            save_tokenizer(tok, sharded, config.model_type)
            print("qwen3_sharded:", sorted(os.listdir(sharded)))
    print("transformers", transformers.__version__, "torch", torch.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
