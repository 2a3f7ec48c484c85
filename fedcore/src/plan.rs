//! The federation plan: which model, which LoRA layout, what local training a round asks for,
//! and how rounds are run. The aggregator owns it, every participant receives it on join.
//!
//! It lives in `fedcore` because both sides must agree on it bit for bit: the adapter layout
//! (and so the manifest hash every update is checked against) is derived from it.

use serde::{Deserialize, Serialize};

pub use crate::adapter::LoraSpec;
use crate::adapter::{AdapterConfig, LoraAdapter, ModuleShape, TargetModule};
use crate::architecture::Architecture;
use crate::error::ConfigError;
use crate::privacy::PrivacySpec;
use crate::privacy::distributed::{DdgEncoding, rotation_seed};
use crate::roster::{Roster, RosterEntry};
use crate::secagg::spec::{SecureAggregationSpec, UpdateEncoding};
use crate::strategy::{AggregationMode, GlobalModel, Strategy, StrategySpec};

/// Architecture of a decoder of the Llama family (Llama 2/3, Qwen2, Mistral, SmolLM2) or of
/// Gemma 3 (`architecture`), named as in Hugging Face `config.json`.
///
/// The base weights come from one of two places. With `weights_sha256` set, every lab loads a
/// pretrained checkpoint (Hugging Face safetensors or GGUF) whose fingerprint must equal it, so
/// that all labs fine-tune the same base; the architecture fields must then match the
/// checkpoint's own configuration. Without it, every participant draws the weights from
/// `init_seed` (identically on every backend): a randomly initialised model for tests and
/// for pilots without a checkpoint.
///
/// The fields added for real checkpoints (`head_dim`, the biases, `rope_scaling`,
/// `weights_sha256`) default to the plain Llama values, so older plans still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name recorded as `base_model_name_or_path` in PEFT adapters.
    pub name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Seed of the base weights every participant initialises identically (used only when
    /// `weights_sha256` is absent).
    pub init_seed: u64,
    /// Width of one attention head when the checkpoint states it (Mistral, Qwen3); otherwise
    /// `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` sets it with `qkv_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub o_bias: bool,
    /// Biases on gate, up and down projections (Llama's `mlp_bias`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub mlp_bias: bool,
    /// RoPE frequency scaling for long contexts (Llama 3.1+), if the checkpoint uses one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Fingerprint (lowercase hex SHA-256, see `fedclient::checkpoint`) of the pretrained base
    /// checkpoint every lab must load; `None` for a seeded random base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// The decoder family and what it adds (Gemma 3's norms, activation and interleaved
    /// attention); absent for Llama, so Llama plans keep their fingerprints.
    #[serde(default, skip_serializing_if = "Architecture::is_llama")]
    pub architecture: Architecture,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// RoPE frequency scaling, as in Hugging Face `rope_scaling`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase", deny_unknown_fields)]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling: wavelengths longer than
    /// `original_max_position_embeddings / low_freq_factor` are divided by `factor`, shorter
    /// than `original / high_freq_factor` are kept, and the band between is interpolated.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
}

