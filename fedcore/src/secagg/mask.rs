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
//! here with 128-bit AES-NI, against 1.3–1.4 ms for ChaCha8/12), and masks are the dominant
//! cost of a round. Another implementation reproduces the stream from this paragraph alone;
//! `scripts/secagg_vectors.py` does so with Python's `cryptography` and the vectors it
//! printed are checked in the tests below.
//!
//! # Two implementations of the one stream
//!
//! - `vaes` (x86-64 with VAES and AVX2, detected at run time): AES-128-CTR written with
//!   the processor's 256-bit AES instructions, eight blocks of each mask in flight, the
//!   keystream added in registers. A participant's 50 masks of 100k words take 2.4 times
//!   less time than through the `aes` crate on the Zen 3 machine of docs/benchmarks.md.
//! - `portable`: the RustCrypto `aes` and `ctr` crates, everywhere else (AES-NI without
//!   VAES, ARMv8, or constant-time software).
//!
//! Both give the same words; the tests check `vaes` against `portable` over many lengths,
//! signs and mask counts, and both against the vectors.

use zeroize::Zeroizing;

mod portable;
#[cfg(target_arch = "x86_64")]
mod vaes;

/// Whether a mask is added to or subtracted from the accumulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaskSign {
    Add,
    Subtract,
}

/// Which implementation draws the masks on this CPU: `"vaes-avx2"` or `"aes-crate"`
/// (see the module docs). For logs and benchmark reports.
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if vaes::Vaes::detect().is_some() {
        return "vaes-avx2";
    }
    "aes-crate"
}

/// Fills `out` with the first `out.len()` words of the seed's mask stream.
pub fn expand(seed: &[u8; 16], out: &mut [u32]) {
    out.fill(0);
    apply(seed, out, MaskSign::Add);
}

/// Writes the seed's raw AES-128-CTR keystream into `out` (the bytes whose little-endian
/// words are the mask), with the same implementation the masks use. For other
/// implementations to compare against, and for the benchmark of the keystream's speed, the
/// floor that masking is measured against.
pub fn keystream(seed: &[u8; 16], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = vaes::Vaes::detect() {
        return kernel.keystream(seed, out);
    }
    portable::keystream(seed, out)
}

/// Adds (or subtracts) the seed's mask stream to `acc`, modulo 2^32, word by word.
/// The keystream is folded in as it is produced, so memory stays O(1) whatever the vector
/// length.
pub fn apply(seed: &[u8; 16], acc: &mut [u32], sign: MaskSign) {
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = vaes::Vaes::detect() {
        return kernel.apply_many(&[(seed, sign)], acc);
    }
    portable::apply(seed, acc, sign)
}

/// Adds or subtracts several mask streams to `acc` at once; the same result as calling
/// [`apply`] for each in turn, in a single pass over `acc`. Why: a participant folds one
/// mask per neighbour (plus its self mask) into the same vector, and a server removes many.
pub fn apply_many(masks: &[(Zeroizing<[u8; 16]>, MaskSign)], acc: &mut [u32]) {
    if masks.is_empty() {
        return;
    }
    let masks: Vec<(&[u8; 16], MaskSign)> = masks.iter().map(|(s, sign)| (&**s, *sign)).collect();
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = vaes::Vaes::detect() {
        return kernel.apply_many(&masks, acc);
    }
    portable::apply_many(&masks, acc)
}

#[cfg(test)]
mod tests {
    use aes::Aes128;
    use aes::cipher::{KeyIvInit, StreamCipher};

    use super::portable::{CHUNK_WORDS, GROUP, LANES, MANY_CHUNK_WORDS};
    use super::*;

    type ApplyMany = fn(&[(&[u8; 16], MaskSign)], &mut [u32]);
    type Keystream = fn(&[u8; 16], &mut [u8]);

