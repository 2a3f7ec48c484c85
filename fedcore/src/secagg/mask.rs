//! Mask expansion: a 16-byte seed becomes a stream of u32 masks.
//!
//! # Specification (version 1)
//!
//! The mask stream of a 16-byte `seed` is the AES-128-CTR keystream with key = `seed`,
//! initial counter block = 16 zero bytes, and the whole 128-bit block incremented as a
//! big-endian integer (NIST SP 800-38A CTR with a standard incrementing function). The
//! keystream bytes are read in order as little-endian u32 values: mask word `i` is
//! `u32::from_le_bytes(keystream[4i..4i+4])`. Masks are added or subtracted modulo 2^32.
//!
//! AES-128-CTR is chosen over ChaCha because AES-NI makes it the fastest cryptographic PRG
//! on the servers and workstations labs run (about 0.75 ms per million words on one core
//! here, against 1.3–1.4 ms for ChaCha8/12), and masks are the dominant cost of a round.
//! Another implementation reproduces the stream from this paragraph alone;
//! `scripts/secagg_vectors.py` does so with Python's `cryptography` and the vectors it
//! printed are checked in the tests below.

use aes::Aes128;
use aes::cipher::{KeyIvInit, StreamCipher};
use zeroize::{Zeroize, Zeroizing};

/// The specified stream uses a 128-bit big-endian counter from zero. Its high 64 bits stay
/// zero for the first 2^64 blocks (2^68 bytes, far beyond any vector), so the 64-bit counter
/// mode gives exactly the same keystream; it is used because its counter arithmetic is
/// cheaper (about a tenth of the keystream's cost here). A test checks the two agree.
type MaskCipher = ctr::Ctr64BE<Aes128>;

/// Words expanded per keystream call: 16 KiB stays in L1 while it is added.
const CHUNK_WORDS: usize = 4096;

/// Whether a mask is added to or subtracted from the accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskSign {
    Add,
    Subtract,
}

/// Fills `out` with the first `out.len()` words of the seed's mask stream.
pub fn expand(seed: &[u8; 16], out: &mut [u32]) {
    out.fill(0);
    apply(seed, out, MaskSign::Add);
}

/// Adds (or subtracts) the seed's mask stream to `acc`, modulo 2^32, word by word.
/// The keystream is expanded into a small buffer and folded in as it is produced, so memory
/// stays O(chunk) whatever the vector length.
pub fn apply(seed: &[u8; 16], acc: &mut [u32], sign: MaskSign) {
    let mut cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
    let mut bytes = [0u8; CHUNK_WORDS * 4];
    for chunk in acc.chunks_mut(CHUNK_WORDS) {
        fold(&mut cipher, chunk, &mut bytes, sign);
    }
    bytes.zeroize();
}

/// Adds or subtracts several mask streams to `acc` at once; the same result as calling
/// [`apply`] for each in turn. Why: a participant folds one mask per neighbour (plus its
/// self mask) into the same vector, and a server removes many; going chunk by chunk with
/// every stream keeps each chunk of `acc` in L1 while all masks are folded into it, instead
/// of streaming the whole vector through the caches once per mask.
pub fn apply_many(masks: &[(Zeroizing<[u8; 16]>, MaskSign)], acc: &mut [u32]) {
    let mut ciphers: Vec<(MaskCipher, MaskSign)> = masks
        .iter()
        .map(|(seed, sign)| {
            let seed: &[u8; 16] = seed;
            (MaskCipher::new(seed.into(), &[0u8; 16].into()), *sign)
        })
        .collect();
    let mut bytes = [0u8; MANY_CHUNK_WORDS * 4];
    for chunk in acc.chunks_mut(MANY_CHUNK_WORDS) {
        for (cipher, sign) in &mut ciphers {
            fold(cipher, chunk, &mut bytes, *sign);
        }
    }
    bytes.zeroize();
}

/// Words per chunk in [`apply_many`]: the chunk and the keystream buffer together take half
/// of a 32 KiB L1 data cache.
const MANY_CHUNK_WORDS: usize = 2048;