impl RopeScaling {
    /// The scaled inverse frequency for one unscaled `inv_freq = theta^(-2i/d)`.
    pub fn scale(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::Linear { factor } => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let original = original_max_position_embeddings as f64;
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                if wavelen < high_freq_wavelen {
                    inv_freq
                } else if wavelen > low_freq_wavelen {
                    inv_freq / factor
                } else {
                    let smooth = (original / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::field(
                    &format!("model.rope_scaling.{field}"),
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        match *self {
            RopeScaling::Linear { factor } => positive("factor", factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("factor", factor)?;
                positive("low_freq_factor", low_freq_factor)?;
                positive("high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor {
                    return Err(ConfigError::field(
                        "model.rope_scaling.high_freq_factor",
                        format!(
                            "must be greater than low_freq_factor = {low_freq_factor}, got {high_freq_factor}"
                        ),
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err(ConfigError::field(
                        "model.rope_scaling.original_max_position_embeddings",
                        "must be at least 1",
                    ));
                }
                Ok(())
            }
        }
    }
}

impl ModelSpec {
    /// A tiny byte-level model that trains in seconds on two CPU cores.
    pub fn tiny() -> Self {
        ModelSpec {
            name: "mekong/tiny-llama-bytes".to_string(),
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 176,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            init_seed: 17,
            head_dim: None,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            weights_sha256: None,
            architecture: Architecture::Llama,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Checks that the numbers describe a buildable model; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.hidden_size", self.hidden_size),
            ("model.intermediate_size", self.intermediate_size),
            ("model.num_hidden_layers", self.num_hidden_layers),
            ("model.num_attention_heads", self.num_attention_heads),
            ("model.num_key_value_heads", self.num_key_value_heads),
            (
                "model.max_position_embeddings",
                self.max_position_embeddings,
            ),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(ConfigError::field(field, "must be at least 1"));
            }
        }
        match self.head_dim {
            Some(0) => return Err(ConfigError::field("model.head_dim", "must be at least 1")),
            Some(d) if d % 2 != 0 => {
                return Err(ConfigError::field(
                    "model.head_dim",
                    format!("{d} is odd; RoPE rotates pairs, so it must be even"),
                ));
            }
            Some(_) => {}
            None => {
                if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
                    return Err(ConfigError::field(
                        "model.hidden_size",
                        format!(
                            "{} is not divisible by num_attention_heads = {}",
                            self.hidden_size, self.num_attention_heads
                        ),
                    ));
                }
                if !self.head_dim().is_multiple_of(2) {
                    return Err(ConfigError::field(
                        "model.hidden_size",
                        "head dimension (hidden_size / num_attention_heads) must be even for RoPE",
                    ));
                }
            }
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        self.architecture.validate(self.num_hidden_layers)?;
        if let Some(hash) = &self.weights_sha256
            && !(hash.len() == 64
                && hash
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(ConfigError::field(
                "model.weights_sha256",
                format!("must be 64 lowercase hex digits (a SHA-256), got `{hash}`"),
            ));
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(ConfigError::field(
                "model.num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads = {}",
                    self.num_key_value_heads, self.num_attention_heads
                ),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(ConfigError::field(
                "model.rope_theta",
                "must be a positive number",
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(ConfigError::field(
                "model.rms_norm_eps",
                "must be a positive number",
            ));
        }
        Ok(())
    }

    /// Shapes of the linear layers LoRA adapts, in the model's order, named as in Hugging Face
    /// checkpoints (`model.layers.{i}.self_attn.q_proj`, `model.layers.{i}.mlp.down_proj`).
    pub fn lora_modules(&self, targets: &[TargetModule]) -> Vec<ModuleShape> {
        let attn_out = self.num_attention_heads * self.head_dim();
        let kv_out = self.num_key_value_heads * self.head_dim();
        let mut shapes = Vec::new();
        for layer in 0..self.num_hidden_layers {
            for target in TargetModule::ALL {
                if !targets.contains(&target) {
                    continue;
                }
                let (out_features, in_features) = match target {
                    TargetModule::Q => (attn_out, self.hidden_size),
                    TargetModule::K | TargetModule::V => (kv_out, self.hidden_size),
                    TargetModule::O => (self.hidden_size, attn_out),
                    TargetModule::Gate | TargetModule::Up => {
                        (self.intermediate_size, self.hidden_size)
                    }
                    TargetModule::Down => (self.hidden_size, self.intermediate_size),
                };
                shapes.push(ModuleShape {
                    name: format!("model.layers.{layer}.{}", target.path_suffix()),
                    out_features,
                    in_features,
                });
            }
        }
        shapes
    }
}

/// What one round of local training consists of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSpec {
    /// Optimizer steps each participant takes per round.
    pub local_steps: usize,
    pub batch_size: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    pub learning_rate: f64,
    pub weight_decay: f64,
    /// Base seed of batch sampling; each participant and round derive their own from it.
    pub seed: u64,
    /// Steps of linear warm-up from 0 to `learning_rate` at the start of each round's local
    /// training.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Learning rate after warm-up.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Floor of the cosine schedule as a fraction of `learning_rate`.
    #[serde(default)]
    pub min_lr_ratio: f64,
    /// Micro-batches of `batch_size` sequences whose gradients add up to one optimizer step.
    #[serde(default = "one")]
    pub grad_accumulation: usize,
    /// Clip the global L2 norm of the gradient (all trained tensors together, as PyTorch's
    /// `clip_grad_norm_`) to this value; absent = no clipping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f64>,
    /// The local optimizer (default AdamW). Left out of the JSON when it is the default, so
    /// plans written before the field existed keep their fingerprint.
    #[serde(default, skip_serializing_if = "LocalOptimizer::is_default")]
    pub optimizer: LocalOptimizer,
}

fn one() -> usize {
    1
}

/// The optimizer of local training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalOptimizer {
    /// AdamW (β = 0.9, 0.999, ε = 1e-8; PyTorch's defaults), fresh every round.
    #[default]
    AdamW,
    /// Plain SGD: `w ← w − lr·(∇ + weight_decay·w)`, no momentum. With one full-batch step
    /// per round and FFA-LoRA, federated training equals centralised training on the union
    /// of the data (`client/tests/federated_equals_centralised.rs`).
    Sgd,
}

impl LocalOptimizer {
    fn is_default(&self) -> bool {
        *self == LocalOptimizer::default()
    }
}

/// Learning rate after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    /// `learning_rate` throughout: the usual choice for short federated rounds.
    #[default]
    Constant,
    /// Half-cosine decay from `learning_rate` to `min_lr_ratio × learning_rate` over the
    /// steps after warm-up (Hugging Face's `get_cosine_schedule_with_warmup`).
    Cosine,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            local_steps: 20,
            batch_size: 8,
            seq_len: 64,
            learning_rate: 5e-3,
            weight_decay: 0.0,
            seed: 7,
            warmup_steps: 0,
            lr_schedule: LrSchedule::Constant,
            min_lr_ratio: 0.0,
            grad_accumulation: 1,
            max_grad_norm: None,
            optimizer: LocalOptimizer::AdamW,
        }
    }
}

impl TrainingSpec {
    /// The batch-sampling seed of one participant in one round: distinct per participant and
    /// round, reproducible from the plan.
    pub fn local_seed(&self, participant: &str, round: u64) -> u64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"mekong/local-seed/v1");
        h.update(self.seed.to_le_bytes());
        h.update((participant.len() as u64).to_le_bytes());
        h.update(participant.as_bytes());
        h.update(round.to_le_bytes());
        let d = h.finalize();
        u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
    }

