#!/usr/bin/env python3
"""A tiny Llama checkpoint as a Hugging Face directory and as a GGUF file converted from it, with
reference logits and token ids from transformers reading the GGUF.

This is the fixture for client/src/checkpoint/gguf: the GGUF must yield, tensor by tensor, the
Hugging Face tensors (after the same rounding to the stored type), which proves names, dimension
order and the undoing of llama.cpp's q/k row permutation; and a model built from it must give
the logits transformers computes from the same file. Run once; the outputs are committed:

  /work/pyenv/bin/python scripts/make_tiny_gguf.py client/tests/fixtures/tiny-llama-gguf

Writes into that directory:
  config.json, model.safetensors   the Hugging Face checkpoint (Llama, f32, untied embeddings,
                                   GQA with 4 heads / 2 KV heads, hidden 32, vocab 128, no rope
                                   scaling).
  tiny-llama.gguf                  the same weights as llama.cpp's converter writes them: GGUF
                                   names, dimensions reversed, q/k rows permuted for interleaved
                                   RoPE, with mixed storage types (F32 norms; F16, BF16 and Q8_0
                                   matrices), and a small SentencePiece-style ("llama") vocabulary
                                   with scores.
  reference.json                   logits of every position for fixed input ids, computed by
                                   transformers from the GGUF (`from_pretrained(dir,
                                   gguf_file=...)`, which dequantises with gguf-py and un-permutes
                                   q/k itself), in the format of tiny-qwen2/reference.json.
  tokenizer-reference.json         token ids transformers' GGUF tokenizer conversion gives for a
                                   few strings, with and without special tokens, and its decoding.
"""
import json
import os
import sys

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter, TokenType
from gguf.quants import quantize
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

OUT = sys.argv[1] if len(sys.argv) > 1 else "client/tests/fixtures/tiny-llama-gguf"
GGUF_NAME = "tiny-llama.gguf"
ROPE_THETA = 10000.0
INPUT_IDS = [[1, 17, 42, 99, 5, 63, 120, 7, 7, 31, 88, 2, 64, 101, 11, 3]]
TOKENIZER_TEXTS = [
    "the cat sat on the mat",
    "The theater is in the north.",
    "  two leading spaces",
    "hello\nworld",
    "Hi!",
    "",
]