/// Folds the next `chunk.len()` words of `cipher`'s stream into `chunk`, using `bytes` (at
/// least `4 * chunk.len()` long) for the keystream.
fn fold(cipher: &mut MaskCipher, chunk: &mut [u32], bytes: &mut [u8], sign: MaskSign) {
    let buf = &mut bytes[..chunk.len() * 4];
    cipher.write_keystream(buf);
    // Separate loops per sign so each one vectorises.
    let words = buf
        .chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
    match sign {
        MaskSign::Add => chunk
            .iter_mut()
            .zip(words)
            .for_each(|(a, m)| *a = a.wrapping_add(m)),
        MaskSign::Subtract => chunk
            .iter_mut()
            .zip(words)
            .for_each(|(a, m)| *a = a.wrapping_sub(m)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(hex_str: &str) -> Vec<u32> {
        hex::decode(hex_str)
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// NIST SP 800-38A F.5.1 (CTR-AES128.Encrypt), block 1: checks the cipher and the
    /// big-endian counter against the standard before trusting our own vectors.
    #[test]
    fn aes_ctr_matches_nist_sp800_38a() {
        let key: [u8; 16] = hex::decode("2b7e151628aed2a6abf7158809cf4f3c")
            .unwrap()
            .try_into()
            .unwrap();
        let iv: [u8; 16] = hex::decode("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
            .unwrap()
            .try_into()
            .unwrap();
        let mut block = hex::decode("6bc1bee22e409f96e93d7e117393172a").unwrap();
        ctr::Ctr128BE::<Aes128>::new(&key.into(), &iv.into()).apply_keystream(&mut block);
        assert_eq!(hex::encode(block), "874d6191b620e3261bef6864990db6ce");
    }

    /// Vectors printed by `scripts/secagg_vectors.py` (Python `cryptography`, independent of
    /// this code).
    #[test]
    fn mask_stream_matches_committed_vectors() {
        let seed: [u8; 16] = core::array::from_fn(|i| i as u8);
        let mut out = vec![0u32; 8];
        expand(&seed, &mut out);
        assert_eq!(out, words(MASK_SEED_0_TO_15_FIRST_32_BYTES));
        // Word 5000 lies in the second chunk; the stream must not restart at chunk borders.
        let mut long = vec![0u32; 5008];
        expand(&seed, &mut long);
        assert_eq!(
            &long[5000..],
            &words(MASK_SEED_0_TO_15_BYTES_20000_TO_20031)[..]
        );
        assert_eq!(&long[..8], &out[..]);
    }

    /// The 64-bit counter used for speed gives the specified 128-bit-counter stream.
    #[test]
    fn sixty_four_bit_counter_gives_the_specified_stream() {
        let seed = [9u8; 16];
        let mut spec = vec![0u8; 3 * CHUNK_WORDS * 4 + 20];
        ctr::Ctr128BE::<Aes128>::new(&seed.into(), &[0u8; 16].into()).apply_keystream(&mut spec);
        let mut ours = vec![0u32; spec.len() / 4];
        expand(&seed, &mut ours);
        let ours: Vec<u8> = ours.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(ours, spec);
    }

    #[test]
    fn add_then_subtract_is_identity_and_add_matches_expand() {
        let seed = [7u8; 16];
        let original: Vec<u32> = (0..10_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let mut acc = original.clone();
        apply(&seed, &mut acc, MaskSign::Add);
        assert_ne!(acc, original);
        let mut mask = vec![0u32; acc.len()];
        expand(&seed, &mut mask);
        for i in 0..acc.len() {
            assert_eq!(acc[i], original[i].wrapping_add(mask[i]));
        }
        apply(&seed, &mut acc, MaskSign::Subtract);
        assert_eq!(acc, original);
    }

    #[test]
    fn apply_many_equals_applying_one_by_one() {
        let original: Vec<u32> = (0..10_007u32).map(|i| i.wrapping_mul(40_503)).collect();
        let masks: Vec<(Zeroizing<[u8; 16]>, MaskSign)> = (0..5u8)
            .map(|i| {
                let sign = if i % 2 == 0 {
                    MaskSign::Add
                } else {
                    MaskSign::Subtract
                };
                (Zeroizing::new([i; 16]), sign)
            })
            .collect();
        let mut one_by_one = original.clone();
        for (seed, sign) in &masks {
            apply(seed, &mut one_by_one, *sign);
        }
        let mut together = original.clone();
        apply_many(&masks, &mut together);
        assert_eq!(together, one_by_one);
        apply_many(&[], &mut together);
        assert_eq!(together, one_by_one);
    }

    const MASK_SEED_0_TO_15_FIRST_32_BYTES: &str = include_str!("vectors/mask_seed0-15_0.hex");
    const MASK_SEED_0_TO_15_BYTES_20000_TO_20031: &str =
        include_str!("vectors/mask_seed0-15_20000.hex");
}
