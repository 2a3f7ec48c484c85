//! The server-side linear algebra of the strategies: dense products in f64 with `ndarray`,
//! QR and SVD with `nalgebra` (both pure Rust, so no BLAS or LAPACK on any machine). Nothing
//! here is a hand-written decomposition.
//!
//! Everything works in f64 and is rounded to f32 once, when a tensor is written back into an
//! adapter, as [`crate::aggregate`] does for FedAvg.

use nalgebra::DMatrix;
use ndarray::Array2;
use thiserror::Error;

use crate::adapter::Matrix;

/// A decomposition that could not be computed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum LinalgError {
    #[error("{what} holds a non-finite value; refusing to factorise it")]
    NonFinite { what: String },
    #[error("the SVD of {what} ({rows}×{cols}) did not converge")]
    NoConvergence {
        what: String,
        rows: usize,
        cols: usize,
    },
    #[error("cannot multiply {left:?} by {right:?}")]
    Shape { left: [usize; 2], right: [usize; 2] },
}

/// An adapter tensor as an f64 array.
pub fn to_array(m: &Matrix) -> Array2<f64> {
    Array2::from_shape_fn((m.rows(), m.cols()), |(i, j)| m.get(i, j) as f64)
}

/// An f64 array rounded once to an f32 [`Matrix`].
pub fn to_matrix(a: &Array2<f64>) -> Matrix {
    let (rows, cols) = a.dim();
    let data = a.iter().map(|v| *v as f32).collect();
    Matrix::new(rows, cols, data).expect("an array's length is rows × cols")
}

/// `left · right`, refusing mismatched shapes instead of panicking as `ndarray::dot` would.
pub fn product(left: &Array2<f64>, right: &Array2<f64>) -> Result<Array2<f64>, LinalgError> {
    if left.ncols() != right.nrows() {
        return Err(LinalgError::Shape {
            left: [left.nrows(), left.ncols()],
            right: [right.nrows(), right.ncols()],
        });
    }
    Ok(left.dot(right))
}

/// Squared Frobenius norm.
pub fn frobenius_sq(a: &Array2<f64>) -> f64 {
    a.iter().map(|v| v * v).sum()
}

fn to_dmatrix(a: &Array2<f64>) -> DMatrix<f64> {
    DMatrix::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)])
}

/// A rank-`r` product re-factorised: `b · a = left · right` with `right`'s rows orthonormal.
#[derive(Debug, Clone, PartialEq)]
pub struct Refactorised {
    /// `U·Σ`, `[d, r]`.
    pub b: Array2<f64>,
    /// `Vᵀ`, `[r, k]`, orthonormal rows (zero rows only where `r > min(d, k)`).
    pub a: Array2<f64>,
    /// The singular values, descending (`min(d, k, r)` of them).
    pub singular_values: Vec<f64>,
}

/// FedSVD's re-factorisation (arXiv 2505.12805): the thin SVD `B·A = U Σ Vᵀ` of a product of
/// rank at most `r`, returned as `B' = U Σ` and `A' = Vᵀ`, so `B'·A' = B·A` (lossless).
///
/// The dense `d×k` product is never formed: with thin QRs `B = Q_B R_B` and `Aᵀ = Q_A R_A`,
/// `B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ`, and the SVD of the small core `R_B R_Aᵀ = U_c Σ V_cᵀ` gives
/// `U = Q_B U_c`, `V = Q_A V_c`. That costs O((d + k)·r²) instead of O(d·k·min(d, k)), which
/// is what makes FedSVD affordable on 4096×11008 projections.
pub fn refactorise_low_rank(
    b: &Array2<f64>,
    a: &Array2<f64>,
    what: &str,
) -> Result<Refactorised, LinalgError> {
    let (d, r) = b.dim();
    let (r_a, k) = a.dim();
    if r != r_a {
        return Err(LinalgError::Shape {
            left: [d, r],
            right: [r_a, k],
        });
    }
    if b.iter().chain(a.iter()).any(|v| !v.is_finite()) {
        return Err(LinalgError::NonFinite {
            what: what.to_string(),
        });
    }
    let qr_b = to_dmatrix(b).qr();
    let (q_b, r_b) = (qr_b.q(), qr_b.r()); // [d, p], [p, r]
    let qr_a = to_dmatrix(a).transpose().qr();
    let (q_a, r_a_t) = (qr_a.q(), qr_a.r()); // [k, q], [q, r]
    let core = &r_b * r_a_t.transpose(); // [p, q]
    let (p, q) = core.shape();
    let svd = nalgebra::SVD::try_new(core, true, true, f64::EPSILON, 1_000 * (p + q + 1))
        .ok_or_else(|| LinalgError::NoConvergence {
            what: what.to_string(),
            rows: p,
            cols: q,
        })?;
    let (Some(u_c), Some(v_c_t)) = (svd.u, svd.v_t) else {
        unreachable!("both singular vector sets were requested")
    };
    let s = svd.singular_values; // min(p, q) values, descending
    let u = &q_b * u_c; // [d, s]
    let v_t = v_c_t * q_a.transpose(); // [s, k]
    let kept = s.len().min(r);
    let mut new_b = Array2::zeros((d, r));
    let mut new_a = Array2::zeros((r, k));
    for j in 0..kept {
        for i in 0..d {
            new_b[(i, j)] = u[(i, j)] * s[j];
        }
        for c in 0..k {
            new_a[(j, c)] = v_t[(j, c)];
        }
    }
    Ok(Refactorised {
        b: new_b,
        a: new_a,
        singular_values: s.iter().take(kept).copied().collect(),
    })
}
