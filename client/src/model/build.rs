//! Assembling a [`LoraLlama`]: base weights from a pretrained checkpoint
//! ([`LoraLlama::from_checkpoint`]) or drawn from `ModelSpec::init_seed`
//! ([`LoraLlama::new`]), and LoRA A and B from fedcore's FFA initialisation (so A is
//! bit-identical to the aggregator's).
//!
//! Init scales of the random base keep it numerically sane: every linear weight has standard
//! deviation `1/√fan_in` (unit-variance outputs), the residual-branch outputs (`o_proj`,
//! `down_proj`) are further scaled by `1/√(2·layers)` so the residual stream does not grow
//! with depth, untied embeddings have unit variance (pre-norm makes their scale irrelevant
//! to the blocks), a tied embedding takes the output projection's `1/√hidden` so initial
//! logits stay O(1), and biases and norms start at 0 and 1.
//!
//! Checkpoint tensors are read one at a time from the [`WeightSource`], checked against the
//! shape the configuration implies (the error names the tensor), uploaded, and dropped.

use burn::module::Param;
use burn::nn::RmsNorm;
use burn::tensor::{Device, TensorData};
use fedcore::{LoraAdapter, LoraSpec, ModelSpec, TargetModule};

use super::attention::{Attention, QkNorms};
use super::decoder::{DecoderLayer, SandwichNorms};
use super::init::WeightInit;
use super::lora_linear::LoraLinear;
use super::mlp::Mlp;
use super::rope::RotaryEmbedding;
use super::{LocalAttention, LoraLlama, VocabEmbedding};
use crate::checkpoint::{Checkpoint, WeightSource};
use crate::error::CheckpointError;
use crate::error::ModelError;

impl LoraLlama {
    /// Builds the model with a seeded random base (`model.init_seed`) and the round-0 adapter
    /// (B = 0), so its output equals the base model's until B is trained or loaded.
    pub fn new(model: &ModelSpec, lora: &LoraSpec, device: &Device) -> Result<Self, ModelError> {
        Self::build(
            model,
            lora,
            BaseWeights::Seeded(WeightInit::new(model.init_seed)),
            device,
        )
    }

    /// Builds the model on a pretrained checkpoint's base weights, with the round-0 adapter.
    /// The architecture is the checkpoint's own (`checkpoint.spec`).
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        lora: &LoraSpec,
        device: &Device,
    ) -> Result<Self, ModelError> {
        Ok(Self::build(
            &checkpoint.spec,
            lora,
            BaseWeights::Checkpoint(checkpoint.weights.as_ref()),
            device,
        )?
        .with_window_prefix(checkpoint.document_prefix()))
    }

    /// Builds the model a federation plan describes: on `base` when the plan pins a
    /// pretrained checkpoint (`model.weights_sha256`), after checking that `base` is that
    /// checkpoint and has the plan's architecture; on the seeded random base otherwise.
    pub fn for_plan(
        model: &ModelSpec,
        lora: &LoraSpec,
        base: Option<&Checkpoint>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        match (&model.weights_sha256, base) {
            (Some(_), Some(checkpoint)) => {
                checkpoint.check_plan(model)?;
                Ok(Self::build(
                    model,
                    lora,
                    BaseWeights::Checkpoint(checkpoint.weights.as_ref()),
                    device,
                )?
                .with_window_prefix(checkpoint.document_prefix()))
            }
            (Some(hash), None) => Err(CheckpointError::Required {
                expected: hash.clone(),
            }
            .into()),
            (None, Some(checkpoint)) => Err(CheckpointError::NotPinned {
                path: checkpoint.path.display().to_string(),
            }
            .into()),
            (None, None) => Self::new(model, lora, device),
        }
    }

    /// Sets [`LoraLlama::window_prefix`].
    pub fn with_window_prefix(mut self, prefix: Option<u32>) -> Self {
        self.window_prefix = prefix;
        self
    }

    fn build(
        model: &ModelSpec,
        lora: &LoraSpec,
        base: BaseWeights<'_>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        model.validate()?;
        lora.validate()?;
        let adapter_config = lora.adapter_config(&model.name);
        let initial = LoraAdapter::init_ffa(
            adapter_config.clone(),
            &model.lora_modules(&lora.target_modules),
            lora.a_seed,
        );
        let builder = Builder {
            spec: model,
            lora,
            base,
            adapter: &initial,
            device,
        };

        let hidden = model.hidden_size;
        let embed_std = if model.tie_word_embeddings {
            1.0 / (hidden as f32).sqrt()
        } else {
            1.0
        };
        let embed = builder.matrix(
            "model.embed_tokens.weight",
            model.vocab_size,
            hidden,
            embed_std,
        )?;
        let embed_tokens = VocabEmbedding::frozen(embed, model.vocab_size, hidden, device);
        let layers = (0..model.num_hidden_layers)
            .map(|i| builder.layer(i))
            .collect::<Result<Vec<_>, _>>()?;
        let lm_head = if model.tie_word_embeddings {
            None
        } else {
            Some(builder.linear("lm_head", model.vocab_size, hidden, 1.0, false)?)
        };
        let gemma = model.architecture.gemma3();
        let local_attention = gemma.map(|g| LocalAttention {
            rope: RotaryEmbedding::new(
                model.head_dim(),
                model.max_position_embeddings,
                g.rope_local_theta,
                None,
                device,
            ),
            window: g.sliding_window,
            full_attention: (0..model.num_hidden_layers)
                .map(|i| g.is_full_attention(i))
                .collect(),
        });
        Ok(LoraLlama {
            embed_tokens,
            layers,
            norm: builder.norm("model.norm", hidden)?,
            lm_head,
            rope: RotaryEmbedding::new(
                model.head_dim(),
                model.max_position_embeddings,
                model.rope_theta,
                model.rope_scaling.as_ref(),
                device,
            ),
            local_attention,
            embed_scale: gemma.map(|_| (hidden as f32).sqrt()),
            window_prefix: None,
            spec: model.clone(),
            lora: lora.clone(),
            adapter_config,
        })
    }
}