    /// Checks the numbers; errors name the field.
    pub fn validate(&self, model: &ModelSpec) -> Result<(), ConfigError> {
        if self.local_steps == 0 {
            return Err(ConfigError::field(
                "training.local_steps",
                "must be at least 1",
            ));
        }
        if self.batch_size == 0 {
            return Err(ConfigError::field(
                "training.batch_size",
                "must be at least 1",
            ));
        }
        if self.seq_len < 2 {
            return Err(ConfigError::field("training.seq_len", "must be at least 2"));
        }
        if self.seq_len > model.max_position_embeddings {
            return Err(ConfigError::field(
                "training.seq_len",
                format!(
                    "{} exceeds model.max_position_embeddings = {}",
                    self.seq_len, model.max_position_embeddings
                ),
            ));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(ConfigError::field(
                "training.learning_rate",
                "must be a positive number",
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(ConfigError::field(
                "training.weight_decay",
                "must be zero or positive",
            ));
        }
        if self.warmup_steps >= self.local_steps && self.warmup_steps > 0 {
            return Err(ConfigError::field(
                "training.warmup_steps",
                format!(
                    "{} leaves no step after warm-up (local_steps = {})",
                    self.warmup_steps, self.local_steps
                ),
            ));
        }
        if !(self.min_lr_ratio.is_finite() && (0.0..=1.0).contains(&self.min_lr_ratio)) {
            return Err(ConfigError::field(
                "training.min_lr_ratio",
                format!("must be between 0 and 1, got {}", self.min_lr_ratio),
            ));
        }
        if self.grad_accumulation == 0 {
            return Err(ConfigError::field(
                "training.grad_accumulation",
                "must be at least 1",
            ));
        }
        if let Some(norm) = self.max_grad_norm
            && !(norm.is_finite() && norm > 0.0)
        {
            return Err(ConfigError::field(
                "training.max_grad_norm",
                format!("must be a positive number, got {norm}"),
            ));
        }
        Ok(())
    }
}

/// How rounds are run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundSpec {
    /// Number of rounds in the run.
    pub rounds: u64,
    /// Participants that must join before the first round starts; also the number of
    /// updates after which a round closes early.
    pub participants: usize,
    /// Fewest updates a round may be aggregated from once its deadline passes.
    pub min_updates: usize,
    /// How long a round waits for updates, in milliseconds; participants that have not
    /// submitted by then are treated as dropped for that round.
    pub round_timeout_ms: u64,
}

impl Default for RoundSpec {
    fn default() -> Self {
        RoundSpec {
            rounds: 3,
            participants: 3,
            min_updates: 2,
            round_timeout_ms: 600_000,
        }
    }
}

impl RoundSpec {
    /// Checks the numbers; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rounds == 0 {
            return Err(ConfigError::field("rounds.rounds", "must be at least 1"));
        }
        if self.participants == 0 {
            return Err(ConfigError::field(
                "rounds.participants",
                "must be at least 1",
            ));
        }
        if self.min_updates == 0 {
            return Err(ConfigError::field(
                "rounds.min_updates",
                "must be at least 1",
            ));
        }
        if self.min_updates > self.participants {
            return Err(ConfigError::field(
                "rounds.min_updates",
                format!(
                    "{} exceeds rounds.participants = {}",
                    self.min_updates, self.participants
                ),
            ));
        }
        if self.round_timeout_ms == 0 {
            return Err(ConfigError::field(
                "rounds.round_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Everything both sides must agree on for a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationPlan {
    /// Human-readable name of the run, shown to participants.
    pub federation: String,
    pub model: ModelSpec,
    #[serde(default)]
    pub lora: LoraSpec,
    #[serde(default)]
    pub training: TrainingSpec,
    #[serde(default)]
    pub rounds: RoundSpec,
    /// The labs allowed to join, with their identity keys. Required (at least three) when
    /// secure aggregation is on; when it is off and the roster is empty, any name may join.
    #[serde(default)]
    pub roster: Vec<RosterEntry>,
    #[serde(default)]
    pub secure_aggregation: SecureAggregationSpec,
    /// `[strategy]`: aggregation mode, server optimizer, participant sampling, FedProx.
    /// Absent = FFA-LoRA with plain FedAvg over every joined participant, and left out of
    /// the JSON when it is the default, so older plans keep their fingerprint.
    #[serde(default, skip_serializing_if = "StrategySpec::is_default")]
    pub strategy: StrategySpec,
    /// `[privacy]`: differential-privacy noise in every sum the center unmasks. Absent =
    /// off, and left out of the JSON then, so older plans keep their fingerprint.
    #[serde(default, skip_serializing_if = "PrivacySpec::is_default")]
    pub privacy: PrivacySpec,
}

impl FederationPlan {
    /// Validates every section; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.federation.trim().is_empty() {
            return Err(ConfigError::field("federation", "must not be empty"));
        }
        self.model.validate()?;
        self.lora.validate()?;
        self.training.validate(&self.model)?;
        self.rounds.validate()?;
        let roster = Roster::new(&self.roster)?;
        self.secure_aggregation.validate(roster.len())?;
        self.privacy.validate(
            &self.secure_aggregation,
            roster.len(),
            self.strategy.mode,
            &self.training,
        )?;
        if self.privacy.enabled() {
            // The coarsest grid any upload gets (one value): refused here rather than when
            // a round opens.
            self.update_encoding(1, 1)?;
        }
        if !roster.is_empty() && self.rounds.participants > roster.len() {
            return Err(ConfigError::field(
                "rounds.participants",
                format!(
                    "{} labs must join, but the roster lists only {}",
                    self.rounds.participants,
                    roster.len()
                ),
            ));
        }
        self.strategy.validate_for_plan(self)?;
        if self.strategy.mode == AggregationMode::Flora {
            return Err(ConfigError::field(
                "strategy.mode",
                "`flora` needs every participant's update on its own (it stacks them), which \
                 the aggregator's coordinator, built on the weighted sum, does not collect; \
                 choose ffa_lora, fedsvd, fedit, hetlora, fedsa_lora, rolora or fedex_lora",
            ));
        }
        if self.secure_aggregation.enabled {
            let cohort = self.strategy.sampling.cohort_size(self.rounds.participants);
            let threshold = self.secure_aggregation.threshold_for(roster.len());
            if cohort < threshold {
                return Err(ConfigError::field(
                    "strategy.sampling",
                    format!(
                        "samples {cohort} of rounds.participants = {} per round, fewer than \
                         the secure-aggregation threshold {threshold}: no round could unmask",
                        self.rounds.participants
                    ),
                ));
            }
        }
        Ok(())
    }

    /// How round `round`'s secure uploads of `len` values are encoded: with the plan's
    /// differential-privacy noise when `[privacy]` is on (the noise calibrated to the
    /// fewest labs a sum can hold, the threshold, less the colluders tolerated), else
    /// fixed-point and sample-weighted. Lab and center derive it the same way.
    pub fn update_encoding(&self, len: usize, round: u64) -> Result<UpdateEncoding, ConfigError> {
        let secure = &self.secure_aggregation;
        if !self.privacy.enabled() {
            return Ok(UpdateEncoding::Weighted(secure.encoding(len)?));
        }
        let members = self.roster()?.len();
        let floor = self
            .privacy
            .honest_in(secure, secure.threshold_for(members));
        let encoding = DdgEncoding::new(
            &self.privacy,
            len,
            floor,
            secure.max_colluding,
            members,
            rotation_seed(&self.fingerprint(), round),
        )?;
        Ok(UpdateEncoding::Private(Box::new(encoding)))
    }

    /// The validated roster (empty when none is configured).
    pub fn roster(&self) -> Result<Roster, ConfigError> {
        Roster::new(&self.roster)
    }

    /// Hex SHA-256 of the plan's JSON form: what labs pin (`fedclient join --plan-sha256`) so
    /// an aggregator cannot change the roster, threshold or anything else behind their back.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(self.to_json().as_bytes()))
    }

