//! Assembling a [`LoraLlama`] from a plan: base weights from `ModelSpec::init_seed`, LoRA A and
//! B from fedcore's FFA initialisation (so A is bit-identical to the aggregator's).
//!
//! Init scales keep the random model numerically sane: every linear weight has standard
//! deviation `1/√fan_in` (unit-variance outputs), the residual-branch outputs (`o_proj`,
//! `down_proj`) are further scaled by `1/√(2·layers)` so the residual stream does not grow
//! with depth, untied embeddings have unit variance (pre-norm makes their scale irrelevant
//! to the blocks) and a tied embedding takes the output projection's `1/√hidden` so initial
//! logits stay O(1).

use burn::module::Param;
use burn::nn::{Embedding, RmsNorm};
use burn::tensor::{Device, TensorData};
use fedcore::{AdapterConfig, LoraAdapter, LoraSpec, ModelSpec, TargetModule};

use super::LoraLlama;
use super::attention::Attention;
use super::decoder::DecoderLayer;
use super::init::WeightInit;
use super::lora_linear::LoraLinear;
use super::mlp::Mlp;
use super::rope::RotaryEmbedding;
use crate::error::ModelError;

impl LoraLlama {
    /// Builds the model on `device` with the round-0 adapter (B = 0), so its output equals the
    /// base model's until B is trained or loaded.
    pub fn new(model: &ModelSpec, lora: &LoraSpec, device: &Device) -> Result<Self, ModelError> {
        model.validate()?;
        lora.validate()?;
        let adapter_config = AdapterConfig {
            rank: lora.rank,
            alpha: lora.alpha,
            target_modules: lora.target_modules.clone(),
            base_model: model.name.clone(),
            dropout: lora.dropout,
        };
        let initial = LoraAdapter::init_ffa(
            adapter_config.clone(),
            &model.lora_modules(&lora.target_modules),
            lora.a_seed,
        );
        let builder = Builder {
            spec: model,
            lora,
            init: WeightInit::new(model.init_seed),
            adapter: &initial,
            device,
        };

        let hidden = model.hidden_size;
        let embed_std = if model.tie_word_embeddings {
            1.0 / (hidden as f32).sqrt()
        } else {
            1.0
        };
        let embed = builder.init.uniform(
            "model.embed_tokens.weight",
            model.vocab_size,
            hidden,
            embed_std,
        );
        let embed_tokens = Embedding {
            weight: frozen(TensorData::new(embed, [model.vocab_size, hidden]), device),
        };
        let layers = (0..model.num_hidden_layers)
            .map(|i| builder.layer(i))
            .collect::<Result<Vec<_>, _>>()?;
        let lm_head = if model.tie_word_embeddings {
            None
        } else {
            Some(builder.linear("lm_head", model.vocab_size, hidden, 1.0))
        };
        Ok(LoraLlama {
            embed_tokens,
            layers,
            norm: builder.norm(),
            lm_head,
            rope: RotaryEmbedding::new(
                model.head_dim(),
                model.max_position_embeddings,
                model.rope_theta,
                device,
            ),
            spec: model.clone(),
            lora: lora.clone(),
            adapter_config,
        })
    }
}

fn frozen<const D: usize>(data: TensorData, device: &Device) -> Param<burn::tensor::Tensor<D>> {
    Param::from_data(data, device).set_require_grad(false)
}

struct Builder<'a> {
    spec: &'a ModelSpec,
    lora: &'a LoraSpec,
    init: WeightInit,
    adapter: &'a LoraAdapter,
    device: &'a Device,
}

impl Builder<'_> {
    /// A frozen linear layer `[out, in]` named `{name}.weight`, std `gain/√in`.
    fn linear(&self, name: &str, out_features: usize, in_features: usize, gain: f32) -> LoraLinear {
        let std = gain / (in_features as f32).sqrt();
        let w = self
            .init
            .uniform(&format!("{name}.weight"), out_features, in_features, std);
        LoraLinear::frozen(&w, out_features, in_features, self.device)
    }

    /// The layer's linear for `target`, with its LoRA branch when the plan adapts it.
    fn target(&self, layer: usize, target: TargetModule) -> Result<LoraLinear, ModelError> {
        let s = self.spec;
        let attn = s.num_attention_heads * s.head_dim();
        let kv = s.num_key_value_heads * s.head_dim();
        let residual_gain = 1.0 / (2.0 * s.num_hidden_layers as f32).sqrt();
        let (out_f, in_f, gain) = match target {
            TargetModule::Q => (attn, s.hidden_size, 1.0),
            TargetModule::K | TargetModule::V => (kv, s.hidden_size, 1.0),
            TargetModule::O => (s.hidden_size, attn, residual_gain),
            TargetModule::Gate | TargetModule::Up => (s.intermediate_size, s.hidden_size, 1.0),
            TargetModule::Down => (s.hidden_size, s.intermediate_size, residual_gain),
        };
        let name = format!("model.layers.{layer}.{}", target.path_suffix());
        let linear = self.linear(&name, out_f, in_f, gain);
        if !self.lora.target_modules.contains(&target) {
            return Ok(linear);
        }
        let module = self
            .adapter
            .module(&name)
            .ok_or_else(|| ModelError::MissingModule(name.clone()))?;
        linear.with_lora(&name, module, self.lora.scaling(), self.device)
    }

    fn norm(&self) -> RmsNorm {
        let ones = TensorData::ones::<f32, _>([self.spec.hidden_size]);
        RmsNorm {
            gamma: frozen(ones, self.device),
            epsilon: self.spec.rms_norm_eps as f64,
        }
    }

    fn layer(&self, i: usize) -> Result<DecoderLayer, ModelError> {
        let s = self.spec;
        Ok(DecoderLayer {
            input_layernorm: self.norm(),
            self_attn: Attention::new(
                self.target(i, TargetModule::Q)?,
                self.target(i, TargetModule::K)?,
                self.target(i, TargetModule::V)?,
                self.target(i, TargetModule::O)?,
                s.num_attention_heads,
                s.num_key_value_heads,
                s.head_dim(),
            ),
            post_attention_layernorm: self.norm(),
            mlp: Mlp {
                gate_proj: self.target(i, TargetModule::Gate)?,
                up_proj: self.target(i, TargetModule::Up)?,
                down_proj: self.target(i, TargetModule::Down)?,
            },
        })
    }
}
