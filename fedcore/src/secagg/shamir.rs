//! Shamir secret sharing over GF(2^8), byte by byte, in constant time.
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree
//! `threshold - 1`; share `x` (1..=255) holds every polynomial evaluated at `x`. Any
//! `threshold` shares recover the secret by Lagrange interpolation at 0; fewer reveal nothing.
//! The field is GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1. Multiplication is
//! branch-free and uses no lookup tables, so timing does not depend on secret bytes (the
//! table-based crates sharks/blahaj do). Secret bytes are only ever multiplied by public
//! values (evaluation points, Lagrange coefficients), eight at a time packed in a u64
//! (`Lanes`): that makes sharing a 32-byte key among 50 with threshold 26 about eight times
//! faster than byte by byte, which matters when every participant shares two secrets. Randomness comes in as a 32-byte seed so the caller
//! decides where it comes from (the OS in production, fixed seeds in tests).

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// One share: the evaluation point and one byte per secret byte.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct Share {
    pub x: u8,
    pub y: Vec<u8>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share {{ x: {}, y: <{} bytes> }}", self.x, self.y.len())
    }
}

/// Why shares could not be made or combined.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ShamirError {
    #[error("threshold {threshold} must be between 1 and the number of shares {shares}")]
    Threshold { threshold: usize, shares: usize },
    #[error("at most 255 shares can be made over GF(2^8), {0} were asked for")]
    TooManyShares(usize),
    #[error("{got} shares given, {threshold} are needed")]
    NotEnoughShares { got: usize, threshold: usize },
    #[error("share x = 0 is invalid (it would be the secret itself)")]
    ZeroX,
    #[error("two shares have the same x = {0}")]
    DuplicateX(u8),
    #[error("shares have different lengths ({0} and {1} bytes)")]
    Length(usize, usize),
}

/// Branch-free multiplication in GF(2^8) modulo x^8 + x^4 + x^3 + x + 1.
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut p = 0u8;
    for _ in 0..8 {
        p ^= a & (b & 1).wrapping_neg();
        let carry = (a >> 7).wrapping_neg();
        a = (a << 1) ^ (0x1b & carry);
        b >>= 1;
    }
    p
}

/// Multiplicative inverse (a^254); maps 0 to 0, which callers never pass.
fn inv(a: u8) -> u8 {
    let a2 = mul(a, a);
    let a4 = mul(a2, a2);
    let a8 = mul(a4, a4);
    let a16 = mul(a8, a8);
    let a32 = mul(a16, a16);
    let a64 = mul(a32, a32);
    let a128 = mul(a64, a64);
    // 254 = 128 + 64 + 32 + 16 + 8 + 4 + 2
    mul(mul(mul(a128, a64), mul(a32, a16)), mul(mul(a8, a4), a2))
}

/// Splits `secret` into `shares` shares at x = 1..=shares, any `threshold` of which recover it.
pub fn split(
    secret: &[u8],
    threshold: usize,
    shares: usize,
    seed: [u8; 32],
) -> Result<Vec<Share>, ShamirError> {
    if shares > 255 {
        return Err(ShamirError::TooManyShares(shares));
    }
    if threshold == 0 || threshold > shares {
        return Err(ShamirError::Threshold { threshold, shares });
    }
    let mut rng = ChaCha20Rng::from_seed(seed);
    // coefficients[j][i]: coefficient of x^(j+1) for secret byte i.
    let mut coefficients = vec![vec![0u8; secret.len()]; threshold - 1];
    for c in &mut coefficients {
        rng.fill_bytes(c);
    }
    let mut coefficient_lanes: Vec<Lanes> = coefficients.iter().map(|c| Lanes::pack(c)).collect();
    let mut secret_lanes = Lanes::pack(secret);
    let out = (1..=shares as u8)
        .map(|x| {
            let by_x = PublicFactor::new(x);
            // Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + secret, eight bytes at a time.
            let mut acc = Lanes::zero(secret.len());
            for c in coefficient_lanes.iter().rev() {
                acc.mul_assign(&by_x);
                acc.xor_assign(c);
            }
            acc.mul_assign(&by_x);
            acc.xor_assign(&secret_lanes);
            let y = acc.unpack();
            acc.zeroize();
            Share { x, y }
        })
        .collect();
    coefficients.zeroize();
    coefficient_lanes.zeroize();
    secret_lanes.zeroize();
    Ok(out)
}

