//! The mask stream on x86-64 CPUs with VAES and AVX2: AES-128-CTR written directly with the
//! processor's AES instructions, each 256-bit instruction running one round on two blocks,
//! and the keystream added into the accumulator in registers, never stored.
//!
//! Why not the `aes` crate, which [`super::portable`] wraps: its generic VAES code compiles to
//! two 256-bit blocks in flight at a time, with the round keys spilled to the stack, and
//! writes the keystream to memory for the fold to read back. A Zen 3 core's AES units finish
//! four block-rounds per cycle, at best 0.6 cycles per mask word; on the machine of
//! docs/benchmarks.md a participant's masks took 0.6 ns per word through the crate and take
//! 0.26 ns here. Here eight blocks (32 words) of each mask are in flight, the counter blocks
//! of a chunk are built once for every mask (all streams count from block 0), and each word
//! of the accumulator is loaded and stored once for all the masks.
//!
//! The stream is the one [`super`] specifies; the tests compare it with the `aes` crate's
//! (`portable`), with FIPS-197's AES-128 of the zero block and with the committed vectors.
//!
//! Nothing here depends on secret data for its timing: AES instructions run in constant
//! time, and the key expansion is `AESKEYGENASSIST` and shifts. The key schedules are
//! written in place into buffers wiped on drop; as with any Rust cipher, copies the
//! compiler leaves in registers or on the stack are not.

use core::arch::x86_64::{
    __m128i, __m256i, _mm_aeskeygenassist_si128, _mm_shuffle_epi32, _mm_slli_si128, _mm_xor_si128,
    _mm256_add_epi32, _mm256_aesenc_epi128, _mm256_aesenclast_epi128, _mm256_broadcastsi128_si256,
    _mm256_set_epi64x, _mm256_setzero_si256, _mm256_sub_epi32, _mm256_xor_si256,
};

use zeroize::Zeroizing;

use super::MaskSign;

/// Blocks per chunk: four 256-bit registers of two blocks. With their four sums, the four
/// counter registers and one round key, everything stays in the sixteen AVX2 registers;
/// sixteen blocks spilled to the stack and ran at 60% of this speed. The next mask's blocks
/// are independent of this one's, so the core overlaps them to cover the AES latency.
const BLOCKS: usize = 8;
/// Mask words per chunk.
const CHUNK_WORDS: usize = BLOCKS * 4;
const REGS: usize = BLOCKS / 2;

/// The eleven AES-128 round keys of one seed, each 128-bit key repeated in both halves of a
/// 256-bit value so that one instruction runs a round on two blocks. Stored as bytes so that
/// the schedule can be wiped ([`Zeroizing`]).
type RoundKeys = [[u8; 32]; 11];

/// Proof that this CPU has VAES, AVX2 and AES-NI: only [`Vaes::detect`] makes one, so the
/// kernels below, compiled for those features, run only where they exist.
#[derive(Clone, Copy)]
pub(super) struct Vaes(());

impl Vaes {
    /// The kernel, if this CPU runs it (`std`'s cached feature detection).
    pub(super) fn detect() -> Option<Vaes> {
        let present = std::is_x86_feature_detected!("vaes")
            && std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("aes");
        present.then_some(Vaes(()))
    }

    /// Adds (`MaskSign::Add`) or subtracts each seed's mask stream to `acc`, modulo 2^32.
    pub(super) fn apply_many(self, masks: &[(&[u8; 16], MaskSign)], acc: &mut [u32]) {
        // Sized up front: a growing Vec would leave copies of the schedules in the memory it
        // frees, unwiped.
        let mut adds = Zeroizing::new(Vec::with_capacity(masks.len()));
        let mut subtracts = Zeroizing::new(Vec::with_capacity(masks.len()));
        for &(seed, sign) in masks {
            let list = match sign {
                MaskSign::Add => &mut adds,
                MaskSign::Subtract => &mut subtracts,
            };
            list.push([[0u8; 32]; 11]);
            self.round_keys(seed, list.last_mut().expect("just pushed"));
        }
        #[allow(unsafe_code)]
        // SAFETY: `self` exists only where `detect` found VAES, AVX2 and AES-NI, the
        // features `fold` is compiled for.
        unsafe {
            fold(&adds, &subtracts, acc)
        }
    }

    /// Writes the seed's raw keystream into `out`.
    pub(super) fn keystream(self, seed: &[u8; 16], out: &mut [u8]) {
        let mut keys = Zeroizing::new([[0u8; 32]; 11]);
        self.round_keys(seed, &mut keys);
        #[allow(unsafe_code)]
        // SAFETY: as in `apply_many`.
        unsafe {
            write_keystream(&keys, out)
        }
    }

    /// Writes the seed's key schedule in place, so that the only copy is the one wiped.
    fn round_keys(self, seed: &[u8; 16], keys: &mut RoundKeys) {
        #[allow(unsafe_code)]
        // SAFETY: as in `apply_many`.
        unsafe {
            expand_key(seed, keys)
        }
    }
}