    /// Shapes of the adapted modules this plan implies.
    pub fn lora_modules(&self) -> Vec<ModuleShape> {
        self.model.lora_modules(&self.lora.target_modules)
    }

    /// The PEFT metadata of this plan's adapters.
    pub fn adapter_config(&self) -> AdapterConfig {
        self.lora.adapter_config(&self.model.name)
    }

    /// The round-0 global adapter: FFA-LoRA's A from the shared seed, B zero.
    pub fn initial_adapter(&self) -> LoraAdapter {
        LoraAdapter::init_ffa(
            self.adapter_config(),
            &self.lora_modules(),
            self.lora.a_seed,
        )
    }

    /// The round-0 global model: [`Self::initial_adapter`], with a zero dense correction per
    /// adapted module under FedEx-LoRA (whose global model carries them every round).
    /// Under `group_b` with secure aggregation: each roster index's group and the fewest
    /// survivors a group may have in a sum ([`crate::secagg::protocol::SurvivorGroups`]).
    pub fn survivor_groups(&self) -> Option<crate::secagg::protocol::SurvivorGroups> {
        let groups = match (self.strategy.mode, &self.strategy.groups) {
            (AggregationMode::GroupB, Some(g)) => g,
            _ => return None,
        };
        let group_of = self
            .roster
            .iter()
            .enumerate()
            .filter_map(|(i, e)| {
                groups
                    .group_of(&e.name)
                    .map(|g| ((i + 1) as crate::secagg::messages::Index, g.to_string()))
            })
            .collect();
        Some(crate::secagg::protocol::SurvivorGroups {
            group_of,
            min: groups.min_labs,
        })
    }

