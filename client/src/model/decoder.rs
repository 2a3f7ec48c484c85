//! One pre-norm Llama decoder layer:
//! `h = x + attn(norm₁(x))`, `out = h + mlp(norm₂(h))`.

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
    pub(crate) mlp: Mlp,
}

impl DecoderLayer {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(
        &self,
        x: Tensor<3>,
        rope: &RopeTables,
        segments: Option<&Tensor<4, Bool>>,
    ) -> Tensor<3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), rope, segments);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}
