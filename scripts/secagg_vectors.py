#!/usr/bin/env python3
"""Independent test vectors for Mekong's secure-aggregation primitives.

Everything here is computed with Python's `cryptography` package and the standard library,
never with Mekong's code, from the specifications in the Rust module docs. Regenerate with
    python3 scripts/secagg_vectors.py fedcore/src/secagg/vectors
(the output is deterministic: rerunning it must leave the committed files unchanged).

Mask streams (fedcore/src/secagg/mask.rs; checked by that module's unit tests):
AES-128-CTR, key = seed, initial counter block of 16 zero bytes, 128-bit big-endian counter,
keystream bytes read as little-endian u32.
    mask_seed0-15_0.hex      keystream bytes 0..32 for seed = bytes(range(16))
    mask_seed0-15_20000.hex  keystream bytes 20000..20032 for the same seed

Key agreement, derivation, share encryption and signatures (fedcore/src/secagg/crypto.rs
and the signed messages of fedcore/src/secagg/protocol.rs; checked by
fedcore/tests/secagg_vectors.rs through fedcore's public API) go to `secagg_crypto.json`.
All byte strings are lowercase hex; integers are JSON numbers. Fixed inputs:
    session = bytes(range(32)), round = 0x0001_0002 (65538), participants u = 3, v = 7,
    X25519 secrets u_secret = bytes([1] * 32), v_secret = bytes([2] * 32) (as given to
    `AgreementSecret::from_bytes`, i.e. before clamping), Ed25519 identity seed of u
    = bytes([9] * 32), share plaintext = bytes(range(0x80, 0x80 + 50)) (50 bytes, the
    length of a real share pair x_s ‖ s-share(32) ‖ x_b ‖ b-share(16)).
Fields of `secagg_crypto.json`:
    inputs        the fixed inputs above (session, round, u, v).
    x25519        u_secret, u_public, v_secret, v_public (X25519 base-point products) and
                  shared_secret, the raw 32-byte X25519(u_secret, v_public)
                  = X25519(v_secret, u_public).
    hkdf          salt = "mekong/secagg/v1" ‖ session ‖ round (u64 LE);
                  mask_info = "mask" ‖ min(u,v) (u32 LE) ‖ max(u,v) (u32 LE) and
                  mask_seed = HKDF-SHA256(ikm = shared_secret, salt, mask_info), 16 bytes;
                  share_key_info = "share-key" ‖ min ‖ max and
                  share_key = HKDF-SHA256(shared_secret, salt, share_key_info), 32 bytes.
                  Both are symmetric in u and v. (In the protocol the "mask" label is used
                  with the participants' s keys and "share-key" with their c keys; the
                  vectors apply both to the same pair of secrets.)
    shares        plaintext, and for each direction `u_to_v` (sender u, receiver v) and
                  `v_to_u` (sender v, receiver u): sender, receiver,
                  nonce = 11 zero bytes ‖ (0 if sender < receiver else 1),
                  aad = "mekong/secagg/v1/shares" ‖ session ‖ round (u64 LE) ‖ sender (u32 LE)
                  ‖ receiver (u32 LE), and ciphertext = ChaCha20-Poly1305(share_key, nonce,
                  plaintext, aad), i.e. 50 bytes of ciphertext followed by the 16-byte tag.
    ed25519       seed and public (the identity of participant u), then two signed
                  messages, each with tag, message (the protocol's bytes), signed_bytes
                  = "mekong/secagg/v1/" ‖ tag ‖ 0x00 ‖ message, and signature = the 64-byte
                  Ed25519 (RFC 8032, deterministic) signature of signed_bytes under seed:
                  advertise    tag "advertise-keys"; u advertises c_public = x25519.u_public
                               and s_public = X25519 public key of bytes([4] * 32);
                               message = session ‖ round (u64 LE) ‖ from = u (u32 LE)
                               ‖ c_public ‖ s_public.
                  consistency  tag "consistency-check"; model_hash = bytes([0x5a] * 32),
                               survivors = [3, 7, 11] (sorted); message = session
                               ‖ round (u64 LE) ‖ model_hash ‖ len(survivors) (u64 LE)
                               ‖ each survivor (u32 LE).
"""
import json
import struct
import sys
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DOMAIN = b"mekong/secagg/v1"


