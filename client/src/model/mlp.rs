//! The SwiGLU feed-forward block of Llama: `down(silu(gate(x)) ⊙ up(x))`.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::lora_linear::LoraLinear;

#[derive(Module, Debug)]
pub struct Mlp {
    pub(crate) gate_proj: LoraLinear,
    pub(crate) up_proj: LoraLinear,
    pub(crate) down_proj: LoraLinear,
}

impl Mlp {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = silu(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}
