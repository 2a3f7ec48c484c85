#!/usr/bin/env python3
"""Independent test vectors for Mekong's secure-aggregation primitives.

Uses Python's `cryptography` package (not Mekong's code) to compute the mask stream as
specified in fedcore/src/secagg/mask.rs: AES-128-CTR, key = seed, initial counter block of
16 zero bytes, 128-bit big-endian counter, keystream bytes read as little-endian u32.

Writes the vectors the Rust tests include:
    python3 scripts/secagg_vectors.py fedcore/src/secagg/vectors
"""
import sys
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def keystream(seed: bytes, start: int, length: int) -> bytes:
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(start + length))[start:]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fedcore/src/secagg/vectors")
    out.mkdir(parents=True, exist_ok=True)
    seed = bytes(range(16))
    (out / "mask_seed0-15_0.hex").write_text(keystream(seed, 0, 32).hex())
    (out / "mask_seed0-15_20000.hex").write_text(keystream(seed, 20000, 32).hex())


if __name__ == "__main__":
    main()
