//! Global gradient-norm clipping: every trained tensor's gradient scaled by one factor so
//! that their joint L2 norm is at most `max_norm` (PyTorch's `clip_grad_norm_`).
//!
//! burn's own `GradientClipping::Norm` clips each tensor by its own norm, which changes the
//! direction of the update and does not match what LoRA recipes from PyTorch assume.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use crate::error::ModelError;

/// Sums the squared gradient entries of every parameter that has one.
struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    total: Option<Tensor<1>>,
}

impl ModuleVisitor for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let sq = grad.square().sum();
            self.total = Some(match self.total.take() {
                Some(acc) => acc + sq,
                None => sq,
            });
        }
    }
}

/// Multiplies every gradient by `factor`.
struct Scale<'a> {
    grads: &'a mut GradientsParams,
    factor: f32,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads
                .register::<D>(param.id, grad.mul_scalar(self.factor));
        }
    }
}

/// Multiplies the gradient of every parameter of `module` by `factor`.
pub fn scale<M: Module>(module: &M, grads: &mut GradientsParams, factor: f32) {
    let mut visitor = Scale { grads, factor };
    module.visit(&mut visitor);
}

/// The global L2 norm of `grads` over `module`'s parameters (0 when none has a gradient).
pub fn global_norm<M: Module>(module: &M, grads: &GradientsParams) -> Result<f64, ModelError> {
    let mut visitor = SquaredNorm { grads, total: None };
    module.visit(&mut visitor);
    let Some(total) = visitor.total else {
        return Ok(0.0);
    };
    let sq: f32 = total
        .try_into_scalar()
        .map_err(|e| ModelError::backend("reading the gradient norm", e))?;
    Ok(f64::from(sq).sqrt())
}

/// Clips `grads` to a global norm of `max_norm`; returns the norm before clipping.
pub fn clip_global_norm<M: Module>(
    module: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> Result<f64, ModelError> {
    let norm = global_norm(module, grads)?;
    // PyTorch: coef = max_norm / (norm + 1e-6), applied only when below 1.
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        scale(module, grads, coef as f32);
    }
    Ok(norm)
}
