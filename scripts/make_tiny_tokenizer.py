#!/usr/bin/env python3
"""A tiny byte-level BPE tokenizer shaped like SmolLM2's, for fedclient's data tests.

SmolLM2's own tokenizer.json (49,152 entries) is not committed. This one has the same
structure -- BPE model, `Digits(individual_digits) + ByteLevel` pre-tokenizer, ByteLevel
post-processor and decoder, ChatML special tokens first -- and a vocabulary of 1,024 trained
on the nine UDHR translations in data/udhr/, so multi-byte characters (Thai, Khmer, Burmese,
Lao, Vietnamese) are sometimes split across tokens, which is what `chars_started` must get
right. It also holds the Llama-3 header tokens so a Llama-3-style chat template can be
tokenized with it. Run once with the Python `tokenizers` package; the outputs are committed:

  python3 scripts/make_tiny_tokenizer.py client/tests/fixtures/tiny-bpe-tokenizer

Writes tokenizer.json and tokenizer_config.json (SmolLM2-Instruct's special tokens and its
ChatML chat template, verbatim).
"""
import glob
import json
import os
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = sys.argv[1] if len(sys.argv) > 1 else "client/tests/fixtures/tiny-bpe-tokenizer"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SPECIAL = [
    "<|endoftext|>",  # 0, as in SmolLM2
    "<|im_start|>",  # 1
    "<|im_end|>",  # 2
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

# SmolLM2-135M-Instruct's chat_template, verbatim.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main():
    texts = []
    for path in sorted(glob.glob(os.path.join(ROOT, "data", "udhr", "*.txt"))):
        with open(path, encoding="utf-8") as f:
            texts.extend(line for line in f.read().splitlines() if line.strip())

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)

    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"), pretty=False)
    config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "chat_template": SMOLLM2_TEMPLATE,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
    }
    with open(os.path.join(OUT, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")

    # Sanity: byte-level BPE round-trips every line.
    for line in texts:
        assert tok.decode(tok.encode(line, add_special_tokens=False).ids) == line
    print(f"vocab {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