    pub fn initial_model(&self) -> GlobalModel {
        let adapter = self.initial_adapter();
        match (self.strategy.mode, &self.strategy.groups) {
            (AggregationMode::FedExLora, _) => GlobalModel::with_zero_corrections(adapter),
            (AggregationMode::GroupB, Some(groups)) => {
                GlobalModel::with_groups(adapter, &groups.groups())
            }
            _ => GlobalModel::new(adapter),
        }
    }

    /// Encodes the plan as JSON, the form it travels in on the wire.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a plan always serialises")
    }

    /// Decodes and validates a plan received from the aggregator.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let plan: FederationPlan =
            serde_json::from_str(json).map_err(|e| ConfigError::Parse(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }
}

// The strategy knows nothing of plans (fedcore's modules depend one way: plan -> strategy);
// what ties a strategy to a plan's LoRA layout, modules, roster and secure-aggregation
// switch is here.
impl StrategySpec {
    /// [`Self::validate`] against a plan's LoRA layout, modules and secure-aggregation switch.
    pub fn validate_for_plan(&self, plan: &FederationPlan) -> Result<(), ConfigError> {
        self.validate(
            &plan.lora,
            &plan.lora_modules(),
            plan.secure_aggregation.enabled,
        )?;
        if let (Some(groups), AggregationMode::GroupB) = (&self.groups, self.mode) {
            let secure = &plan.secure_aggregation;
            groups.validate(secure.enabled.then_some(secure.max_colluding))?;
            groups.check_roster(plan.roster.iter().map(|e| e.name.as_str()))?;
        }
        Ok(())
    }
}

