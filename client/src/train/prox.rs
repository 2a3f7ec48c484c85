//! FedProx's proximal term on the device (Li et al., arXiv 1812.06127; the formula lives in
//! `fedcore::strategy::prox`): each local step's gradient gains `μ·(w − w_t)` for every
//! trained tensor, `w_t` being its value when the round's training started (the downloaded
//! adapter). Parameters without gradients (the base, and a factor the round does not train)
//! are left alone.

use std::collections::HashMap;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use crate::error::ModelError;

/// The trained tensors' values at the start of local training, on the host.
pub struct Reference {
    values: HashMap<ParamId, TensorData>,
}

struct Capture {
    values: HashMap<ParamId, TensorData>,
    error: Option<ModelError>,
}

impl ModuleVisitor for Capture {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() || self.error.is_some() {
            return;
        }
        match value.inner().try_into_data() {
            Ok(data) => {
                self.values.insert(param.id, data);
            }
            Err(e) => self.error = Some(ModelError::backend("reading a FedProx reference", e)),
        }
    }
}

struct AddGradient<'a> {
    reference: &'a HashMap<ParamId, TensorData>,
    grads: &'a mut GradientsParams,
    mu: f32,
}

impl ModuleVisitor for AddGradient<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(start) = self.reference.get(&param.id) else {
            return;
        };
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            let w = param.val().inner();
            let w_t = Tensor::<D>::from_data(start.clone(), &grad.device());
            self.grads
                .register::<D>(param.id, grad + (w - w_t).mul_scalar(self.mu));
        }
    }
}

impl Reference {
    /// Records the values of every parameter of `module` that requires a gradient.
    pub fn capture<M: Module>(module: &M) -> Result<Self, ModelError> {
        let mut visitor = Capture {
            values: HashMap::new(),
            error: None,
        };
        module.visit(&mut visitor);
        match visitor.error {
            Some(e) => Err(e),
            None => Ok(Reference {
                values: visitor.values,
            }),
        }
    }

    /// Adds `μ·(w − w_t)` to the gradient of every recorded parameter.
    pub fn add_gradient<M: Module>(&self, module: &M, grads: &mut GradientsParams, mu: f64) {
        let mut visitor = AddGradient {
            reference: &self.values,
            grads,
            mu: mu as f32,
        };
        module.visit(&mut visitor);
    }
}
