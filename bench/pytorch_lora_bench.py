#!/usr/bin/env python3
"""PyTorch + PEFT baseline for Mekong's LoRA fine-tuning benchmark (not run in CI).

The same workload as `cargo bench -p fedclient --bench lora_finetune`: SmolLM2-135M-Instruct
(the GGUF from scripts/fetch-model.sh, dequantised to f32 by transformers), LoRA rank 8,
alpha 16 on q,k,v,o,gate,up,down, AdamW, sequences of 256 tokens of UDHR text, batch 4.
Reports tokens/s over the timed steps and the process's peak resident memory.

  python3 -m venv /tmp/bench && /tmp/bench/bin/pip install torch transformers peft gguf
  /tmp/bench/bin/python bench/pytorch_lora_bench.py --gguf ~/.cache/mekong/models/SmolLM2-135M-Instruct.Q4_1.gguf

--ffa freezes lora_A (FFA-LoRA, what a Mekong federation trains); without it both A and B
train, as in plain PEFT.
"""
import argparse
import json
import os
import platform
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gguf", required=True)
    p.add_argument("--text", default=os.path.join(os.path.dirname(__file__), "..", "data", "udhr", "en.txt"))
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--ffa", action="store_true")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    d, f = os.path.split(os.path.abspath(os.path.expanduser(a.gguf)))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    cfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(model, cfg)
    if a.ffa:
        for n, prm in model.named_parameters():
            if "lora_A" in n:
                prm.requires_grad_(False)
    model.train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    ids = tok(open(a.text, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
    while len(ids) < 4 * a.seq * a.batch:
        ids = ids + ids
    g = torch.Generator().manual_seed(1)
    data = torch.tensor(ids)

    def step():
        starts = torch.randint(0, len(ids) - a.seq - 1, (a.batch,), generator=g)
        x = torch.stack([data[s:s + a.seq + 1] for s in starts])
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    for _ in range(a.warmup):
        step()
    t = time.perf_counter()
    losses = [step() for _ in range(a.steps)]
    dt = time.perf_counter() - t
    tokens = a.steps * a.batch * a.seq
    print(json.dumps({
        "impl": f"pytorch {torch.__version__} + peft",
        "ffa": a.ffa,
        "threads": a.threads,
        "seq": a.seq, "batch": a.batch, "steps": a.steps,
        "trainable_params": sum(q.numel() for q in trainable),
        "tokens_per_s": round(tokens / dt, 1),
        "s_per_step": round(dt / a.steps, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "last_loss": round(losses[-1], 4),
        "cpu": platform.processor() or platform.machine(),
    }))


if __name__ == "__main__":
    main()
