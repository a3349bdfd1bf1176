"""A character-level tokenizer for the synthetic tasks, saved as a Hugging Face tokenizer folder.

One token per character of printable ASCII plus newline and tab (a superset of every task's
alphabet, so tokenization never depends on which tasks were generated), and special tokens:

    id 0 <pad>   1 <unk>   2 <bos>   3 <|im_end|> (EOS: ends every turn)
       4 <|system|>   5 <|user|>   6 <|assistant|>   (one token per chat role)

Chat template (a role token opens each turn, EOS closes it)::

    <bos><|user|>What is 2 + 3?<|im_end|><|assistant|>2+3+0=5
    #### 5<|im_end|>

The folder (tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja)
loads with
``transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)`` and with
`opdplus_jax.tokenizer.Tokenizer.from_pretrained`. Decoding (encode -> decode) returns the text
exactly for any string over the alphabet. CLI::

    python -m opdplus_jax.tasks.tokenizer --out path/to/tokenizer
"""

from __future__ import annotations

import argparse
import json
import os

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, *ROLE_TOKENS)
ALPHABET = "".join(chr(i) for i in range(32, 127)) + "\n\t"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def vocab() -> dict[str, int]:
    """Token -> id: the special tokens first, then one entry per alphabet character."""
    return {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *ALPHABET))}


def build_tokenizer():
    """The tokenizer as a `transformers.PreTrainedTokenizerFast` (not saved)."""
    import transformers
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer

    raw = RawTokenizer(models.WordLevel(vocab=vocab(), unk_token=UNK))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
    )


def save_tokenizer(folder: str | os.PathLike) -> str:
    """Write the tokenizer folder (created if needed) and return its path."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok = build_tokenizer()
    tok.save_pretrained(folder)
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # loadable by older transformers too
    config["model_max_length"] = 4096
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": list(ROLE_TOKENS),
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special_map, f, indent=2)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True, help="folder to write the tokenizer files into")
    args = parser.parse_args(argv)
    folder = save_tokenizer(args.out)
    print(f"wrote a {len(vocab())}-token character tokenizer to {folder}")


if __name__ == "__main__":
    main()
