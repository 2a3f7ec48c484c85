#!/usr/bin/env python3
"""A tiny random Gemma 3 (text) checkpoint with reference logits from Hugging Face transformers.

Gemma 3 departs from the Llama family in ways a loader can get silently wrong: embeddings scaled
by sqrt(hidden_size), RMSNorm weights applied as (1 + w), four norms per layer (before and after
both attention and MLP), RMSNorm on every query and key head before RoPE, attention scaled by
query_pre_attn_scalar^-0.5 instead of head_dim^-0.5, tanh-approximated GELU, and layers that
alternate between a sliding window with its own RoPE base and full attention with another. An
independent implementation (transformers, on CPU) produces the logits our burn model must
reproduce within 1e-4, in the manner of scripts/make_tiny_checkpoints.py. Run once; the
outputs are committed:

  python3 -m venv /tmp/fx && /tmp/fx/bin/pip install torch transformers safetensors
  /tmp/fx/bin/python scripts/make_tiny_gemma3.py client/tests/fixtures

Writes tiny-gemma3/ (config.json, model.safetensors) and `reference.json` with input ids and
the logits of every position, plus what the reference run used: layer_types, sliding_window,
the RoPE base of each layer type and the embedding scale. Every choice below is made so that
getting it wrong moves the logits:
  head_dim 16            != hidden_size / num_attention_heads (8)
  query_pre_attn_scalar 24   != head_dim, so scaling by head_dim^-0.5 is wrong
  layer_types            sliding, sliding, full, sliding, written out; sliding_window_pattern=3
                         (the older hub field, which gives the same) is passed too, else
                         transformers writes its default "_sliding_window_pattern": 6 beside them
  sliding_window 5       shorter than the 16-token input, so the window cuts attention
  RoPE bases             1e6 for full_attention layers, 1e4 for sliding_attention layers
  embedding scale        sqrt(32), which is not exact in f32
  norm weights           w = 0.2 * randn, used as (1 + w): all six norms of every layer
                         (four around attention and MLP, q_norm, k_norm) and the final norm
  tied embeddings, gelu_pytorch_tanh, no softcapping, eager attention, f32.
"""
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

OUT = sys.argv[1] if len(sys.argv) > 1 else "client/tests/fixtures"
INPUT_IDS = [[1, 17, 42, 99, 5, 63, 120, 7, 7, 31, 88, 2, 64, 101, 11, 3]]
ROPE_GLOBAL = 1_000_000.0
ROPE_LOCAL = 10_000.0


def randomize(model, seed):
    """Weights far from init defaults so every tensor matters. Gemma's RMSNorm multiplies by
    (1 + w), so its weights are drawn around 0, not around 1 as for Llama."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def logits_of(path, **overrides):
    """Logits of the saved files, loaded afresh in f32 (as make_tiny_checkpoints.py does)."""
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", **overrides).eval()
    with torch.no_grad():
        return model, model(torch.tensor(INPUT_IDS)).logits


def main():
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        max_position_embeddings=64, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        sliding_window=5, sliding_window_pattern=3,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": ROPE_GLOBAL},
            "sliding_attention": {"rope_type": "default", "rope_theta": ROPE_LOCAL},
        },
        attn_logit_softcapping=None, final_logit_softcapping=None,
        tie_word_embeddings=True, attn_implementation="eager",
    )
    model = Gemma3ForCausalLM(cfg).eval()
    randomize(model, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    path = os.path.join(OUT, "tiny-gemma3")
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)

    reloaded, logits = logits_of(path)
    emb = reloaded.model.embed_tokens
    embed_scale = emb.embed_scale.to(emb.weight.dtype).item()
    assert embed_scale == torch.tensor(math.sqrt(cfg.hidden_size), dtype=torch.float32).item()
    # The window must change the answer: without it (a window as long as the input) the
    # logits differ, so a model that ignores it fails.
    _, unwindowed = logits_of(path, sliding_window=len(INPUT_IDS[0]))
    assert (unwindowed - logits).abs().max() > 1e-2, "sliding window changes nothing"

    rc = reloaded.config
    ref = {
        "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, eager attention, f32",
        "input_ids": INPUT_IDS,
        "logits": logits[0].tolist(),
        "layer_types": list(rc.layer_types),
        "sliding_window": rc.sliding_window,
        "rope_theta": {t: rc.rope_parameters[t]["rope_theta"] for t in sorted(set(rc.layer_types))},
        "embed_scale": embed_scale,
    }
    with open(os.path.join(path, "reference.json"), "w") as f:
        json.dump(ref, f)
    # generation_config.json carries nothing we read.
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)

    print(f"max |logit| = {logits.abs().max().item():.4f}, "
          f"max |Δ| without the window = {(unwindowed - logits).abs().max().item():.4f}")
    for name in sorted(os.listdir(path)):
        print(f"  {name}: {os.path.getsize(os.path.join(path, name))} bytes")


if __name__ == "__main__":
    main()
