//! Which decoder family a [`ModelSpec`](crate::plan::ModelSpec) describes, and what that family
//! adds to the Llama fields.
//!
//! Llama (Llama 2/3, Qwen2, Mistral, SmolLM2) is the default, and its plans serialise without
//! an `architecture` entry, so their fingerprints are what they were before Gemma 3 existed.
//! Gemma 3 (text) keeps the Llama skeleton (grouped-query attention, RoPE, gated MLP, RMSNorm)
//! and changes, per Hugging Face's `Gemma3TextConfig`:
//! - RMSNorm scales by `1 + w` (labs load the checkpoint's `w`; the model adds the one);
//! - four norms per layer: the attention and MLP outputs are normed before the residual add;
//! - per-head RMSNorm of queries and keys before RoPE (`q_norm`, `k_norm`);
//! - a GeGLU MLP with the tanh approximation of GELU;
//! - token embeddings multiplied by `√hidden_size` (the tied output head uses them unscaled);
//! - attention scores scaled by `query_pre_attn_scalar^-½` instead of `head_dim^-½`;
//! - interleaved attention: most layers see only the last `sliding_window` positions with
//!   their own RoPE base (`rope_local_theta`), the `full_attention_layers` see everything with
//!   `rope_theta` (and `rope_scaling`, if any).
//!
//! What the family is decides what the model computes, so it is part of the plan every lab
//! pins: two labs cannot fine-tune the same weights as different architectures.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// The decoder family, with the fields only that family has.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "family", rename_all = "snake_case", deny_unknown_fields)]
pub enum Architecture {
    /// The Llama family: pre-norm, SwiGLU, plain RMSNorm, one RoPE base.
    #[default]
    Llama,
    /// Gemma 3 (text): see the module documentation.
    Gemma3(Gemma3Layout),
}

/// What Gemma 3 adds to the Llama fields, named after `Gemma3TextConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gemma3Layout {
    /// How many positions (the query's own included) a sliding-window layer attends to.
    pub sliding_window: usize,
    /// Indices of the layers with full (global) attention; every other layer slides.
    pub full_attention_layers: Vec<usize>,
    /// RoPE base of the sliding-window layers (`rope_local_base_freq`).
    pub rope_local_theta: f32,
    /// Attention scores are scaled by `query_pre_attn_scalar^-½`.
    pub query_pre_attn_scalar: f32,
}

impl Architecture {
    /// Whether this is the default family (then the plan omits the field).
    pub fn is_llama(&self) -> bool {
        matches!(self, Architecture::Llama)
    }

    /// The Gemma 3 layout, when this is Gemma 3.
    pub fn gemma3(&self) -> Option<&Gemma3Layout> {
        match self {
            Architecture::Gemma3(layout) => Some(layout),
            Architecture::Llama => None,
        }
    }

    /// A short name for messages and model cards.
    pub fn family(&self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Gemma3(_) => "gemma3",
        }
    }

    /// Checks the family's own fields against the number of layers; errors name the field.
    pub fn validate(&self, num_hidden_layers: usize) -> Result<(), ConfigError> {
        let Architecture::Gemma3(g) = self else {
            return Ok(());
        };
        if g.sliding_window == 0 {
            return Err(ConfigError::field(
                "model.architecture.sliding_window",
                "must be at least 1",
            ));
        }
        let mut seen = vec![false; num_hidden_layers];
        for &layer in &g.full_attention_layers {
            match seen.get_mut(layer) {
                None => {
                    return Err(ConfigError::field(
                        "model.architecture.full_attention_layers",
                        format!(
                            "layer {layer} does not exist (the model has {num_hidden_layers} layers)"
                        ),
                    ));
                }
                Some(true) => {
                    return Err(ConfigError::field(
                        "model.architecture.full_attention_layers",
                        format!("layer {layer} is listed twice"),
                    ));
                }
                Some(slot) => *slot = true,
            }
        }
        for (field, v) in [
            ("model.architecture.rope_local_theta", g.rope_local_theta),
            (
                "model.architecture.query_pre_attn_scalar",
                g.query_pre_attn_scalar,
            ),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::field(
                    field,
                    format!("must be a positive number, got {v}"),
                ));
            }
        }
        Ok(())
    }
}

impl Gemma3Layout {
    /// Whether layer `i` attends globally (otherwise through the sliding window).
    pub fn is_full_attention(&self, layer: usize) -> bool {
        self.full_attention_layers.contains(&layer)
    }

    /// Gemma 3's default interleaving, `sliding_window_pattern = n`: every n-th layer
    /// (1-based) is global, i.e. layer `i` when `(i + 1) % n == 0`.
    pub fn every_nth_full(num_hidden_layers: usize, n: usize) -> Vec<usize> {
        if n == 0 {
            return Vec::new();
        }
        (0..num_hidden_layers)
            .filter(|i| (i + 1) % n == 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma(full: Vec<usize>) -> Architecture {
        Architecture::Gemma3(Gemma3Layout {
            sliding_window: 512,
            full_attention_layers: full,
            rope_local_theta: 10_000.0,
            query_pre_attn_scalar: 256.0,
        })
    }

    #[test]
    fn gemma3_270m_interleaving_is_every_sixth_layer() {
        assert_eq!(Gemma3Layout::every_nth_full(18, 6), vec![5, 11, 17]);
    }

    #[test]
    fn refuses_layers_out_of_range_or_repeated_and_bad_numbers() {
        assert!(gemma(vec![5, 11, 17]).validate(18).is_ok());
        let err = gemma(vec![18]).validate(18).unwrap_err().to_string();
        assert!(
            err.contains("full_attention_layers") && err.contains("18"),
            "{err}"
        );
        let err = gemma(vec![5, 5]).validate(18).unwrap_err().to_string();
        assert!(err.contains("twice"), "{err}");
        let mut g = gemma(vec![]);
        if let Architecture::Gemma3(l) = &mut g {
            l.sliding_window = 0;
        }
        assert!(
            g.validate(2)
                .unwrap_err()
                .to_string()
                .contains("sliding_window")
        );
        let mut g = gemma(vec![]);
        if let Architecture::Gemma3(l) = &mut g {
            l.query_pre_attn_scalar = f32::NAN;
        }
        assert!(
            g.validate(2)
                .unwrap_err()
                .to_string()
                .contains("query_pre_attn_scalar")
        );
    }

    #[test]
    fn reads_from_a_plan_table_and_refuses_unknown_families() {
        #[derive(Deserialize)]
        struct M {
            architecture: Architecture,
        }
        let m: M = toml::from_str(
            "[architecture]\nfamily = \"gemma3\"\nsliding_window = 512\nfull_attention_layers = [5]\nrope_local_theta = 10000.0\nquery_pre_attn_scalar = 256.0\n",
        )
        .unwrap();
        assert_eq!(m.architecture.family(), "gemma3");
        let err = toml::from_str::<M>("[architecture]\nfamily = \"gpt2\"\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("gpt2"), "{err}");
    }
}
