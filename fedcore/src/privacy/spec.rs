//! `[plan.privacy]`: whether the sum the center unmasks carries differential-privacy noise,
//! and how much.
//!
//! ```toml
//! [plan.privacy]
//! mode = "distributed"     # "off" (default) or "distributed"
//! noise_multiplier = 1.0   # the sum's noise standard deviation over l2_clip
//! l2_clip = 0.05           # each lab's update is scaled to at most this L2 norm
//! delta = 1e-5             # the δ of the (ε, δ) guarantee
//! ```
//!
//! `distributed` is client-level DP (Kairouz, Liu, Steinke 2021): each lab clips its whole
//! update to `l2_clip`, rotates it, rounds it onto an integer grid and adds its share of
//! discrete Gaussian noise before masking ([`super::distributed`]), so no one (not the
//! center, not a lab) ever sees an update or a sum without noise. The guarantee is about a
//! whole lab's data in a round: the global model barely depends on whether a lab took part.
//!
//! How the noise is shared: the center could collude with up to
//! `secure_aggregation.max_colluding` labs, which know (and can subtract) their own noise,
//! and a sum may hold as few labs as the secure-aggregation threshold `t`. Each lab
//! therefore adds noise of standard deviation `noise_multiplier · l2_clip / √(t − c)`, so
//! that the noise no coalition can remove is at least `noise_multiplier · l2_clip` in every
//! sum the protocol lets the center unmask; the accountant counts the survivors actually
//! summed, minus the colluders.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::plan::TrainingSpec;
use crate::secagg::spec::SecureAggregationSpec;
use crate::strategy::AggregationMode;

/// Which differential-privacy mechanism guards the federation's sums.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrivacyMode {
    /// No noise: secure aggregation alone (the sum is exact).
    #[default]
    Off,
    /// Distributed discrete Gaussian noise, added by each lab before masking.
    Distributed,
}

/// `[plan.privacy]` (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySpec {
    pub mode: PrivacyMode,
    /// The standard deviation of the noise no coalition can remove from a sum, over
    /// `l2_clip` (z). Larger: less privacy spent per round, noisier model.
    pub noise_multiplier: f64,
    /// Each lab's update (the whole upload vector) is scaled down to at most this L2 norm:
    /// the sensitivity the noise hides.
    pub l2_clip: f64,
    /// The δ of the (ε, δ) guarantee: well below 1 / (number of labs).
    pub delta: f64,
    /// `[privacy.record]`: record-level DP-SGD inside each lab, on top of (or without) the
    /// noise on the sum. Absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<RecordDpSpec>,
}

/// `[privacy.record]`: DP-SGD in each lab's local training (Abadi et al. 2016): the lab's
/// text cut into disjoint records of `training.seq_len` predictions, each step a Poisson
/// sample of them at rate `training.batch_size / records`, each record's gradient clipped to
/// `max_grad_norm`, Gaussian noise of `noise_multiplier · max_grad_norm` on the sum. The
/// guarantee holds per record against anyone who sees the lab's updates, secure aggregation
/// or not; each lab's ε depends on its own number of records.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordDpSpec {
    /// σ: the noise's standard deviation over `max_grad_norm`.
    pub noise_multiplier: f64,
    /// C: each record's gradient (all trained tensors together) is scaled to at most this
    /// L2 norm.
    pub max_grad_norm: f64,
}

impl Default for PrivacySpec {
    fn default() -> Self {
        PrivacySpec {
            mode: PrivacyMode::Off,
            noise_multiplier: 1.0,
            l2_clip: 0.05,
            delta: 1e-5,
            record: None,
        }
    }
}

/// Conditional rounding's β (Kairouz et al.'s choice, e^{−1/2}): a rounded update whose
/// norm exceeds the bound for β is rounded again.
pub const ROUNDING_BETA: f64 = 0.606_530_659_712_633_4;

impl PrivacySpec {
    /// Whether the section is the default (left out of the plan's JSON, so plans without it
    /// keep their fingerprint).
    pub fn is_default(&self) -> bool {
        *self == PrivacySpec::default()
    }

    pub fn enabled(&self) -> bool {
        self.mode != PrivacyMode::Off
    }

    /// Checks the section against the secure-aggregation section, the roster size and the
    /// strategy; errors name the field.
    pub fn validate(
        &self,
        secure: &SecureAggregationSpec,
        members: usize,
        mode: AggregationMode,
        training: &TrainingSpec,
    ) -> Result<(), ConfigError> {
        if let Some(record) = &self.record {
            record.validate(training)?;
            check_delta(self.delta)?;
        }
        if !self.enabled() {
            return Ok(());
        }
        if !secure.enabled {
            return Err(ConfigError::field(
                "privacy.mode",
                "distributed DP needs secure aggregation (secure_aggregation.enabled = true): each lab's share of the noise is too small to protect its update on its own",
            ));
        }
        if matches!(mode, AggregationMode::GroupB | AggregationMode::HetLora) {
            return Err(ConfigError::field(
                "privacy.mode",
                format!(
                    "distributed DP cannot be combined with strategy.mode = \"{}\": its uploads carry counts (group weights, rank coverage) that the noise would corrupt; use ffa_lora, fedit, fedsa_lora, fedsvd, rolora or fedex_lora",
                    mode.name()
                ),
            ));
        }
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(ConfigError::field(
                "privacy.noise_multiplier",
                format!(
                    "{} must be a positive number (1.0 is a common start)",
                    self.noise_multiplier
                ),
            ));
        }
        if !(self.l2_clip.is_finite() && self.l2_clip > 0.0) {
            return Err(ConfigError::field(
                "privacy.l2_clip",
                format!("{} must be a positive number", self.l2_clip),
            ));
        }
        check_delta(self.delta)?;
        if members > 0 && self.delta >= 1.0 / members as f64 {
            return Err(ConfigError::field(
                "privacy.delta",
                format!(
                    "{} is not below 1 / {members} labs: a guarantee with such a δ allows one lab's data to be published whole",
                    self.delta
                ),
            ));
        }
        Ok(())
    }

    /// Whether record-level DP-SGD is on.
    pub fn record_level(&self) -> bool {
        self.record.is_some()
    }

    /// The labs whose noise no coalition can remove from a sum of `summed` labs, under
    /// `secure`: the summed minus the colluders tolerated, at least one.
    pub fn honest_in(&self, secure: &SecureAggregationSpec, summed: usize) -> usize {
        honest_labs(summed, secure.max_colluding)
    }
}

