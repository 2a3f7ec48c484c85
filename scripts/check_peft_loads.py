#!/usr/bin/env python3
"""Loads adapters exported by Mekong into Python PEFT, and checks they load unchanged.

Not run in CI (it needs torch, transformers and peft). Run from the repository root:

  MEKONG_PEFT_EXPORT=/tmp/mekong-peft \\
      cargo test -p fedcore --test peft_interop -- --ignored export_ours_for_python_peft
  /work/pyenv/bin/python scripts/check_peft_loads.py /tmp/mekong-peft

For every `<name>/` under the export directory (one per fedcore/tests/fixtures/peft fixture,
with the fixture's fixture.json copied beside the adapter), this:
  1. loads the base model named in fixture.json and `PeftModel.from_pretrained`s Mekong's
     directory, failing on any warning (missing or unexpected adapter keys, unknown config
     keys) other than transformers' own deprecation notices;
  2. loads it again with `load_adapter` and checks that the load result lists no missing and
     no unexpected keys;
  3. checks the loaded LoraConfig (r, lora_alpha, lora_dropout, target_modules, and that no
     LoRA variant is on) and every lora_A / lora_B against the fixture's value formula;
  4. checks the logits equal those of the same base with PEFT's own fixture adapter.
Prints one line per adapter and exits non-zero on the first failure.
"""
import json
import os
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_peft_fixture import OUT as FIXTURES  # noqa: E402
from make_peft_fixture import value  # noqa: E402

# Warnings that are about the environment, not the adapter.
BENIGN = ("is_gradient_checkpointing",)
INPUT_IDS = torch.tensor([[1, 17, 42, 99, 5, 63, 120, 7]])


def fail(name, message):
    sys.exit(f"{name}: FAIL: {message}")


def load(base, adapter_dir):
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir)


def check(name, adapter_dir):
    with open(os.path.join(adapter_dir, "fixture.json")) as f:
        record = json.load(f)
    base = record["base_model"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load(base, adapter_dir)
    for w in caught:
        if not any(b in str(w.message) for b in BENIGN):
            fail(name, f"warning while loading: {w.message}")

    second = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    second = PeftModel.from_pretrained(second, adapter_dir, adapter_name="first")
    result = second.load_adapter(adapter_dir, adapter_name="again")
    if result.missing_keys or result.unexpected_keys:
        fail(name, f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")

    config = model.peft_config["default"]
    expected = {
        "r": record["r"],
        "lora_alpha": record["lora_alpha"],
        "lora_dropout": record["lora_dropout"],
        "target_modules": set(record["target_modules"]),
        "base_model_name_or_path": base,
        "use_dora": False,
        "use_rslora": False,
        "bias": "none",
        "modules_to_save": None,
        "layers_to_transform": None,
    }
    for key, want in expected.items():
        got = getattr(config, key)
        if got != want:
            fail(name, f"config {key} is {got!r}, expected {want!r}")

    checked = 0
    for key, p in model.named_parameters():
        if ".lora_A." in key or ".lora_B." in key:
            # PEFT's in-memory name carries the adapter name; the file's key does not.
            file_key = key.replace(".default.", ".")
            want = value(file_key, tuple(p.shape))
            if not torch.equal(p.detach(), want):
                fail(name, f"{file_key} differs from the formula")
            checked += 1
    layers = AutoModelForCausalLM.from_pretrained(base).config.num_hidden_layers
    if checked != 2 * layers * len(record["target_modules"]):
        fail(name, f"{checked} LoRA tensors loaded")

    reference = load(base, os.path.join(FIXTURES, name))
    with torch.no_grad():
        ours = model(INPUT_IDS).logits
        theirs = reference(INPUT_IDS).logits
        with model.disable_adapter():
            without = model(INPUT_IDS).logits
    if not torch.equal(ours, theirs):
        fail(name, f"logits differ from PEFT's own adapter by {(ours - theirs).abs().max()}")
    if torch.equal(ours, without):
        fail(name, "the adapter changes nothing")
    print(f"{name}: OK ({checked} tensors, config as set, logits equal PEFT's own adapter's)")


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = sys.argv[1]
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not names:
        sys.exit(f"no adapters under {root}")
    for name in names:
        check(name, os.path.join(root, name))


if __name__ == "__main__":
    main()