impl Strategy {
    /// [`Self::new`] for a plan's LoRA layout, modules and secure-aggregation switch.
    pub fn for_plan(spec: StrategySpec, plan: &FederationPlan) -> Result<Self, ConfigError> {
        Strategy::new(
            spec,
            &plan.lora,
            &plan.lora_modules(),
            plan.secure_aggregation.enabled,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FederationPlan {
        FederationPlan {
            privacy: Default::default(),
            federation: "test".into(),
            model: ModelSpec::tiny(),
            lora: LoraSpec::default(),
            training: TrainingSpec::default(),
            rounds: RoundSpec::default(),
            roster: Vec::new(),
            secure_aggregation: SecureAggregationSpec {
                enabled: false,
                ..Default::default()
            },
            strategy: StrategySpec::default(),
        }
    }

    fn roster(n: u8) -> Vec<RosterEntry> {
        (1..=n)
            .map(|i| RosterEntry {
                name: format!("lab{i}"),
                public_key: hex::encode(
                    crate::secagg::crypto::Identity::from_seed([i; 32]).public(),
                ),
            })
            .collect()
    }

    #[test]
    fn secure_aggregation_is_on_by_default_and_needs_a_roster() {
        let json = plan().to_json().replace(
            r#""secure_aggregation":{"enabled":false"#,
            r#""secure_aggregation":{"enabled":true"#,
        );
        let err = FederationPlan::from_json(&json).unwrap_err().to_string();
        assert!(
            err.contains("`roster`") && err.contains("fedclient keygen"),
            "{err}"
        );
        let mut p = plan();
        p.secure_aggregation = SecureAggregationSpec::default();
        p.roster = roster(3);
        p.validate().unwrap();
        let back = FederationPlan::from_json(&p.to_json()).unwrap();
        assert!(back.secure_aggregation.enabled);
        assert_eq!(back.fingerprint(), p.fingerprint());
        p.rounds.participants = 4;
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("rounds.participants"), "{err}");
        // A plan without the section at all defaults to secure aggregation.
        let bare = r#"{"federation":"x","model":MODEL}"#
            .replace("MODEL", &serde_json::to_string(&ModelSpec::tiny()).unwrap());
        let err = FederationPlan::from_json(&bare).unwrap_err().to_string();
        assert!(err.contains("roster"), "{err}");
    }

    #[test]
    fn strategy_defaults_to_ffa_lora_and_is_pinned_by_the_fingerprint() {
        let p = plan();
        // The default section is left out, so plans from before it keep their fingerprint.
        assert!(!p.to_json().contains("strategy"), "{}", p.to_json());
        assert!(!p.to_json().contains("optimizer"), "{}", p.to_json());
        let mut q = p.clone();
        q.strategy.mode = AggregationMode::RoLora;
        q.strategy.fedprox.mu = 0.01;
        q.training.optimizer = LocalOptimizer::Sgd;
        q.validate().unwrap();
        assert_ne!(q.fingerprint(), p.fingerprint());
        assert_eq!(FederationPlan::from_json(&q.to_json()).unwrap(), q);
        // Errors name the field.
        q.strategy.mode = AggregationMode::HetLora;
        let err = q.validate().unwrap_err().to_string();
        assert!(err.contains("strategy.hetlora"), "{err}");
        // FedEx-LoRA runs (plain averaging, the default optimizer); FLoRA is refused.
        q.strategy.mode = AggregationMode::FedExLora;
        q.strategy.fedprox.mu = 0.0;
        q.validate().unwrap();
        assert!(q.initial_model().has_corrections());
        assert!(!p.initial_model().has_corrections());
        q.strategy.mode = AggregationMode::Flora;
        let err = q.validate().unwrap_err().to_string();
        assert!(
            err.contains("strategy.mode") && err.contains("flora"),
            "{err}"
        );
        q.strategy.mode = AggregationMode::FfaLora;
        q.strategy.sampling.fraction = 1.5;
        let err = q.validate().unwrap_err().to_string();
        assert!(err.contains("strategy.sampling.fraction"), "{err}");
        // With secure aggregation a mode that is not sum-only is refused, naming both.
        let mut s = plan();
        s.secure_aggregation = SecureAggregationSpec::default();
        s.roster = roster(3);
        s.strategy.mode = AggregationMode::Flora;
        let err = s.validate().unwrap_err().to_string();
        assert!(
            err.contains("strategy.mode") && err.contains("secure_aggregation.enabled"),
            "{err}"
        );
        // ... and so is a sample below the secure threshold.
        s.strategy.mode = AggregationMode::FfaLora;
        s.strategy.sampling.fraction = 0.3;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("strategy.sampling"), "{err}");
    }