    /// Every implementation this CPU runs, by name. The public functions use the last.
    fn kernels() -> Vec<(&'static str, ApplyMany, Keystream)> {
        #[allow(unused_mut)]
        let mut all: Vec<(&'static str, ApplyMany, Keystream)> =
            vec![("aes-crate", portable::apply_many, portable::keystream)];
        #[cfg(target_arch = "x86_64")]
        if vaes::Vaes::detect().is_some() {
            all.push((
                "vaes-avx2",
                |masks, acc| vaes::Vaes::detect().unwrap().apply_many(masks, acc),
                |seed, out| vaes::Vaes::detect().unwrap().keystream(seed, out),
            ));
        } else {
            eprintln!("this CPU lacks VAES or AVX2: only the portable masks are tested");
        }
        all
    }

    /// The specified stream (128-bit big-endian counter from zero), by the `ctr` crate.
    fn specified_stream(seed: &[u8; 16], len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        ctr::Ctr128BE::<Aes128>::new(seed.into(), &[0u8; 16].into()).apply_keystream(&mut bytes);
        bytes
    }

    /// Each implementation's keystream is the specified stream, for lengths around block,
    /// chunk and call borders of both.
    #[test]
    fn every_kernel_draws_the_specified_stream() {
        let seed: [u8; 16] = core::array::from_fn(|i| (i as u8).wrapping_mul(29) ^ 0x5a);
        for (name, _, keystream) in kernels() {
            for len in [
                0,
                1,
                15,
                16,
                17,
                255,
                256,
                257,
                4 * CHUNK_WORDS - 3,
                4 * CHUNK_WORDS,
                8 * CHUNK_WORDS + 100,
            ] {
                let mut ours = vec![0u8; len];
                keystream(&seed, &mut ours);
                assert_eq!(ours, specified_stream(&seed, len), "{name}, {len} bytes");
            }
        }
    }

    /// AES-128 of the all-zero block under the all-zero key (the first block of seed 0's
    /// stream) is the well-known 66e94bd4…: checks each implementation's cipher against the
    /// standard rather than against another implementation.
    #[test]
    fn every_kernel_encrypts_the_zero_block_as_aes_128_does() {
        for (name, _, keystream) in kernels() {
            let mut block = [0u8; 16];
            keystream(&[0u8; 16], &mut block);
            assert_eq!(
                hex::encode(block),
                "66e94bd4ef8a2c3b884cfa59ca342b2e",
                "{name}"
            );
        }
    }

    /// Every implementation folds the same words into the accumulator, for mask counts and
    /// signs mixed, and lengths around the chunk borders of each.
    #[test]
    fn every_kernel_folds_the_same_masks() {
        let seeds: Vec<[u8; 16]> = (0..50u8)
            .map(|i| core::array::from_fn(|j| i.wrapping_mul(97) ^ (j as u8).wrapping_mul(13)))
            .collect();
        let masks: Vec<(&[u8; 16], MaskSign)> = seeds
            .iter()
            .enumerate()
            .map(|(i, seed)| {
                let sign = if i % 3 == 2 {
                    MaskSign::Subtract
                } else {
                    MaskSign::Add
                };
                (seed, sign)
            })
            .collect();
        let kernels = kernels();
        for len in [
            0,
            1,
            31,
            32,
            33,
            63,
            64,
            65,
            1000,
            MANY_CHUNK_WORDS + 1,
            10_007,
        ] {
            let original: Vec<u32> = (0..len as u32)
                .map(|i| i.wrapping_mul(0x9e37_79b9))
                .collect();
            for count in [0, 1, 2, 7, 50] {
                let mut expected = original.clone();
                for (seed, sign) in &masks[..count] {
                    let mut mask = specified_stream(seed, 4 * len)
                        .chunks_exact(4)
                        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                        .collect::<Vec<_>>();
                    for (e, m) in expected.iter_mut().zip(&mut mask) {
                        *e = match sign {
                            MaskSign::Add => e.wrapping_add(*m),
                            MaskSign::Subtract => e.wrapping_sub(*m),
                        };
                    }
                }
                for (name, apply_many, _) in &kernels {
                    let mut acc = original.clone();
                    apply_many(&masks[..count], &mut acc);
                    assert_eq!(acc, expected, "{name}: {len} words, {count} masks");
                }
            }
        }
    }

    fn words(hex_str: &str) -> Vec<u32> {
        hex::decode(hex_str)
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// The raw keystream, drawn in chunks, read as little-endian words is the mask, across
    /// chunk boundaries and for a length that is not a whole number of blocks.
    #[test]
    fn keystream_words_are_the_mask() {
        let seed = [5u8; 16];
        let len = 2 * CHUNK_WORDS + 77;
        let mut bytes = vec![0u8; len * 4];
        keystream(&seed, &mut bytes);
        let mut mask = vec![0u32; len];
        expand(&seed, &mut mask);
        let from_bytes: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        assert_eq!(from_bytes, mask);
        let mut whole = vec![0u8; len * 4];
        ctr::Ctr128BE::<Aes128>::new(&seed.into(), &[0u8; 16].into()).apply_keystream(&mut whole);
        assert_eq!(whole, bytes);
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

    /// More masks than one group, mixed signs, and lengths around every block and chunk
    /// border of the portable grouped fold, in each implementation.
    #[test]
    fn apply_many_equals_one_by_one_across_groups_and_borders() {
        let masks: Vec<(Zeroizing<[u8; 16]>, MaskSign)> = (0..(2 * GROUP as u8 + 3))
            .map(|i| {
                let sign = if i % 3 == 1 {
                    MaskSign::Subtract
                } else {
                    MaskSign::Add
                };
                (Zeroizing::new([i.wrapping_mul(37); 16]), sign)
            })
            .collect();
        for len in [
            0,
            1,
            LANES - 1,
            LANES + 1,
            MANY_CHUNK_WORDS - 1,
            MANY_CHUNK_WORDS,
            MANY_CHUNK_WORDS + LANES + 5,
            3 * MANY_CHUNK_WORDS + 17,
        ] {
            let original: Vec<u32> = (0..len as u32)
                .map(|i| i.wrapping_mul(0x9e37_79b9))
                .collect();
            for count in [1, GROUP - 1, GROUP, GROUP + 1, masks.len()] {
                let masks: Vec<(&[u8; 16], MaskSign)> = masks[..count]
                    .iter()
                    .map(|(s, sign)| (&**s, *sign))
                    .collect();
                for (name, apply_many, _) in kernels() {
                    let mut one_by_one = original.clone();
                    for mask in &masks {
                        apply_many(std::slice::from_ref(mask), &mut one_by_one);
                    }
                    let mut together = original.clone();
                    apply_many(&masks, &mut together);
                    assert_eq!(together, one_by_one, "{name}: {len} words, {count} masks");
                }
            }
        }
    }

    const MASK_SEED_0_TO_15_FIRST_32_BYTES: &str = include_str!("vectors/mask_seed0-15_0.hex");
    const MASK_SEED_0_TO_15_BYTES_20000_TO_20031: &str =
        include_str!("vectors/mask_seed0-15_20000.hex");
}
