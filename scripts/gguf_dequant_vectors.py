#!/usr/bin/env python3
"""Reference vectors for GGUF dequantisation (client/src/checkpoint/gguf/dequant.rs).

For each ggml type the Rust reader dequantises (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)
this makes a few blocks of fixed pseudo-random bytes, with every f16 scale field overwritten by
a finite f16 (random bytes would give NaN and infinite scales), and dequantises them with
gguf-py (`gguf.quants.dequantize`, the Python port of ggml-quants.c that llama.cpp's converter
and transformers' GGUF loader use). The Rust test compares bit for bit.

  /work/pyenv/bin/python scripts/gguf_dequant_vectors.py client/tests/fixtures/gguf/dequant.json

Output: {"generator": ..., "cases": [{"type": "Q4_K", "ggml_type": 12, "elements": 512,
"bytes": "<hex>", "expected_bits": [u32, ...]}, ...]}; expected values are f32 bit patterns, so
the comparison is exact and covers -0.0.
"""
import json
import sys

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

OUT = sys.argv[1] if len(sys.argv) > 1 else "client/tests/fixtures/gguf/dequant.json"
BLOCKS = 3


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
    }[qtype]
    for offset in scale_fields:
        blocks[:, offset:offset + 2] = f16_bytes(rng, BLOCKS)
    return blocks.reshape(-1), BLOCKS * block_elems


def main():
    rng = np.random.default_rng(20240611)
    cases = []
    for qtype in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q4_K, T.Q6_K):
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