def randomize(model, seed):
    """Weights far from init defaults (norms too) so every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5))


def permute(weights, n_head, n_head_kv):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


# Hugging Face name suffix -> (GGUF name suffix); layer tensors get `blk.N.` in front.
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# Storage type per GGUF tensor (every matrix's rows are 32 or 64 long, so Q8_0 blocks fit).
LAYER_TYPES = [
    {"attn_q": T.F16, "attn_k": T.Q8_0, "attn_v": T.BF16, "attn_output": T.Q8_0,
     "ffn_gate": T.F16, "ffn_up": T.Q8_0, "ffn_down": T.F16},
    {"attn_q": T.Q8_0, "attn_k": T.F16, "attn_v": T.Q8_0, "attn_output": T.F16,
     "ffn_gate": T.Q8_0, "ffn_up": T.BF16, "ffn_down": T.Q8_0},
]
GLOBAL_TYPES = {"token_embd": T.Q8_0, "output": T.F16, "output_norm": T.F32}


def gguf_name(hf_name):
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    parts = hf_name.split(".")
    assert parts[0] == "model" and parts[1] == "layers", hf_name
    return f"blk.{parts[2]}." + LAYER_NAMES[".".join(parts[3:])]


def storage_type(name):
    base = name.split(".")[-2]
    if name.startswith("blk."):
        if base.endswith("norm"):
            return T.F32
        return LAYER_TYPES[int(name.split(".")[1])][base]
    return GLOBAL_TYPES[base]


def tiny_vocab():
    """128 SentencePiece-style pieces with scores: specials, one byte-fallback piece, single
    characters, then merged pieces, best (highest score) first."""
    tokens = [("<unk>", 0.0, TokenType.UNKNOWN), ("<s>", 0.0, TokenType.CONTROL),
              ("</s>", 0.0, TokenType.CONTROL), ("<0x0A>", 0.0, TokenType.BYTE)]
    merged = ["▁t", "he", "▁the", "in", "er", "▁a", "on", "re", "an", "at", "en", "nd", "or",
              "▁s", "▁w", "is", "ed", "es", "▁o", "ou", "ing", "▁and", "▁in", "ar", "th", "▁c",
              "it", "▁th", "al", "▁m", "le", "ea", "▁h", "▁on", "▁is", "ll", "at", "▁n", "ter",
              "▁ther", "▁theat", "▁cat", "▁sat", "▁mat", "hel", "hello", "▁wor", "▁world",
              "wor", "orth", "▁north", "ow", "kn", "▁unk", "▁two", "▁le", "ad", "ing", "▁sp",
              "ac", "es", "▁dig", "▁her", "▁here", "▁T", "▁The", "Hi", "▁Hi"]
    chars = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["T", "H", ".", "!"]
    seen = {t for t, _, _ in tokens}
    pieces = []
    for i, piece in enumerate(merged):
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -float(i), TokenType.NORMAL))
    for j, ch in enumerate(chars):
        if ch not in seen:
            seen.add(ch)
            pieces.append((ch, -1000.0 - j, TokenType.NORMAL))
    tokens += pieces
    # Pad to the model's vocabulary with pieces no text here produces.
    k = 0
    while len(tokens) < 128:
        pad = f"<unused{k}>"
        tokens.append((pad, -1e9, TokenType.UNUSED))
        k += 1
    assert len(tokens) == 128, len(tokens)
    return tokens


def write_gguf(model, cfg, path):
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama-gguf")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(1)

    vocab = tiny_vocab()
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _, _ in vocab])
    writer.add_token_scores([s for _, s, _ in vocab])
    writer.add_token_types([int(k) for _, _, k in vocab])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    for hf_name, tensor in model.state_dict().items():
        data = tensor.detach().numpy().astype(np.float32)
        name = gguf_name(hf_name)
        if hf_name.endswith("q_proj.weight"):
            data = permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = permute(data, n_head, n_kv)
        qtype = storage_type(name)
        if qtype == T.F32:
            writer.add_tensor(name, data)
        elif qtype == T.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(data, qtype), raw_shape=None, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=ROPE_THETA, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, 3)
    model.save_pretrained(OUT, safe_serialization=True)
    gen = os.path.join(OUT, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)

    gguf_path = os.path.join(OUT, GGUF_NAME)
    write_gguf(model, cfg, gguf_path)

    # The reference reads the GGUF, not the HF weights: transformers dequantises it with gguf-py
    # and undoes the q/k permutation with its own code.
    from_gguf = AutoModelForCausalLM.from_pretrained(
        OUT, gguf_file=GGUF_NAME, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = from_gguf(torch.tensor(INPUT_IDS)).logits
    import transformers
    ref = {
        "generator": f"transformers {transformers.__version__}, torch {torch.__version__}, "
                     f"eager attention, f32, from {GGUF_NAME}",
        "input_ids": INPUT_IDS,
        "logits": logits[0].tolist(),
    }
    with open(os.path.join(OUT, "reference.json"), "w") as f:
        json.dump(ref, f)

    tok = AutoTokenizer.from_pretrained(OUT, gguf_file=GGUF_NAME)
    cases = []
    for text in TOKENIZER_TEXTS:
        plain = tok(text, add_special_tokens=False)["input_ids"]
        special = tok(text, add_special_tokens=True)["input_ids"]
        cases.append({"text": text, "ids": plain, "ids_with_special": special,
                      "decoded": tok.decode(plain)})
    with open(os.path.join(OUT, "tokenizer-reference.json"), "w") as f:
        json.dump({"generator": f"transformers {transformers.__version__} AutoTokenizer "
                                f"from {GGUF_NAME}",
                   "bos_token": tok.bos_token, "eos_token": tok.eos_token, "cases": cases},
                  f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