/// Recovers the secret from at least `threshold` shares (extra shares are ignored).
pub fn combine(shares: &[Share], threshold: usize) -> Result<Vec<u8>, ShamirError> {
    if threshold == 0 {
        return Err(ShamirError::Threshold {
            threshold,
            shares: shares.len(),
        });
    }
    if shares.len() < threshold {
        return Err(ShamirError::NotEnoughShares {
            got: shares.len(),
            threshold,
        });
    }
    let used = &shares[..threshold];
    let len = used[0].y.len();
    for (i, s) in used.iter().enumerate() {
        if s.x == 0 {
            return Err(ShamirError::ZeroX);
        }
        if s.y.len() != len {
            return Err(ShamirError::Length(len, s.y.len()));
        }
        if used[..i].iter().any(|o| o.x == s.x) {
            return Err(ShamirError::DuplicateX(s.x));
        }
    }
    // Lagrange basis at 0: l_j = Π_{m≠j} x_m / (x_m - x_j); subtraction is XOR.
    let basis: Vec<u8> = used
        .iter()
        .enumerate()
        .map(|(j, sj)| {
            let (mut num, mut den) = (1u8, 1u8);
            for (m, sm) in used.iter().enumerate() {
                if m != j {
                    num = mul(num, sm.x);
                    den = mul(den, sm.x ^ sj.x);
                }
            }
            mul(num, inv(den))
        })
        .collect();
    let mut acc = Lanes::zero(len);
    for (s, l) in used.iter().zip(&basis) {
        let mut term = Lanes::pack(&s.y);
        term.mul_assign(&PublicFactor::new(*l));
        acc.xor_assign(&term);
        term.zeroize();
    }
    let secret = acc.unpack();
    acc.zeroize();
    Ok(secret)
}

/// Up to eight field elements per u64 (byte `i` in lane `i / 8`, bits `8 (i % 8)..`), so
/// one word operation acts on eight secret bytes at once.
#[derive(Zeroize)]
struct Lanes {
    words: Vec<u64>,
    len: usize,
}

impl Lanes {
    fn zero(len: usize) -> Self {
        Lanes {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    fn pack(bytes: &[u8]) -> Self {
        let mut lanes = Lanes::zero(bytes.len());
        for (w, chunk) in lanes.words.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(b);
            b.zeroize();
        }
        lanes
    }

    fn unpack(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate(self.len);
        out
    }

    fn xor_assign(&mut self, other: &Lanes) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a ^= b;
        }
    }

    /// Multiplies every element by the same public factor.
    fn mul_assign(&mut self, by: &PublicFactor) {
        for w in &mut self.words {
            *w = by.apply(*w);
        }
    }
}

/// Multiplication by a public field element, as the bits of that element: `a · f` is the
/// XOR of `a · 2^j` over the set bits `j` of `f`. Branches depend on `f` only (public);
/// the secret operand goes through the same instructions whatever its value.
struct PublicFactor {
    bits: u8,
}

impl PublicFactor {
    fn new(f: u8) -> Self {
        PublicFactor { bits: f }
    }

    /// Eight products at once: each byte lane of `a` times the factor.
    fn apply(&self, mut a: u64) -> u64 {
        let mut product = 0u64;
        let mut bits = self.bits;
        while bits != 0 {
            if bits & 1 == 1 {
                product ^= a;
            }
            a = xtime_lanes(a);
            bits >>= 1;
        }
        product
    }
}

