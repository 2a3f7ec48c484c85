//! The mask stream on every CPU, through the RustCrypto `aes` crate (AES-NI, ARMv8 AES or
//! its constant-time software fallback, chosen at run time) in CTR mode. The x86-64 VAES
//! kernel ([`super::vaes`]) is checked against this one.

use aes::Aes128;
use aes::cipher::{KeyIvInit, StreamCipher};
use zeroize::{Zeroize, Zeroizing};

use super::MaskSign;

/// The specified stream uses a 128-bit big-endian counter from zero. Its high 64 bits stay
/// zero for the first 2^64 blocks (2^68 bytes, far beyond any vector), so the 64-bit counter
/// mode gives exactly the same keystream; it is used because its counter arithmetic is
/// cheaper (about a tenth of the keystream's cost here). A test checks the two agree.
type MaskCipher = ctr::Ctr64BE<Aes128>;

/// The cipher wipes its key schedule and buffered keystream when dropped (the `zeroize`
/// features of `aes` and `ctr`); this stops the build if those features are ever lost.
const _: fn() = || {
    fn wiped_on_drop<T: zeroize::ZeroizeOnDrop>() {}
    wiped_on_drop::<MaskCipher>();
};

/// Words expanded per keystream call: 15 KiB stays in L1 while it is added. 960 blocks,
/// a multiple of both `aes` backends' parallel widths (8 blocks with AES-NI, 30 with VAES):
/// blocks left over from a call are encrypted one at a time, which costs several times
/// more per block.
pub(super) const CHUNK_WORDS: usize = 3840;

/// Writes the seed's raw AES-128-CTR keystream into `out`, drawn in the same calls as
/// [`apply`] draws it.
pub(super) fn keystream(seed: &[u8; 16], out: &mut [u8]) {
    let mut cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
    for chunk in out.chunks_mut(CHUNK_WORDS * 4) {
        cipher.write_keystream(chunk);
    }
}

/// Adds (or subtracts) the seed's mask stream to `acc`, modulo 2^32, word by word.
/// The keystream is expanded into a small buffer and folded in as it is produced, so memory
/// stays O(chunk) whatever the vector length.
pub(super) fn apply(seed: &[u8; 16], acc: &mut [u32], sign: MaskSign) {
    let mut cipher = MaskCipher::new(seed.into(), &[0u8; 16].into());
    let mut bytes = [0u8; CHUNK_WORDS * 4];
    for chunk in acc.chunks_mut(CHUNK_WORDS) {
        fold(&mut cipher, chunk, &mut bytes, sign);
    }
    bytes.zeroize();
}

/// Adds or subtracts several mask streams to `acc` at once; the same result as calling
/// [`apply`] for each in turn. The vector goes chunk by chunk. For each chunk the
/// keystreams of up to `GROUP` masks of the same sign are written side by side into one
/// buffer that stays in the L1/L2 caches, summed word by word in registers, and the sum is
/// added to (or subtracted from) the chunk once (`fold_group`). So each word of `acc` is
/// loaded and stored once per group instead of once per mask, and the keystream is only
/// loaded and added. Masks are grouped by sign, which the result does not depend on
/// (addition modulo 2^32 commutes).
pub(super) fn apply_many(masks: &[(&[u8; 16], MaskSign)], acc: &mut [u32]) {
    // Sized up front, so that no cipher (each wipes its key schedule when dropped) is left
    // behind, unwiped, in memory freed by a growing Vec.
    let mut adds = Vec::with_capacity(masks.len());
    let mut subtracts = Vec::with_capacity(masks.len());
    for &(seed, sign) in masks {
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
pub(super) const MANY_CHUNK_WORDS: usize = 960;
pub(super) const GROUP: usize = 6;
const STREAM_BYTES: usize = MANY_CHUNK_WORDS * 4;

/// Words summed at once in [`fold_group`]: eight 128-bit registers of partial sums.
pub(super) const LANES: usize = 32;

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
