#!/usr/bin/env python3
"""Tiny random Llama-family checkpoints with reference logits from Hugging Face transformers.

An independent implementation (transformers, on CPU) produces the logits our burn model must
reproduce within 1e-4 (client/tests/checkpoint_parity.rs). Run once; the outputs are
committed:

  python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch transformers safetensors
  /tmp/fx/bin/python scripts/make_tiny_checkpoints.py client/tests/fixtures

Writes, for each model, a Hugging Face directory (config.json, model.safetensors) and
`reference.json` with input ids and the logits of every position:
  tiny-qwen2/        Qwen2: q/k/v biases, grouped-query attention (4 heads, 2 KV heads),
                     untied embeddings, f32.
  tiny-qwen2-bf16/   the same weights in bf16, sharded over several files with an index.
  tiny-llama3/       Llama: tied embeddings, Llama-3 rope scaling, explicit head_dim, f32.
"""
import json
import os
import sys

import torch
from transformers import (AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

OUT = sys.argv[1] if len(sys.argv) > 1 else "client/tests/fixtures"
INPUT_IDS = [[1, 17, 42, 99, 5, 63, 120, 7, 7, 31, 88, 2, 64, 101, 11, 3]]


def randomize(model, seed):
    """Weights far from init defaults (norms and biases too) so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def save(model, name, ids, **kwargs):
    path = os.path.join(OUT, name)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    # The reference comes from the saved files, loaded afresh in f32 (casting the in-memory
    # model would also round its RoPE frequency buffer to bf16).
    model_f32 = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model_f32(torch.tensor(ids)).logits
    ref = {
        "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, eager attention, f32",
        "input_ids": ids,
        "logits": logits[0].tolist(),
    }
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(ref, f)
    # generation_config.json carries nothing we read.
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def main():
    torch.manual_seed(0)
    qwen_cfg = Qwen2Config(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    qwen = Qwen2ForCausalLM(qwen_cfg).eval()
    randomize(qwen, 1)
    save(qwen, "tiny-qwen2", INPUT_IDS)

    bf16 = Qwen2ForCausalLM(qwen_cfg).eval()
    bf16.load_state_dict(qwen.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    save(bf16, "tiny-qwen2-bf16", INPUT_IDS, max_shard_size="20KB")

    llama_cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=24,
        max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
        attn_implementation="eager",
    )
    llama = LlamaForCausalLM(llama_cfg).eval()
    randomize(llama, 2)
    save(llama, "tiny-llama3", INPUT_IDS)


if __name__ == "__main__":
    main()