/// Multiplies each byte lane by x (i.e. 2), reducing by the AES polynomial: shift left within
/// the lane and XOR 0x1b into lanes whose top bit fell off.
fn xtime_lanes(a: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let carries = (a & HIGH) >> 7;
    ((a & !HIGH) << 1) ^ (carries * 0x1b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Carry-less multiplication with explicit reduction, written differently on purpose.
    fn mul_reference(a: u8, b: u8) -> u8 {
        let mut product: u16 = 0;
        for i in 0..8 {
            if b >> i & 1 == 1 {
                product ^= (a as u16) << i;
            }
        }
        for bit in (8..16).rev() {
            if product >> bit & 1 == 1 {
                product ^= 0x11b << (bit - 8);
            }
        }
        product as u8
    }

    #[test]
    fn field_arithmetic_is_correct_for_every_pair() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), mul_reference(a, b), "{a} * {b}");
            }
            if a != 0 {
                assert_eq!(mul(a, inv(a)), 1, "inverse of {a}");
            }
        }
        // FIPS-197 §4.2 example: {57} • {83} = {c1}.
        assert_eq!(mul(0x57, 0x83), 0xc1);
    }

    #[test]
    fn lane_multiplication_matches_the_scalar_one() {
        for f in 0..=255u8 {
            let by = PublicFactor::new(f);
            for a in 0..=255u8 {
                let packed =
                    u64::from_le_bytes([a, a ^ 0x5a, 0, 0xff, 1, a.wrapping_mul(7), 0x80, 3]);
                let got = by.apply(packed).to_le_bytes();
                for (lane, byte) in packed.to_le_bytes().iter().enumerate() {
                    assert_eq!(got[lane], mul(*byte, f), "{byte} * {f}");
                }
            }
        }
        let l = Lanes::pack(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(l.words.len(), 2);
        assert_eq!(l.unpack(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    }

    /// Shares are the same bytes as the straightforward per-byte Horner evaluation.
    #[test]
    fn shares_match_per_byte_evaluation() {
        let secret: Vec<u8> = (0..45u8).map(|i| i.wrapping_mul(37)).collect();
        let (t, n, seed) = (7, 20, [3u8; 32]);
        let shares = split(&secret, t, n, seed).unwrap();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut coefficients = vec![vec![0u8; secret.len()]; t - 1];
        for c in &mut coefficients {
            rand::RngCore::fill_bytes(&mut rng, c);
        }
        for s in &shares {
            for (i, y) in s.y.iter().enumerate() {
                let mut acc = 0u8;
                for c in coefficients.iter().rev() {
                    acc = mul(acc, s.x) ^ c[i];
                }
                assert_eq!(*y, mul(acc, s.x) ^ secret[i]);
            }
        }
    }

    #[test]
    fn errors_name_the_problem() {
        assert!(matches!(
            split(b"k", 0, 3, [0; 32]),
            Err(ShamirError::Threshold { .. })
        ));
        assert!(matches!(
            split(b"k", 4, 3, [0; 32]),
            Err(ShamirError::Threshold { .. })
        ));
        assert_eq!(
            split(b"k", 2, 256, [0; 32]),
            Err(ShamirError::TooManyShares(256))
        );
        let shares = split(b"secret", 3, 5, [1; 32]).unwrap();
        assert_eq!(
            combine(&shares[..2], 3),
            Err(ShamirError::NotEnoughShares {
                got: 2,
                threshold: 3
            })
        );
        let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert_eq!(combine(&dup, 3), Err(ShamirError::DuplicateX(1)));
        let mut zero = shares.clone();
        zero[0].x = 0;
        assert_eq!(combine(&zero, 3), Err(ShamirError::ZeroX));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any `threshold` shares, in any order, recover the secret.
        #[test]
        fn any_threshold_subset_recovers(
            secret in proptest::collection::vec(any::<u8>(), 0..48),
            n in 1usize..40,
            t_frac in 0.0f64..1.0,
            seed in any::<[u8; 32]>(),
            order_seed in any::<u64>(),
        ) {
            let t = 1 + ((n - 1) as f64 * t_frac) as usize;
            let shares = split(&secret, t, n, seed).unwrap();
            prop_assert_eq!(shares.len(), n);
            // A pseudo-random subset of size t (Fisher-Yates with a tiny LCG).
            let mut idx: Vec<usize> = (0..n).collect();
            let mut s = order_seed | 1;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                idx.swap(i, (s >> 33) as usize % (i + 1));
            }
            let subset: Vec<Share> = idx[..t].iter().map(|&i| shares[i].clone()).collect();
            prop_assert_eq!(combine(&subset, t).unwrap(), secret);
        }
    }
}