def keystream(seed: bytes, start: int, length: int) -> bytes:
    enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    return enc.update(bytes(start + length))[start:]


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def raw_public(key) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def crypto_vectors() -> dict:
    session, rnd, u, v = bytes(range(32)), 0x0001_0002, 3, 7
    u_secret, v_secret = bytes([1] * 32), bytes([2] * 32)
    u_key = X25519PrivateKey.from_private_bytes(u_secret)
    v_key = X25519PrivateKey.from_private_bytes(v_secret)
    u_public, v_public = raw_public(u_key), raw_public(v_key)
    shared = u_key.exchange(v_key.public_key())
    assert shared == v_key.exchange(u_key.public_key())
    assert shared != bytes(32)

    salt = DOMAIN + session + u64(rnd)
    pair = u32(min(u, v)) + u32(max(u, v))
    mask_info, share_key_info = b"mask" + pair, b"share-key" + pair
    mask_seed = hkdf(shared, salt, mask_info, 16)
    share_key = hkdf(shared, salt, share_key_info, 32)

    plaintext = bytes(range(0x80, 0x80 + 50))
    aead = ChaCha20Poly1305(share_key)

    def sealed(sender: int, receiver: int) -> dict:
        nonce = bytes(11) + bytes([0 if sender < receiver else 1])
        aad = DOMAIN + b"/shares" + session + u64(rnd) + u32(sender) + u32(receiver)
        return {
            "sender": sender,
            "receiver": receiver,
            "nonce": nonce.hex(),
            "aad": aad.hex(),
            "ciphertext": aead.encrypt(nonce, plaintext, aad).hex(),
        }

    id_seed = bytes([9] * 32)
    identity = Ed25519PrivateKey.from_private_bytes(id_seed)

    def signed(tag: str, message: bytes, **fields) -> dict:
        data = DOMAIN + b"/" + tag.encode() + b"\x00" + message
        return {
            "tag": tag,
            **fields,
            "message": message.hex(),
            "signed_bytes": data.hex(),
            "signature": identity.sign(data).hex(),
        }

    s_public = raw_public(X25519PrivateKey.from_private_bytes(bytes([4] * 32)))
    advertise = session + u64(rnd) + u32(u) + u_public + s_public
    model_hash, survivors = bytes([0x5A] * 32), [3, 7, 11]
    consistency = session + u64(rnd) + model_hash + u64(len(survivors))
    consistency += b"".join(u32(s) for s in survivors)

    return {
        "description": "Mekong secure aggregation v1 crypto vectors; "
        "generated by scripts/secagg_vectors.py (Python cryptography), see its docstring",
        "inputs": {"session": session.hex(), "round": rnd, "u": u, "v": v},
        "x25519": {
            "u_secret": u_secret.hex(),
            "u_public": u_public.hex(),
            "v_secret": v_secret.hex(),
            "v_public": v_public.hex(),
            "shared_secret": shared.hex(),
        },
        "hkdf": {
            "salt": salt.hex(),
            "mask_info": mask_info.hex(),
            "mask_seed": mask_seed.hex(),
            "share_key_info": share_key_info.hex(),
            "share_key": share_key.hex(),
        },
        "shares": {
            "plaintext": plaintext.hex(),
            "u_to_v": sealed(u, v),
            "v_to_u": sealed(v, u),
        },
        "ed25519": {
            "seed": id_seed.hex(),
            "public": raw_public(identity).hex(),
            "advertise": signed(
                "advertise-keys",
                advertise,
                **{"from": u, "c_public": u_public.hex(), "s_public": s_public.hex()},
            ),
            "consistency": signed(
                "consistency-check",
                consistency,
                model_hash=model_hash.hex(),
                survivors=survivors,
            ),
        },
    }


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fedcore/src/secagg/vectors")
    out.mkdir(parents=True, exist_ok=True)
    seed = bytes(range(16))
    (out / "mask_seed0-15_0.hex").write_text(keystream(seed, 0, 32).hex())
    (out / "mask_seed0-15_20000.hex").write_text(keystream(seed, 20000, 32).hex())
    text = json.dumps(crypto_vectors(), indent=2) + "\n"
    (out / "secagg_crypto.json").write_text(text)


if __name__ == "__main__":
    main()