    #[test]
    fn tiny_plan_is_valid_and_round_trips_through_json() {
        let p = plan();
        p.validate().unwrap();
        assert_eq!(FederationPlan::from_json(&p.to_json()).unwrap(), p);
    }

    #[test]
    fn lora_modules_follow_hf_names_and_shapes() {
        let mut p = plan();
        p.lora.target_modules = vec![TargetModule::Q, TargetModule::V, TargetModule::Down];
        let m = p.lora_modules();
        assert_eq!(m.len(), 3 * p.model.num_hidden_layers);
        assert_eq!(m[0].name, "model.layers.0.self_attn.q_proj");
        assert_eq!((m[0].out_features, m[0].in_features), (64, 64));
        assert_eq!(m[1].name, "model.layers.0.self_attn.v_proj");
        assert_eq!((m[1].out_features, m[1].in_features), (32, 64));
        assert_eq!(m[2].name, "model.layers.0.mlp.down_proj");
        assert_eq!((m[2].out_features, m[2].in_features), (64, 176));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut p = plan();
        p.model.num_key_value_heads = 3;
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("model.num_key_value_heads")
        );
        let mut p = plan();
        p.rounds.min_updates = 9;
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("rounds.min_updates")
        );
        let mut p = plan();
        p.training.seq_len = 4096;
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("training.seq_len")
        );
        let mut p = plan();
        p.lora.target_modules.clear();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("lora.target_modules")
        );
    }
}
