//! Differential privacy (issue #20): the accountant first. Pure functions and state; the
//! randomness is always the caller's.
//!
//! - [`rdp`]: Rényi DP of the subsampled Gaussian, composition, conversion to (ε, δ),
//!   checked against Opacus and Google's dp_accounting.
//! - [`discrete`]: exact discrete Laplace and discrete Gaussian samplers (integer arithmetic
//!   only), the noise a lab adds to its integer update before masking.
//! - [`ddg`]: the accountant of that noise summed over the labs (the distributed discrete
//!   Gaussian), checked against its authors' implementation.
//! - [`skellam`]: the same for Skellam noise (sums of Skellams stay Skellam).
//! - [`spec`]: `[plan.privacy]`, and how the noise is shared among the labs.
//! - [`rotation`] and [`distributed`]: the encoding each lab applies before masking (clip,
//!   rotate, round, noise) and the center's decoding of the sum.
//! - [`ledger`]: the ε a lab has spent, from its own record of the sums it took part in.

pub mod ddg;
pub mod discrete;
pub mod distributed;
pub mod ledger;
pub mod rdp;
pub mod rotation;
pub mod skellam;
pub mod spec;

pub use spec::{PrivacyMode, PrivacySpec, RecordDpSpec};
