//! ggml storage types and their conversion to f32.
//!
//! The block layouts follow ggml exactly (`ggml-common.h`, `dequantize_row_*` in
//! `ggml-quants.c`; gguf-py's `gguf/quants.py` is the Python port the test vectors come from).
//! Each conversion does the same f32 operations in the same order as those references, without
//! fused multiply-adds, so the results agree bit for bit (the test `dequant_matches_gguf_py`
//! checks that on fixed blocks of every supported type).
//!
//! Every ggml type is known by id, name and block size, so the reader can check the bounds of
//! any tensor; only the types below can be converted, and reading any other is
//! [`CheckpointError::UnsupportedDtype`](crate::error::CheckpointError::UnsupportedDtype).

use half::{bf16, f16};

/// The types [`dequantize`] converts, for error messages.
pub const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K";

/// Elements per super-block of the k-quants.
const QK_K: usize = 256;

/// A ggml tensor type (`enum ggml_type` in ggml.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    id: u32,
    name: &'static str,
    block: u64,
    block_bytes: u64,
}

/// `(id, name, elements per block, bytes per block)` of every ggml type, from gguf-py's
/// `GGML_QUANT_SIZES`.
const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
    (40, "NVFP4", 64, 36),
    (41, "Q1_0", 128, 18),
];

impl GgmlType {
    pub const F32: GgmlType = GgmlType::known(0);
    pub const F16: GgmlType = GgmlType::known(1);
    pub const Q4_0: GgmlType = GgmlType::known(2);
    pub const Q4_1: GgmlType = GgmlType::known(3);
    pub const Q5_0: GgmlType = GgmlType::known(6);
    pub const Q5_1: GgmlType = GgmlType::known(7);
    pub const Q8_0: GgmlType = GgmlType::known(8);
    pub const Q4_K: GgmlType = GgmlType::known(12);
    pub const Q6_K: GgmlType = GgmlType::known(14);
    pub const BF16: GgmlType = GgmlType::known(30);

    const fn known(id: u32) -> GgmlType {
        let mut i = 0;
        while i < TYPES.len() {
            if TYPES[i].0 == id {
                return GgmlType {
                    id,
                    name: TYPES[i].1,
                    block: TYPES[i].2,
                    block_bytes: TYPES[i].3,
                };
            }
            i += 1;
        }
        panic!("not a ggml type id");
    }

    /// The type with ggml id `id`, if ggml has one.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block, block_bytes)| GgmlType {
                id,
                name,
                block,
                block_bytes,
            })
    }

    /// ggml's id of the type.
    pub fn id(self) -> u32 {
        self.id
    }

    /// ggml's name of the type (`Q4_K`).
    pub fn name(self) -> &'static str {
        self.name
    }

    /// `(elements per block, bytes per block)`.
    pub fn block(self) -> (u64, u64) {
        (self.block, self.block_bytes)
    }

    /// Whether [`dequantize`] converts this type.
    pub fn is_supported(self) -> bool {
        matches!(self.id, 0 | 1 | 2 | 3 | 6 | 7 | 8 | 12 | 14 | 30)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Why [`dequantize`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DequantError {
    /// The type is not one of [`SUPPORTED`].
    Unsupported(GgmlType),
    /// The byte count is not a whole number of blocks.
    Length { bytes: usize, block_bytes: usize },
}

/// Converts whole blocks of `ggml_type` to f32, in storage order.
pub fn dequantize(ggml_type: GgmlType, bytes: &[u8]) -> Result<Vec<f32>, DequantError> {
    if !ggml_type.is_supported() {
        return Err(DequantError::Unsupported(ggml_type));
    }
    let (block, block_bytes) = (ggml_type.block as usize, ggml_type.block_bytes as usize);
    if !bytes.len().is_multiple_of(block_bytes) {
        return Err(DequantError::Length {
            bytes: bytes.len(),
            block_bytes,
        });
    }
    let mut out = Vec::with_capacity(bytes.len() / block_bytes * block);
    let blocks = bytes.chunks_exact(block_bytes);
    match ggml_type.id {
        0 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        1 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        30 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        2 => blocks.for_each(|b| q4_0(b, &mut out)),
        3 => blocks.for_each(|b| q4_1(b, &mut out)),
        6 => blocks.for_each(|b| q5_0(b, &mut out)),
        7 => blocks.for_each(|b| q5_1(b, &mut out)),
        8 => blocks.for_each(|b| q8_0(b, &mut out)),
        12 => blocks.for_each(|b| q4_k(b, &mut out)),
        14 => blocks.for_each(|b| q6_k(b, &mut out)),
        _ => unreachable!("is_supported lists the types handled here"),
    }
    Ok(out)
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `block_q8_0`: `d: f16, qs: [i8; 32]`; `y = qs · d`.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

/// The 32 five-bit values of a `block_q5_0`/`block_q5_1`: `qh` (a little-endian u32) holds
/// the fifth bits, bit `j` for element `j`; `qs[j]` holds the low four bits of element `j`
/// (low nibble) and of element `j + 16` (high nibble).
fn five_bit(qh: &[u8], qs: &[u8]) -> [u8; 32] {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; 32];
    for j in 0..16 {
        let high_lo = (((qh >> j) << 4) & 0x10) as u8;
        let high_hi = ((qh >> (j + 12)) & 0x10) as u8;
        q[j] = (qs[j] & 0x0F) | high_lo;
        q[j + 16] = (qs[j] >> 4) | high_hi;
    }
    q
}

/// `block_q5_0`: `d: f16, qh: [u8; 4], qs: [u8; 16]`; `y = (q − 16) · d`.
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let q = five_bit(&b[2..6], &b[6..22]);
    out.extend(q.iter().map(|&q| f32::from(q as i8 - 16) * d));
}

/// `block_q5_1`: `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`; `y = q · d + m`.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let q = five_bit(&b[4..8], &b[8..24]);
    out.extend(q.iter().map(|&q| f32::from(q) * d + m));
}