/// Where the base weights come from.
enum BaseWeights<'a> {
    Seeded(WeightInit),
    Checkpoint(&'a dyn WeightSource),
}

fn frozen<const D: usize>(data: TensorData, device: &Device) -> Param<burn::tensor::Tensor<D>> {
    Param::from_data(data, device).set_require_grad(false)
}

struct Builder<'a> {
    spec: &'a ModelSpec,
    lora: &'a LoraSpec,
    base: BaseWeights<'a>,
    adapter: &'a LoraAdapter,
    device: &'a Device,
}

impl Builder<'_> {
    /// A row-major `[rows, cols]` base tensor: read from the checkpoint (shape checked) or
    /// drawn with standard deviation `std`.
    fn matrix(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        std: f32,
    ) -> Result<Vec<f32>, ModelError> {
        match &self.base {
            BaseWeights::Seeded(init) => Ok(init.uniform(name, rows, cols, std)),
            BaseWeights::Checkpoint(source) => {
                let t = source.tensor(name)?;
                t.expect_shape(name, &[rows, cols])?;
                Ok(t.data)
            }
        }
    }

    /// A `[len]` base vector: read from the checkpoint or filled with `fill`.
    fn vector(&self, name: &str, len: usize, fill: f32) -> Result<Vec<f32>, CheckpointError> {
        match &self.base {
            BaseWeights::Seeded(_) => Ok(vec![fill; len]),
            BaseWeights::Checkpoint(source) => {
                let t = source.tensor(name)?;
                t.expect_shape(name, &[len])?;
                Ok(t.data)
            }
        }
    }

    /// A frozen linear layer `[out, in]` named `{name}.weight` (std `gain/√in` when drawn),
    /// with `{name}.bias` when `bias`.
    fn linear(
        &self,
        name: &str,
        out_features: usize,
        in_features: usize,
        gain: f32,
        bias: bool,
    ) -> Result<LoraLinear, ModelError> {
        let std = gain / (in_features as f32).sqrt();
        let w = self.matrix(&format!("{name}.weight"), out_features, in_features, std)?;
        let linear = LoraLinear::frozen(&w, out_features, in_features, self.device);
        if !bias {
            return Ok(linear);
        }
        let b = self.vector(&format!("{name}.bias"), out_features, 0.0)?;
        Ok(linear.with_bias(b, self.device))
    }

    /// The layer's linear for `target`, with its LoRA branch when the plan adapts it.
    fn target(&self, layer: usize, target: TargetModule) -> Result<LoraLinear, ModelError> {
        let s = self.spec;
        let attn = s.num_attention_heads * s.head_dim();
        let kv = s.num_key_value_heads * s.head_dim();
        let residual_gain = 1.0 / (2.0 * s.num_hidden_layers as f32).sqrt();
        let (out_f, in_f, gain, bias) = match target {
            TargetModule::Q => (attn, s.hidden_size, 1.0, s.qkv_bias),
            TargetModule::K | TargetModule::V => (kv, s.hidden_size, 1.0, s.qkv_bias),
            TargetModule::O => (s.hidden_size, attn, residual_gain, s.o_bias),
            TargetModule::Gate | TargetModule::Up => {
                (s.intermediate_size, s.hidden_size, 1.0, s.mlp_bias)
            }
            TargetModule::Down => (
                s.hidden_size,
                s.intermediate_size,
                residual_gain,
                s.mlp_bias,
            ),
        };
        let name = format!("model.layers.{layer}.{}", target.path_suffix());
        let linear = self.linear(&name, out_f, in_f, gain, bias)?;
        if !self.lora.target_modules.contains(&target) {
            return Ok(linear);
        }
        let module = self
            .adapter
            .module(&name)
            .ok_or_else(|| ModelError::MissingModule(name.clone()))?;
        linear.with_lora(
            &name,
            module,
            self.lora.scaling(),
            f64::from(self.lora.dropout),
            self.device,
        )
    }

    /// An RMSNorm of width `len` named `{name}.weight`. Checkpoints of Gemma 3 store `w` for
    /// a norm that scales by `1 + w`; the one is added here, so the model runs a plain RMSNorm.
    fn norm(&self, name: &str, len: usize) -> Result<RmsNorm, ModelError> {
        let one_plus = self.spec.architecture.gemma3().is_some();
        let mut gamma = self.vector(
            &format!("{name}.weight"),
            len,
            if one_plus { 0.0 } else { 1.0 },
        )?;
        if one_plus {
            gamma.iter_mut().for_each(|w| *w += 1.0);
        }
        Ok(RmsNorm {
            gamma: frozen(TensorData::new(gamma, [len]), self.device),
            epsilon: self.spec.rms_norm_eps as f64,
        })
    }

    fn layer(&self, i: usize) -> Result<DecoderLayer, ModelError> {
        let s = self.spec;
        let hidden = s.hidden_size;
        let prefix = format!("model.layers.{i}");
        let mut self_attn = Attention::new(
            self.target(i, TargetModule::Q)?,
            self.target(i, TargetModule::K)?,
            self.target(i, TargetModule::V)?,
            self.target(i, TargetModule::O)?,
            s.num_attention_heads,
            s.num_key_value_heads,
            s.head_dim(),
        );
        let mut feedforward_norms = None;
        if let Some(g) = s.architecture.gemma3() {
            let qk_norms = QkNorms {
                q_norm: self.norm(&format!("{prefix}.self_attn.q_norm"), s.head_dim())?,
                k_norm: self.norm(&format!("{prefix}.self_attn.k_norm"), s.head_dim())?,
            };
            self_attn =
                self_attn.with_gemma(qk_norms, f64::from(g.query_pre_attn_scalar).powf(-0.5));
            feedforward_norms = Some(SandwichNorms {
                pre_feedforward_layernorm: self
                    .norm(&format!("{prefix}.pre_feedforward_layernorm"), hidden)?,
                post_feedforward_layernorm: self
                    .norm(&format!("{prefix}.post_feedforward_layernorm"), hidden)?,
            });
        }
        Ok(DecoderLayer {
            input_layernorm: self.norm(&format!("{prefix}.input_layernorm"), hidden)?,
            self_attn,
            post_attention_layernorm: self
                .norm(&format!("{prefix}.post_attention_layernorm"), hidden)?,
            feedforward_norms,
            mlp: Mlp {
                gate_proj: self.target(i, TargetModule::Gate)?,
                up_proj: self.target(i, TargetModule::Up)?,
                down_proj: self.target(i, TargetModule::Down)?,
                gelu_tanh: s.architecture.gemma3().is_some(),
            },
        })
    }
}
