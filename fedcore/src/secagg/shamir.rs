//! Shamir secret sharing over GF(2^8), byte by byte, in constant time.
//!
//! Each byte of the secret is the constant term of its own random polynomial of degree
//! `threshold - 1`; share `x` (1..=255) holds every polynomial evaluated at `x`. Any
//! `threshold` shares recover the secret by Lagrange interpolation at 0; fewer reveal nothing.
//! The field is GF(2^8) with the AES polynomial x^8 + x^4 + x^3 + x + 1. Multiplication is
//! branch-free and uses no lookup tables, so timing does not depend on secret bytes (the
//! table-based crates sharks/blahaj do). Randomness comes in as a 32-byte seed so the caller
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
    let out = (1..=shares as u8)
        .map(|x| {
            let y = (0..secret.len())
                .map(|i| {
                    // Horner: ((c_{t-1} x + c_{t-2}) x + ...) x + secret
                    let mut acc = 0u8;
                    for c in coefficients.iter().rev() {
                        acc = mul(acc, x) ^ c[i];
                    }
                    mul(acc, x) ^ secret[i]
                })
                .collect();
            Share { x, y }
        })
        .collect();
    coefficients.zeroize();
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
    Ok((0..len)
        .map(|i| {
            used.iter()
                .zip(&basis)
                .fold(0u8, |acc, (s, l)| acc ^ mul(s.y[i], *l))
        })
        .collect())
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
