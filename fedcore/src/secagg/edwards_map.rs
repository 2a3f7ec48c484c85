//! Many X25519 public keys (Montgomery u-coordinates) to Edwards points at once.
//!
//! `curve25519_dalek::montgomery::MontgomeryPoint::to_edwards` computes y = (u − 1)/(u + 1)
//! with one field inversion per key and then decompresses (one square root). A participant
//! converts every neighbour's key in one go, so the inversions can be shared (Montgomery's
//! trick: one inversion and three multiplications per key), which saves about a tenth of
//! each agreement. curve25519-dalek does not expose its field arithmetic, so the few
//! operations this needs are written out here, in the 5 × 51-bit representation dalek and
//! ref10 use. They only ever touch *public* keys, so they need not run in constant time.
//! Decompression (the square root and the curve check) stays dalek's.

use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};

const MASK51: u64 = (1 << 51) - 1;

/// An element of GF(2^255 − 19), limbs of 51 bits (loosely reduced: each below 2^52).
#[derive(Clone, Copy, Debug)]
struct Fe([u64; 5]);

impl Fe {
    const ONE: Fe = Fe([1, 0, 0, 0, 0]);

    /// The low 255 bits of `b` (little-endian); the top bit is ignored, as RFC 7748 asks
    /// of u-coordinates and as dalek does.
    fn from_bytes(b: &[u8; 32]) -> Fe {
        let load = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Fe([
            load(0) & MASK51,
            (load(6) >> 3) & MASK51,
            (load(12) >> 6) & MASK51,
            (load(19) >> 1) & MASK51,
            (load(24) >> 12) & MASK51,
        ])
    }

    /// Propagates carries so every limb is below 2^51 (plus a small excess in limb 0).
    fn carry(mut l: [u64; 5]) -> Fe {
        for i in 0..4 {
            l[i + 1] += l[i] >> 51;
            l[i] &= MASK51;
        }
        l[0] += 19 * (l[4] >> 51);
        l[4] &= MASK51;
        l[1] += l[0] >> 51;
        l[0] &= MASK51;
        Fe(l)
    }

    fn add(&self, o: &Fe) -> Fe {
        Fe::carry(core::array::from_fn(|i| self.0[i] + o.0[i]))
    }

    /// `self − o`, computed as `self + 16p − o` so no limb goes negative.
    fn sub(&self, o: &Fe) -> Fe {
        const SIXTEEN_P: [u64; 5] = [
            36_028_797_018_963_664,
            36_028_797_018_963_952,
            36_028_797_018_963_952,
            36_028_797_018_963_952,
            36_028_797_018_963_952,
        ];
        Fe::carry(core::array::from_fn(|i| self.0[i] + SIXTEEN_P[i] - o.0[i]))
    }

    fn mul(&self, o: &Fe) -> Fe {
        let (a, b) = (&self.0, &o.0);
        let m = |x: u64, y: u64| u128::from(x) * u128::from(y);
        // 2^255 = 19 (mod p): products that overflow limb 4 come back times 19.
        let b19: [u64; 5] = core::array::from_fn(|i| 19 * b[i]);
        let c = [
            m(a[0], b[0]) + m(a[1], b19[4]) + m(a[2], b19[3]) + m(a[3], b19[2]) + m(a[4], b19[1]),
            m(a[0], b[1]) + m(a[1], b[0]) + m(a[2], b19[4]) + m(a[3], b19[3]) + m(a[4], b19[2]),
            m(a[0], b[2]) + m(a[1], b[1]) + m(a[2], b[0]) + m(a[3], b19[4]) + m(a[4], b19[3]),
            m(a[0], b[3]) + m(a[1], b[2]) + m(a[2], b[1]) + m(a[3], b[0]) + m(a[4], b19[4]),
            m(a[0], b[4]) + m(a[1], b[3]) + m(a[2], b[2]) + m(a[3], b[1]) + m(a[4], b[0]),
        ];
        let mut out = [0u64; 5];
        let mut carry = 0u128;
        for i in 0..5 {
            let v = c[i] + carry;
            out[i] = (v as u64) & MASK51;
            carry = v >> 51;
        }
        // carry < 2^77 / 2^51 · … fits easily after multiplying by 19.
        let extra = carry * 19 + u128::from(out[0]);
        out[0] = (extra as u64) & MASK51;
        out[1] += (extra >> 51) as u64;
        Fe::carry(out)
    }

    /// `self^(2^k)`.
    fn pow2k(&self, k: u32) -> Fe {
        let mut x = *self;
        for _ in 0..k {
            x = x.mul(&x);
        }
        x
    }

    /// `self^(p − 2)`, the inverse (0 for 0), with ref10's addition chain:
    /// p − 2 = (2^250 − 1)·2^5 + 11.
    fn invert(&self) -> Fe {
        let z = self;
        let z2 = z.mul(z);
        let z9 = z2.pow2k(2).mul(z);
        let z11 = z9.mul(&z2);
        let z_5_0 = z11.mul(&z11).mul(&z9); // z^(2^5 − 1)
        let z_10_0 = z_5_0.pow2k(5).mul(&z_5_0);
        let z_20_0 = z_10_0.pow2k(10).mul(&z_10_0);
        let z_40_0 = z_20_0.pow2k(20).mul(&z_20_0);
        let z_50_0 = z_40_0.pow2k(10).mul(&z_10_0);
        let z_100_0 = z_50_0.pow2k(50).mul(&z_50_0);
        let z_200_0 = z_100_0.pow2k(100).mul(&z_100_0);
        let z_250_0 = z_200_0.pow2k(50).mul(&z_50_0);
        z_250_0.pow2k(5).mul(&z11)
    }