/// The AES-128 key schedule (FIPS 197 §5.2) by `AESKEYGENASSIST`, each round key broadcast
/// to both halves of 256 bits.
#[target_feature(enable = "avx2,aes")]
fn expand_key(seed: &[u8; 16], keys: &mut RoundKeys) {
    let mut round: __m128i = bytemuck::cast(*seed);
    keys[0] = bytemuck::cast(_mm256_broadcastsi128_si256(round));
    macro_rules! next {
        ($i:literal, $rcon:literal) => {
            // RotWord(SubWord(w3)) ^ Rcon in every 32-bit lane, then the running XOR of the
            // previous key's words from the lowest up.
            let assist = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(round));
            round = _mm_xor_si128(round, _mm_slli_si128::<4>(round));
            round = _mm_xor_si128(round, _mm_slli_si128::<8>(round));
            round = _mm_xor_si128(round, assist);
            keys[$i] = bytemuck::cast(_mm256_broadcastsi128_si256(round));
        };
    }
    next!(1, 0x01);
    next!(2, 0x02);
    next!(3, 0x04);
    next!(4, 0x08);
    next!(5, 0x10);
    next!(6, 0x20);
    next!(7, 0x40);
    next!(8, 0x80);
    next!(9, 0x1b);
    next!(10, 0x36);
}

/// The counter blocks `first .. first + BLOCKS`, two per register: eight zero bytes (the
/// counter's high half, zero for any vector: see [`super`]) then the block index as a
/// big-endian u64.
#[target_feature(enable = "avx2")]
fn counters(first: u64) -> [__m256i; REGS] {
    core::array::from_fn(|r| {
        let low = first + 2 * r as u64;
        _mm256_set_epi64x((low + 1).swap_bytes() as i64, 0, low.swap_bytes() as i64, 0)
    })
}

/// AES-128 of the chunk's counter blocks under `keys`: one chunk of one mask's keystream.
#[target_feature(enable = "avx2,aes,vaes")]
#[inline]
fn encrypt(counters: &[__m256i; REGS], keys: &RoundKeys) -> [__m256i; REGS] {
    let key = |r: usize| -> __m256i { bytemuck::cast(keys[r]) };
    let whitening = key(0);
    let mut state: [__m256i; REGS] =
        core::array::from_fn(|i| _mm256_xor_si256(counters[i], whitening));
    for r in 1..10 {
        let k = key(r);
        for s in &mut state {
            *s = _mm256_aesenc_epi128(*s, k);
        }
    }
    let last = key(10);
    for s in &mut state {
        *s = _mm256_aesenclast_epi128(*s, last);
    }
    state
}

/// `sum ± Σ keystreams` for one chunk: every added mask's keystream, then every subtracted
/// one, for the blocks of `counters`.
#[target_feature(enable = "avx2,aes,vaes")]
#[inline]
fn fold_chunk(
    mut sum: [__m256i; REGS],
    counters: &[__m256i; REGS],
    adds: &[RoundKeys],
    subtracts: &[RoundKeys],
) -> [__m256i; REGS] {
    for keys in adds {
        let stream = encrypt(counters, keys);
        for (s, k) in sum.iter_mut().zip(stream) {
            *s = _mm256_add_epi32(*s, k);
        }
    }
    for keys in subtracts {
        let stream = encrypt(counters, keys);
        for (s, k) in sum.iter_mut().zip(stream) {
            *s = _mm256_sub_epi32(*s, k);
        }
    }
    sum
}

/// Folds every mask into `acc`, [`CHUNK_WORDS`] words at a time: the chunk is loaded once, every mask's
/// keystream for it is added or subtracted in registers, and it is stored once.
#[target_feature(enable = "avx2,aes,vaes")]
fn fold(adds: &[RoundKeys], subtracts: &[RoundKeys], acc: &mut [u32]) {
    let mut chunks = acc.chunks_exact_mut(CHUNK_WORDS);
    let mut block = 0u64;
    for chunk in &mut chunks {
        let words: [u32; CHUNK_WORDS] = (&*chunk).try_into().expect("a whole chunk");
        let sum = fold_chunk(bytemuck::cast(words), &counters(block), adds, subtracts);
        let words: [u32; CHUNK_WORDS] = bytemuck::cast(sum);
        chunk.copy_from_slice(&words);
        block += BLOCKS as u64;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let zero = [_mm256_setzero_si256(); REGS];
        let delta = fold_chunk(zero, &counters(block), adds, subtracts);
        let delta: [u32; CHUNK_WORDS] = bytemuck::cast(delta);
        for (a, d) in rest.iter_mut().zip(delta) {
            *a = a.wrapping_add(d);
        }
    }
}

/// The raw keystream of `keys` into `out`, one chunk at a time.
#[target_feature(enable = "avx2,aes,vaes")]
fn write_keystream(keys: &RoundKeys, out: &mut [u8]) {
    let mut block = 0u64;
    let mut chunks = out.chunks_exact_mut(CHUNK_WORDS * 4);
    for chunk in &mut chunks {
        let stream: [u8; CHUNK_WORDS * 4] = bytemuck::cast(encrypt(&counters(block), keys));
        chunk.copy_from_slice(&stream);
        block += BLOCKS as u64;
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let stream: [u8; CHUNK_WORDS * 4] = bytemuck::cast(encrypt(&counters(block), keys));
        rest.copy_from_slice(&stream[..rest.len()]);
    }
}
