//! Differential privacy (issue #20): the accountant first. Pure functions and state, no
//! randomness drawn here.
//!
//! - [`rdp`]: Rényi DP of the subsampled Gaussian, composition, conversion to (ε, δ),
//!   checked against Opacus and Google's dp_accounting.

pub mod rdp;
