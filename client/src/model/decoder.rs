//! One pre-norm decoder layer.
//!
//! Llama: `h = x + attn(norm₁(x))`, `out = h + mlp(norm₂(h))`, where `norm₂` is what Hugging
//! Face calls `post_attention_layernorm`.
//! Gemma 3 ("sandwich" norms): `h = x + post_attention_layernorm(attn(input_layernorm(x)))`,
//! `out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))`. The same HF name
//! `post_attention_layernorm` is the MLP's input norm in Llama and the attention's output norm
//! in Gemma 3; fields keep HF's names so checkpoint tensors map one to one.

use burn::module::Module;
use burn::nn::RmsNorm;
use burn::tensor::{Bool, Tensor};

use super::attention::Attention;
use super::mlp::Mlp;
use super::rope::RopeTables;

#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub(crate) input_layernorm: RmsNorm,
    pub(crate) self_attn: Attention,
    pub(crate) post_attention_layernorm: RmsNorm,
    /// Gemma 3's norms around the MLP (both present or both absent).
    pub(crate) feedforward_norms: Option<SandwichNorms>,
    pub(crate) mlp: Mlp,
}

/// The MLP's input and output norms of a Gemma 3 layer.
#[derive(Module, Debug)]
pub struct SandwichNorms {
    pub(crate) pre_feedforward_layernorm: RmsNorm,
    pub(crate) post_feedforward_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`. `mask`, when given, is `[batch or 1,
    /// 1, seq, seq]`, true where a query may not attend to a key (on top of causality).
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        mask: Option<&Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let attn = self
            .self_attn
            .forward(self.input_layernorm.forward(x.clone()), rope, mask);
        match &self.feedforward_norms {
            None => {
                let h = x + attn;
                h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
            }
            Some(norms) => {
                let h = x + self.post_attention_layernorm.forward(attn);
                let mlp = self
                    .mlp
                    .forward(norms.pre_feedforward_layernorm.forward(h.clone()));
                h + norms.post_feedforward_layernorm.forward(mlp)
            }
        }
    }
}