    /// The canonical little-endian encoding (value reduced below p).
    fn to_bytes(self) -> [u8; 32] {
        let mut l = self.0;
        // Three carry passes leave every limb below 2^51: a carry out of limb 4 in the second
        // pass leaves limb 4 small, so the third cannot carry out again.
        for _ in 0..3 {
            for i in 0..4 {
                l[i + 1] += l[i] >> 51;
                l[i] &= MASK51;
            }
            l[0] += 19 * (l[4] >> 51);
            l[4] &= MASK51;
        }
        // Now l < 2^255; subtract p once if l >= p, i.e. if l + 19 >= 2^255 (ref10's trick).
        let mut q = (l[0] + 19) >> 51;
        for limb in &l[1..] {
            q = (limb + q) >> 51;
        }
        l[0] += 19 * q;
        for i in 0..4 {
            l[i + 1] += l[i] >> 51;
            l[i] &= MASK51;
        }
        l[4] &= MASK51;
        let mut out = [0u8; 32];
        let mut acc: u128 = 0;
        let mut bits = 0;
        let mut pos = 0;
        for limb in l {
            acc |= u128::from(limb) << bits;
            bits += 51;
            while bits >= 8 && pos < 32 {
                out[pos] = acc as u8;
                acc >>= 8;
                bits -= 8;
                pos += 1;
            }
        }
        if pos < 32 {
            out[pos] = acc as u8;
        }
        out
    }
}

/// The Edwards points (x chosen non-negative) of the Montgomery u-coordinates `us`, in
/// order, exactly as `MontgomeryPoint::to_edwards(0)` would give them; `None` for a
/// u-coordinate that has no point on the curve (it lies on the twist, or u = −1).
pub(crate) fn to_edwards_batch(us: &[[u8; 32]]) -> Vec<Option<EdwardsPoint>> {
    let u: Vec<Fe> = us.iter().map(Fe::from_bytes).collect();
    let denominators: Vec<Fe> = u.iter().map(|u| u.add(&Fe::ONE)).collect();
    // Montgomery's trick over the non-zero denominators (u = −1 is refused below).
    let zero = |f: &Fe| f.to_bytes() == [0u8; 32];
    let mut prefix = Vec::with_capacity(u.len());
    let mut acc = Fe::ONE;
    for d in &denominators {
        prefix.push(acc);
        if !zero(d) {
            acc = acc.mul(d);
        }
    }
    let mut inv = acc.invert();
    let mut inverses = vec![Fe::ONE; u.len()];
    for i in (0..u.len()).rev() {
        if zero(&denominators[i]) {
            continue;
        }
        inverses[i] = inv.mul(&prefix[i]);
        inv = inv.mul(&denominators[i]);
    }
    u.iter()
        .zip(&denominators)
        .zip(&inverses)
        .map(|((u, d), d_inv)| {
            if zero(d) {
                return None;
            }
            let y = u.sub(&Fe::ONE).mul(d_inv);
            CompressedEdwardsY(y.to_bytes()).decompress()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::montgomery::MontgomeryPoint;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn dalek(u: &[u8; 32]) -> Option<[u8; 32]> {
        MontgomeryPoint(*u)
            .to_edwards(0)
            .map(|p| p.compress().to_bytes())
    }

    #[test]
    fn matches_dalek_for_random_special_and_non_canonical_inputs() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut us: Vec<[u8; 32]> = (0..400)
            .map(|_| {
                let mut u = [0u8; 32];
                rng.fill_bytes(&mut u);
                u
            })
            .collect();
        // Honest public keys, and small or special values: 0, 1, 2, p − 1 (= −1), p, p + 1,
        // 2^255 − 1, and the same with the ignored top bit set.
        for i in 0..50u8 {
            us.push(crate::secagg::crypto::AgreementSecret::from_bytes([i; 32]).public());
        }
        let p_minus = |k: u8| {
            let mut b = [0xffu8; 32];
            b[31] = 0x7f;
            b[0] = 0xed - k;
            b
        };
        let small = |v: u8| {
            let mut b = [0u8; 32];
            b[0] = v;
            b
        };
        us.extend([
            small(0),
            small(1),
            small(2),
            small(9),
            p_minus(1),
            p_minus(0),
        ]);
        let mut p_plus_1 = p_minus(0);
        p_plus_1[0] = 0xee;
        us.push(p_plus_1);
        us.push([0xff; 32]);
        let with_top: Vec<[u8; 32]> = us
            .iter()
            .map(|u| {
                let mut v = *u;
                v[31] |= 0x80;
                v
            })
            .collect();
        us.extend(with_top);
        let ours = to_edwards_batch(&us);
        let mut refused = 0;
        for (u, got) in us.iter().zip(&ours) {
            assert_eq!(
                got.map(|p| p.compress().to_bytes()),
                dalek(u),
                "u = {}",
                hex::encode(u)
            );
            refused += usize::from(got.is_none());
        }
        // About half of random u-coordinates lie on the twist.
        assert!(refused > 100 && refused < 500, "{refused}");
        assert!(to_edwards_batch(&[]).is_empty());
    }

    #[test]
    fn field_inverse_and_encoding_are_right() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for _ in 0..50 {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            let a = Fe::from_bytes(&b);
            assert_eq!(a.mul(&a.invert()).to_bytes(), Fe::ONE.to_bytes());
            // Round trip of a canonical value.
            let canonical = a.to_bytes();
            assert_eq!(Fe::from_bytes(&canonical).to_bytes(), canonical);
            assert_eq!(a.sub(&a).to_bytes(), [0u8; 32]);
            assert_eq!(a.add(&Fe::ONE).sub(&Fe::ONE).to_bytes(), canonical);
        }
    }
}
