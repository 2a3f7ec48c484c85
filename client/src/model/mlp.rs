//! The gated feed-forward block: `down(act(gate(x)) ⊙ up(x))`, with SiLU (Llama's SwiGLU) or
//! the tanh approximation of GELU (Gemma's GeGLU, `gelu_pytorch_tanh`).

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::activation::silu;

use super::lora_linear::LoraLinear;

#[derive(Module, Debug)]
pub struct Mlp {
    pub(crate) gate_proj: LoraLinear,
    pub(crate) up_proj: LoraLinear,
    pub(crate) down_proj: LoraLinear,
    /// GeGLU (tanh GELU) instead of SwiGLU.
    #[module(skip)]
    pub(crate) gelu_tanh: bool,
}

impl Mlp {
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let gate = self.gate_proj.forward(x.clone());
        let gate = if self.gelu_tanh {
            gelu_tanh(gate)
        } else {
            silu(gate)
        };
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, PyTorch's `gelu(approximate="tanh")`.
///
/// Written out rather than burn's `gelu_approximate`, which cubes with `powf_scalar(3.0)`: a
/// float power of a negative base is NaN in WGSL, so the wgpu path would lose every negative
/// pre-activation.
pub(crate) fn gelu_tanh<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    const SQRT_2_OVER_PI: f64 =
        core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2;
    let cube = x.clone() * x.clone() * x.clone();
    let inner = (x.clone() + cube * 0.044715) * SQRT_2_OVER_PI;
    x * (inner.tanh() + 1.0) * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData};

    #[test]
    fn gelu_tanh_matches_the_formula_on_both_signs() {
        let xs = [-4.0f32, -1.5, -0.3, 0.0, 0.7, 2.0, 5.0];
        let device = Device::flex();
        let t = Tensor::<1>::from_data(TensorData::new(xs.to_vec(), [xs.len()]), &device);
        let got = gelu_tanh(t).into_data().try_into_vec_as::<f32>().unwrap();
        for (x, g) in xs.iter().zip(got) {
            let x = *x as f64;
            let want = 0.5
                * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
            assert!(
                (g as f64 - want).abs() < 1e-6,
                "gelu_tanh({x}) = {g}, want {want}"
            );
        }
    }
}
