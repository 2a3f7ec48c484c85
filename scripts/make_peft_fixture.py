#!/usr/bin/env python3
"""PEFT adapters written by Python PEFT itself, the reference `fedcore::peft` must match.

Loads the committed tiny checkpoints (client/tests/fixtures/tiny-qwen2, tiny-llama3; made by
scripts/make_tiny_checkpoints.py) with transformers, wraps each with `peft.get_peft_model` and
a LoRA config, overwrites every lora_A and lora_B with known values (see `value` below), and
saves with `save_pretrained`. fedcore/tests/peft_interop.rs builds the same adapter in Rust
and compares key names, shapes, dtypes, safetensors metadata, adapter_config.json and the
values. Run once from the repository root; the outputs are committed:

  /work/pyenv/bin/python scripts/make_peft_fixture.py            # or any venv with
  # torch, transformers, peft, safetensors

Writes fedcore/tests/fixtures/peft/<name>/ for every entry of FIXTURES:
  adapter_model.safetensors, adapter_config.json   exactly as PEFT wrote them
  fixture.json   what this script did: base model, LoRA settings, targets, value formula,
                 and the library versions (PEFT's README.md is deleted: it carries nothing
                 we read).

The base model is loaded by its relative path, so `base_model_name_or_path` in the committed
config is `client/tests/fixtures/<model>`, not a path on the machine that made it.
"""
import json
import os
import shutil
import sys
import warnings

import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

OUT = "fedcore/tests/fixtures/peft"
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FIXTURES = [
    # name, base model directory, target modules
    ("tiny-qwen2-all", "client/tests/fixtures/tiny-qwen2", ALL),
    ("tiny-qwen2-qv", "client/tests/fixtures/tiny-qwen2", ["q_proj", "v_proj"]),
    ("tiny-llama3-all", "client/tests/fixtures/tiny-llama3", ALL),
    ("tiny-llama3-qv", "client/tests/fixtures/tiny-llama3", ["q_proj", "v_proj"]),
]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05}

VALUE_FORMULA = (
    "For the tensor of layer L, target t (index in "
    + ",".join(ALL)
    + ") and half h (0 = lora_A, 1 = lora_B), s = 14*L + 2*t + h; "
    "the value at row-major index i is (2*((7*i + 13*s) mod 97) - 97) / 128 "
    "(never zero, exact in f32)."
)


def stream_id(key):
    """s of VALUE_FORMULA for a PEFT tensor key."""
    parts = key.split(".")
    layer = int(parts[parts.index("layers") + 1])
    target = next(i for i, t in enumerate(ALL) if f".{t}." in key)
    half = 0 if ".lora_A." in key else 1
    return 14 * layer + 2 * target + half


def value(key, shape):
    """The known values of one tensor (see VALUE_FORMULA), computed exactly in integers."""
    n = shape[0] * shape[1]
    s = stream_id(key)
    ints = torch.tensor([2 * ((7 * i + 13 * s) % 97) - 97 for i in range(n)], dtype=torch.float32)
    return (ints / 128.0).reshape(shape)


def make(name, base, targets):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(target_modules=targets, task_type="CAUSAL_LM", **LORA)
    model = get_peft_model(model, config)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if ".lora_A." in key or ".lora_B." in key:
                p.copy_(value(key, tuple(p.shape)))
    path = os.path.join(OUT, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(path)
    for w in caught:
        print(f"{name}: warning while saving: {w.message}", file=sys.stderr)
    readme = os.path.join(path, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    record = {
        "generator": (
            f"scripts/make_peft_fixture.py: peft {peft.__version__}, transformers "
            f"{transformers.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}"
        ),
        "base_model": base,
        "r": LORA["r"],
        "lora_alpha": LORA["lora_alpha"],
        "lora_dropout": LORA["lora_dropout"],
        "target_modules": targets,
        "values": VALUE_FORMULA,
    }
    with open(os.path.join(path, "fixture.json"), "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    print(f"wrote {path}")


def main():
    if not os.path.isdir("client/tests/fixtures/tiny-qwen2"):
        sys.exit("run from the repository root")
    for name, base, targets in FIXTURES:
        make(name, base, targets)


if __name__ == "__main__":
    main()
