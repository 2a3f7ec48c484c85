#!/usr/bin/env python3
"""Reference vectors for GGUF dequantisation (client/src/checkpoint/gguf/dequant.rs).

For each ggml type the Rust reader dequantises (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q4_K, Q6_K) this makes a few blocks of fixed pseudo-random bytes, with every f16 scale field
overwritten by a finite f16 (random bytes would give NaN and infinite scales), and dequantises
them with gguf-py (`gguf.quants.dequantize`, the Python port of ggml-quants.c that llama.cpp's
converter and transformers' GGUF loader use). The Rust test compares bit for bit.

Q5_0 (which Gemma 3's Q4_K_M file uses for every tensor with 640 inputs) and Q5_1 also get
blocks made by gguf-py's own quantiser (`gguf.quants.quantize` of random floats, plus an
all-zero block), appended after the random ones in the same case: random bytes reach every bit
pattern of qh/qs, quantised blocks are what a real converter writes. The new types come after
the old ones and draw from the same generator afterwards, so the earlier cases are unchanged;
the cases are then written in the order of dequant.rs's `SUPPORTED` (Q5_0, Q5_1 after Q4_1).

  python scripts/gguf_dequant_vectors.py client/tests/fixtures/gguf/dequant.json

(any environment with `gguf` 0.19 and numpy; the fixture was made with /tmp/g3/venv.)

Q5_0 block (ggml-common.h `block_q5_0`, 22 bytes, 32 elements):
  f16 d (LE) | u8 qh[4] (one LE u32, bit j = 5th bit of element j) | u8 qs[16]
  element j < 16:  q = (qs[j] & 0x0F) | ((qh >> j) & 1) << 4
  element j + 16:  q = (qs[j] >> 4)   | ((qh >> (j + 16)) & 1) << 4
  y = f32(d) * f32(q - 16)
Q5_1 (`block_q5_1`, 24 bytes): f16 d | f16 m | u8 qh[4] | u8 qs[16], same q, y = f32(d) * f32(q) + f32(m)
(a product then a sum, not a fused multiply-add).

Output: {"generator": ..., "cases": [{"type": "Q4_K", "ggml_type": 12, "elements": 512,
"bytes": "<hex>", "expected_bits": [u32, ...]}, ...]}; expected values are f32 bit patterns, so
the comparison is exact and covers -0.0.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize

OUT = sys.argv[1] if len(sys.argv) > 1 else "client/tests/fixtures/gguf/dequant.json"
BLOCKS = 3
# Types whose case also holds blocks made by gguf-py's quantiser.
QUANTISED_TOO = (T.Q5_0, T.Q5_1)


def f16_bytes(rng, count):
    """Finite f16 scales: mostly normal values of either sign, one subnormal, one zero."""
    values = (rng.standard_normal(count) * 0.05).astype(np.float16)
    if count >= 3:
        values[1] = np.float16(3e-6)  # subnormal in f16
        values[2] = np.float16(0.0)
    return values.view(np.uint8).reshape(count, 2)


def finite_halfwords(rng, count, bf16):
    """`count` random 16-bit floats (f16 or bf16 bit patterns) that are neither NaN nor infinite."""
    out = np.empty(count, dtype=np.uint16)
    filled = 0
    while filled < count:
        cand = rng.integers(0, 1 << 16, size=count, dtype=np.uint16)
        if bf16:
            exp = (cand >> 7) & 0xFF
            ok = exp != 0xFF
        else:
            exp = (cand >> 10) & 0x1F
            ok = exp != 0x1F
        cand = cand[ok]
        take = min(count - filled, cand.size)
        out[filled:filled + take] = cand[:take]
        filled += take
    return out.view(np.uint8)


def make(qtype, rng):
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    if qtype == T.F32:
        n = 96
        data = (rng.standard_normal(n).astype(np.float32) * 3).view(np.uint8)
        data[:4] = np.array([-0.0], dtype=np.float32).view(np.uint8)
        return data, n
    if qtype in (T.F16, T.BF16):
        n = 128
        return finite_halfwords(rng, n, qtype == T.BF16), n
    blocks = rng.integers(0, 256, size=(BLOCKS, block_bytes), dtype=np.uint8)
    # Where each f16 scale lives in the block (ggml-common.h).
    scale_fields = {
        T.Q8_0: [0],          # d, then 32 x int8
        T.Q4_0: [0],          # d, then 16 bytes of nibbles
        T.Q4_1: [0, 2],       # d, m, then 16 bytes
        T.Q4_K: [0, 2],       # d, dmin, scales[12], qs[128]
        T.Q6_K: [block_bytes - 2],  # ql[128], qh[64], scales[16] (int8), d
        T.Q5_0: [0],          # d, qh[4], qs[16]
        T.Q5_1: [0, 2],       # d, m, qh[4], qs[16]
    }[qtype]
    for offset in scale_fields:
        blocks[:, offset:offset + 2] = f16_bytes(rng, BLOCKS)
    data, n = blocks.reshape(-1), BLOCKS * block_elems
    if qtype in QUANTISED_TOO:
        # Blocks written by gguf-py's quantiser: two of scaled normal floats, one all zero (d = 0).
        floats = np.concatenate([
            rng.standard_normal(2 * block_elems).astype(np.float32) * np.float32(0.02),
            np.zeros(block_elems, dtype=np.float32),
        ])
        q = np.asarray(quantize(floats, qtype), dtype=np.uint8).reshape(-1)
        assert q.size == 3 * block_bytes, (qtype.name, q.size)
        back = np.asarray(dequantize(q, qtype), dtype=np.float32).reshape(-1)
        step = np.abs(floats[:block_elems]).max() / 8  # generous: Q5 steps are max/16 or range/31
        assert np.all(np.abs(back - floats) <= step), qtype.name
        data, n = np.concatenate([data, q]), n + floats.size
    return data, n


def main():
    rng = np.random.default_rng(20240611)
    cases = []
    # New types go at the end: the generator is shared, so this keeps earlier cases unchanged.
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K, T.Q5_0, T.Q5_1):
        data, n = make(qtype, rng)
        if qtype == T.BF16:
            # gguf-py's BF16 dequantiser works on whole rows of bytes.
            values = dequantize(data.reshape(1, -1), qtype).reshape(-1)
        else:
            values = dequantize(data, qtype).reshape(-1)
        values = np.asarray(values, dtype=np.float32)
        assert values.size == n, (qtype.name, values.size, n)
        assert np.all(np.isfinite(values)), qtype.name
        cases.append({
            "type": qtype.name,
            "ggml_type": int(qtype),
            "elements": n,
            "bytes": data.tobytes().hex(),
            "expected_bits": [int(b) for b in values.view(np.uint32)],
        })
    # Written in the order of dequant.rs's SUPPORTED, which the Rust test checks.
    order = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"]
    cases.sort(key=lambda c: order.index(c["type"]))
    from importlib.metadata import version
    fixture = {
        "generator": f"scripts/gguf_dequant_vectors.py with gguf-py {version('gguf')}, "
                     f"numpy {np.__version__}",
        "cases": cases,
    }
    with open(OUT, "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
