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

/// Words expanded per keystream call: 15 KiB stays in L1 while it is added. 960 blocks,
/// a multiple of both `aes` backends' parallel widths (8 blocks with AES-NI, 30 with VAES):
/// blocks left over from a call are encrypted one at a time, which costs several times
/// more per block.
const CHUNK_WORDS: usize = 3840;

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

/// Writes the seed's raw AES-128-CTR keystream into `out` (the bytes whose little-endian
/// words are the mask), drawn in the same calls as [`apply`] draws it. For other
/// implementations to compare against, and for the benchmark of the keystream's speed, the
/// floor that masking is measured against.
pub fn keystream(seed: &[u8; 16], out: &mut [u8]) {
    let mut cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
    for chunk in out.chunks_mut(CHUNK_WORDS * 4) {
        cipher.write_keystream(chunk);
    }
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
/// self mask) into the same vector, and a server removes many. The vector goes chunk by
/// chunk. For each chunk the keystreams of up to `GROUP` masks of the same sign are
/// written side by side into one buffer that stays in the L1/L2 caches, summed word by word
/// in registers, and the sum is added to (or subtracted from) the chunk once
/// (`fold_group`). So each word of `acc` is loaded and stored once per group instead of
/// once per mask, and the keystream is only loaded and added. Masks are grouped by sign,
/// which the result does not depend on (addition modulo 2^32 commutes).
pub fn apply_many(masks: &[(Zeroizing<[u8; 16]>, MaskSign)], acc: &mut [u32]) {
    let (mut adds, mut subtracts) = (Vec::new(), Vec::new());
    for (seed, sign) in masks {
        let seed: &[u8; 16] = seed;
        let cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
        match sign {
            MaskSign::Add => adds.push(cipher),
            MaskSign::Subtract => subtracts.push(cipher),
        }
    }
    let mut keystreams = Zeroizing::new(vec![0u8; GROUP * STREAM_BYTES]);
    for chunk in acc.chunks_mut(MANY_CHUNK_WORDS) {
        let bytes = chunk.len() * 4;
        for (ciphers, sign) in [
            (&mut adds, MaskSign::Add),
            (&mut subtracts, MaskSign::Subtract),
        ] {
            for group in ciphers.chunks_mut(GROUP) {
                for (cipher, stream) in group
                    .iter_mut()
                    .zip(keystreams.chunks_exact_mut(STREAM_BYTES))
                {
                    cipher.write_keystream(&mut stream[..bytes]);
                }
                fold_group(chunk, &keystreams[..group.len() * STREAM_BYTES], sign);
            }
        }
    }
}

/// Words per chunk in [`apply_many`], and how many masks' keystreams are summed together.
/// Measured on the 2-core Zen 3 machine of docs/benchmarks.md: 960-word (3.75 KiB)
/// keystream calls keep the stream cipher's per-call cost small, and six keystreams
/// (22.5 KiB) plus the chunk stay close to the 32 KiB L1 data cache; 512 × 13 was as fast,
/// larger groups slower. 960 words are 240 blocks, a multiple of both `aes` backends'
/// parallel widths (see [`CHUNK_WORDS`]); with 1024 words the VAES backend encrypted 16
/// blocks of every call one at a time.
const MANY_CHUNK_WORDS: usize = 960;
const GROUP: usize = 6;
const STREAM_BYTES: usize = MANY_CHUNK_WORDS * 4;

/// Words summed at once in [`fold_group`]: eight 128-bit registers of partial sums.
const LANES: usize = 32;

/// Adds to (or subtracts from) `chunk`, word by word, the sum of the keystreams in
/// `keystreams` (stream `g` at byte `g * STREAM_BYTES`, little-endian words, at least
/// `chunk.len()` words each). Partial sums of [`LANES`] words stay in registers while every
/// stream is added to them.
fn fold_group(chunk: &mut [u32], keystreams: &[u8], sign: MaskSign) {
    let streams = keystreams.len() / STREAM_BYTES;
    let full = chunk.len() - chunk.len() % LANES;
    let (head, tail) = chunk.split_at_mut(full);
    for (block, out) in head.chunks_exact_mut(LANES).enumerate() {
        let mut sums = [0u32; LANES];
        for g in 0..streams {
            let stream: &[u8; 4 * LANES] = keystreams[g * STREAM_BYTES + 4 * LANES * block..]
                [..4 * LANES]
                .try_into()
                .expect("LANES words");
            for (s, w) in sums.iter_mut().zip(stream.chunks_exact(4)) {
                *s = s.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
        add_signed(out, &sums, sign);
    }
    for (i, out) in tail.iter_mut().enumerate() {
        let mut sum = 0u32;
        for g in 0..streams {
            let w = &keystreams[g * STREAM_BYTES + 4 * (full + i)..][..4];
            sum = sum.wrapping_add(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        add_signed(std::slice::from_mut(out), &[sum], sign);
    }
}

/// `out[i] ± sums[i]` modulo 2^32; separate loops per sign so each one vectorises.
fn add_signed(out: &mut [u32], sums: &[u32], sign: MaskSign) {
    match sign {
        MaskSign::Add => out
            .iter_mut()
            .zip(sums)
            .for_each(|(o, s)| *o = o.wrapping_add(*s)),
        MaskSign::Subtract => out
            .iter_mut()
            .zip(sums)
            .for_each(|(o, s)| *o = o.wrapping_sub(*s)),
    }
}

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
    /// border of the grouped fold.
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
                let mut one_by_one = original.clone();
                for (seed, sign) in &masks[..count] {
                    apply(seed, &mut one_by_one, *sign);
                }
                let mut together = original.clone();
                apply_many(&masks[..count], &mut together);
                assert_eq!(together, one_by_one, "{len} words, {count} masks");
            }
        }
    }

    const MASK_SEED_0_TO_15_FIRST_32_BYTES: &str = include_str!("vectors/mask_seed0-15_0.hex");
    const MASK_SEED_0_TO_15_BYTES_20000_TO_20031: &str =
        include_str!("vectors/mask_seed0-15_20000.hex");
}