/// `block_q4_0`: `d: f16, qs: [u8; 16]`; element `j` is the low nibble of `qs[j]`, element
/// `j + 16` the high one; `y = (q − 8) · d`.
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|&q| f32::from((q & 0x0F) as i8 - 8) * d));
    out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
}

/// `block_q4_1`: `d: f16, m: f16, qs: [u8; 16]`; nibbles as Q4_0; `y = q · d + m`.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let m = half_at(b, 2);
    let qs = &b[4..20];
    out.extend(qs.iter().map(|&q| f32::from(q & 0x0F) * d + m));
    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
}

/// `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// `block_q4_K`: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; 256 elements in 8
/// sub-blocks of 32 with 6-bit scales and mins. Each 32 bytes of `qs` hold two sub-blocks, low
/// nibbles first; `y = (d · sc) · q − (dmin · m)`.
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let dmin = half_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (pair, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * pair, scales);
        let (sc2, m2) = scale_min_k4(2 * pair + 1, scales);
        let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
        out.extend(q.iter().map(|&x| d1 * f32::from(x & 0x0F) - min1));
        out.extend(q.iter().map(|&x| d2 * f32::from(x >> 4) - min2));
    }
}

/// `block_q6_K`: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`; 256 elements of 6 bits
/// (4 low bits in `ql`, 2 high bits in `qh`) in 16 sub-blocks of 16 with signed 8-bit scales;
/// `y = (d · sc) · (q − 32)`. Each half of 128 elements uses 64 bytes of `ql`, 32 of `qh` and 8
/// scales.
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 208);
    let start = out.len();
    out.resize(start + QK_K, 0.0);
    let y = &mut out[start..];
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let scale = |k: usize| d * f32::from(sc[is + k] as i8);
            y[l] = scale(0) * f32::from(q1);
            y[l + 32] = scale(2) * f32::from(q2);
            y[l + 64] = scale(4) * f32::from(q3);
            y[l + 96] = scale(6) * f32::from(q4);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_has_a_name_and_block() {
        for &(id, name, block, bytes) in TYPES {
            let t = GgmlType::from_id(id).unwrap();
            assert_eq!((t.name(), t.block()), (name, (block, bytes)));
        }
        assert!(GgmlType::from_id(4).is_none() && GgmlType::from_id(99).is_none());
        assert_eq!(GgmlType::Q6_K.name(), "Q6_K");
    }

    #[test]
    fn refuses_unsupported_types_and_partial_blocks() {
        let q5k = GgmlType::from_id(13).unwrap();
        assert_eq!(
            dequantize(q5k, &[0; 176]),
            Err(DequantError::Unsupported(q5k))
        );
        assert_eq!(
            dequantize(GgmlType::Q8_0, &[0; 35]),
            Err(DequantError::Length {
                bytes: 35,
                block_bytes: 34
            })
        );
    }

    #[test]
    fn q8_0_by_hand() {
        // d = 0.5 (f16 0x3800), qs = -2, 0, 127, ...
        let mut block = vec![0x00, 0x38];
        block.extend([(-2i8) as u8, 0, 127]);
        block.resize(34, 1);
        let y = dequantize(GgmlType::Q8_0, &block).unwrap();
        assert_eq!(&y[..4], &[-1.0, 0.0, 63.5, 0.5]);
        assert_eq!(y.len(), 32);
    }

    #[test]
    fn q4_0_nibble_order() {
        // d = 1; qs[0] = 0x9F: element 0 is 0xF − 8 = 7, element 16 is 0x9 − 8 = 1.
        let mut block = vec![0x00, 0x3C, 0x9F];
        block.resize(18, 0x88);
        let y = dequantize(GgmlType::Q4_0, &block).unwrap();
        assert_eq!((y[0], y[16], y[1], y[17]), (7.0, 1.0, 0.0, 0.0));
    }
}
