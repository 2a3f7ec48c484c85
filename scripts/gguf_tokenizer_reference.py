#!/usr/bin/env python3
"""Reference token ids for the tokenizer built from a GGUF file's own metadata
(client/src/checkpoint/gguf/tokenizer.rs), on the UDHR texts, with SmolLM2-135M-Instruct.

  scripts/fetch-model.sh
  /work/pyenv/bin/python scripts/gguf_tokenizer_reference.py \
      ~/.cache/mekong/models/SmolLM2-135M-Instruct.Q4_1.gguf data/udhr \
      client/tests/fixtures/gguf/smollm2-udhr-ids.json

The ids come from transformers' own GGUF tokenizer conversion
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`: vocabulary, merges, byte-level mapping and
special tokens read from the file by transformers), encoding the first 3000 characters of each
language with `add_special_tokens=False`.

One correction is applied to that conversion, and recorded in the output: transformers 5.23 has
no entry for the file's `tokenizer.ggml.pre = "smollm"` and falls back to the plain GPT-2 split,
while llama.cpp (the runtime GGUF files are written for) and SmolLM2's own tokenizer.json split
every digit off first (llama.cpp: regexes "\\p{N}" then the GPT-2 pattern). The two differ
only where a space precedes a digit that the vocabulary can merge with it, which in the UDHR
happens for Khmer and Burmese digits. `ids` therefore uses llama.cpp's split (run by the
Python `tokenizers` library, whose regex engine is Oniguruma, not the Rust one under test);
`transformers_unpatched` records, wherever the unpatched conversion differs, its length and
where and how it first differs, so the difference stays visible.
"""
import hashlib
import json
import os
import sys

from tokenizers import Regex, Tokenizer, pre_tokenizers
from transformers import AutoTokenizer

LANGS = ["lo", "km", "th", "vi", "my", "id", "ms", "tl", "en"]
CHARS = 3000
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def main():
    gguf_path, udhr_dir, out = sys.argv[1], sys.argv[2], sys.argv[3]
    directory, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)

    patched = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    patched.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(GPT2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])

    with open(gguf_path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    languages = {}
    for lang in LANGS:
        with open(os.path.join(udhr_dir, f"{lang}.txt"), encoding="utf-8") as f:
            text = f.read()[:CHARS]
        unpatched = tok(text, add_special_tokens=False)["input_ids"]
        ids = patched.encode(text, add_special_tokens=False).ids
        assert patched.decode(ids, skip_special_tokens=False) == text, lang
        entry = {"ids": ids}
        if unpatched != ids:
            at = next(i for i, (a, b) in enumerate(zip(unpatched + [None], ids + [None])) if a != b)
            entry["transformers_unpatched"] = {
                "count": len(unpatched),
                "first_difference": at,
                "ids_from_there": unpatched[at:at + 8],
            }
        languages[lang] = entry
        print(lang, len(ids), "differs from unpatched" if unpatched != ids else "")

    import tokenizers
    import transformers
    fixture = {
        "generator": f"scripts/gguf_tokenizer_reference.py: transformers {transformers.__version__}, "
                     f"tokenizers {tokenizers.__version__}",
        "model_file": name,
        "model_sha256": sha,
        "chars": CHARS,
        "add_special_tokens": False,
        "languages": languages,
    }
    with open(out, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