/// The labs whose noise no coalition of the center and `colluders` labs can remove from a
/// sum of `summed` labs (colluders know their own noise): at least one.
pub fn honest_labs(summed: usize, colluders: usize) -> usize {
    summed.saturating_sub(colluders).max(1)
}

fn check_delta(delta: f64) -> Result<(), ConfigError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(ConfigError::field(
            "privacy.delta",
            format!("{delta} must be between 0 and 1 (exclusive)"),
        ));
    }
    Ok(())
}

impl RecordDpSpec {
    /// Checks the section against the training it changes; errors name the field.
    pub fn validate(&self, training: &TrainingSpec) -> Result<(), ConfigError> {
        if !(self.noise_multiplier.is_finite() && self.noise_multiplier > 0.0) {
            return Err(ConfigError::field(
                "privacy.record.noise_multiplier",
                format!("{} must be a positive number", self.noise_multiplier),
            ));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm > 0.0) {
            return Err(ConfigError::field(
                "privacy.record.max_grad_norm",
                format!("{} must be a positive number", self.max_grad_norm),
            ));
        }
        if training.max_grad_norm.is_some() {
            return Err(ConfigError::field(
                "training.max_grad_norm",
                "must be unset under [privacy.record]: each record's gradient is clipped to privacy.record.max_grad_norm instead",
            ));
        }
        if training.grad_accumulation != 1 {
            return Err(ConfigError::field(
                "training.grad_accumulation",
                format!(
                    "{} must be 1 under [privacy.record]: a DP-SGD step is one Poisson sample of records (raise training.batch_size for larger steps)",
                    training.grad_accumulation
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on() -> PrivacySpec {
        PrivacySpec {
            mode: PrivacyMode::Distributed,
            ..Default::default()
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let secure = SecureAggregationSpec::default();
        on().validate(
            &secure,
            6,
            AggregationMode::FfaLora,
            &TrainingSpec::default(),
        )
        .unwrap();
        PrivacySpec::default()
            .validate(
                &SecureAggregationSpec {
                    enabled: false,
                    ..Default::default()
                },
                0,
                AggregationMode::GroupB,
                &TrainingSpec::default(),
            )
            .unwrap();
        let cases = [
            (
                on(),
                SecureAggregationSpec {
                    enabled: false,
                    ..Default::default()
                },
                AggregationMode::FfaLora,
                "privacy.mode",
            ),
            (
                on(),
                secure.clone(),
                AggregationMode::GroupB,
                "privacy.mode",
            ),
            (
                PrivacySpec {
                    noise_multiplier: 0.0,
                    ..on()
                },
                secure.clone(),
                AggregationMode::FfaLora,
                "privacy.noise_multiplier",
            ),
            (
                PrivacySpec {
                    l2_clip: f64::NAN,
                    ..on()
                },
                secure.clone(),
                AggregationMode::FfaLora,
                "privacy.l2_clip",
            ),
            (
                PrivacySpec { delta: 0.5, ..on() },
                secure.clone(),
                AggregationMode::FfaLora,
                "privacy.delta",
            ),
        ];
        for (spec, secure, mode, field) in cases {
            let err = spec
                .validate(&secure, 6, mode, &TrainingSpec::default())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
    }

    #[test]
    fn record_level_dp_refuses_what_it_replaces() {
        let record = PrivacySpec {
            record: Some(RecordDpSpec {
                noise_multiplier: 1.0,
                max_grad_norm: 1.0,
            }),
            ..Default::default()
        };
        let plaintext = SecureAggregationSpec {
            enabled: false,
            ..Default::default()
        };
        // Without secure aggregation too: the guarantee is the lab's own.
        record
            .validate(
                &plaintext,
                0,
                AggregationMode::GroupB,
                &TrainingSpec::default(),
            )
            .unwrap();
        for (training, field) in [
            (
                TrainingSpec {
                    max_grad_norm: Some(1.0),
                    ..Default::default()
                },
                "training.max_grad_norm",
            ),
            (
                TrainingSpec {
                    grad_accumulation: 2,
                    ..Default::default()
                },
                "training.grad_accumulation",
            ),
        ] {
            let err = record
                .validate(&plaintext, 0, AggregationMode::FfaLora, &training)
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{err}");
        }
        let zero = PrivacySpec {
            record: Some(RecordDpSpec {
                noise_multiplier: 0.0,
                max_grad_norm: 1.0,
            }),
            ..Default::default()
        };
        let err = zero
            .validate(
                &plaintext,
                0,
                AggregationMode::FfaLora,
                &TrainingSpec::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("privacy.record.noise_multiplier"), "{err}");
    }

    #[test]
    fn colluders_noise_is_not_counted() {
        let secure = SecureAggregationSpec::default();
        assert_eq!(on().honest_in(&secure, 5), 4);
        assert_eq!(on().honest_in(&secure, 1), 1);
    }

    #[test]
    fn beta_is_e_to_the_minus_half() {
        assert!((ROUNDING_BETA - (-0.5f64).exp()).abs() < 1e-15);
    }
}
