//! A linear layer with an optional frozen bias and an optional LoRA branch:
//! `y = x·(W + D)ᵀ + b + (alpha/r)·(x·Aᵀ)·Bᵀ`, with W, D and b always frozen. D is
//! FedEx-LoRA's dense correction merged into the base weight by the server (absent
//! otherwise); it is kept apart from W, so that each round's correction replaces the last
//! one exactly instead of piling f32 roundings onto the checkpoint's weight. By default A is
//! frozen and only B trains (FFA-LoRA); [`LoraLinear::set_lora_trainable`] chooses per
//! round (RoLoRA trains A alone, FedIT, HetLoRA and FedSA-LoRA both).
//!
//! Tensors are stored in burn's matmul-ready layout (`[in, out]`, i.e. transposed relative to
//! Hugging Face and PEFT, which store `[out, in]`, `lora_A` `[r, in]` and `lora_B` `[out, r]`),
//! so the forward pass needs no transposes; the PEFT layout is restored on the host when the
//! adapter is exported.

use burn::module::{Module, Param, ParamId};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::linear;
use burn::tensor::{Device, Tensor, TensorData};
use fedcore::{LoraModule, Matrix};

use super::init::transpose;
use crate::error::ModelError;

/// A linear layer of the decoder; `lora` is `Some` for the modules LoRA targets.
#[derive(Module, Debug)]
pub struct LoraLinear {
    /// Frozen base weight `Wᵀ`, `[in, out]`.
    weight: Param<Tensor<2>>,
    /// Frozen base bias `[out]` (Qwen2's q/k/v projections; Llama with `attention_bias`).
    bias: Option<Param<Tensor<1>>>,
    /// Frozen dense correction `Dᵀ`, `[in, out]`, added to `Wᵀ` (FedEx-LoRA).
    base_delta: Option<Param<Tensor<2>>>,
    lora: Option<LoraBranch>,
}

/// The low-rank update of one adapted layer.
#[derive(Module, Debug)]
pub struct LoraBranch {
    /// `Aᵀ`, `[in, r]`: frozen (FFA-LoRA draws A from a seed every participant shares).
    a_t: Param<Tensor<2>>,
    /// `Bᵀ`, `[r, out]`: the only trained tensor.
    b_t: Param<Tensor<2>>,
    /// `alpha / r`.
    scaling: f32,
    /// PEFT's `lora_dropout` on the branch's input; active only in training (autodiff).
    dropout: Dropout,
    /// DP-SGD's per-example copies of the trained factors (`[n, in, r]`, `[n, r, out]`),
    /// present only inside one DP-SGD step ([`LoraLinear::expand_per_example`]): example
    /// `i` of the batch goes through copy `i`, so each copy's gradient is that example's.
    a_each: Option<Param<Tensor<3>>>,
    b_each: Option<Param<Tensor<3>>>,
}

/// A factor's per-example copy, and the id of the parameter it copies.
pub(crate) struct PerExample {
    pub of: ParamId,
    pub copies: Param<Tensor<3>>,
}

impl LoraLinear {
    /// A frozen layer from a Hugging Face-layout weight (`[out, in]`, row-major).
    pub(crate) fn frozen(
        weight: &[f32],
        out_features: usize,
        in_features: usize,
        device: &Device,
    ) -> Self {
        let data = TensorData::new(
            transpose(weight, out_features, in_features),
            [in_features, out_features],
        );
        LoraLinear {
            weight: Param::from_data(data, device).set_require_grad(false),
            bias: None,
            base_delta: None,
            lora: None,
        }
    }

    /// Adds a frozen bias of `out_features` values.
    pub(crate) fn with_bias(mut self, bias: Vec<f32>, device: &Device) -> Self {
        let n = bias.len();
        self.bias =
            Some(Param::from_data(TensorData::new(bias, [n]), device).set_require_grad(false));
        self
    }

    /// `(in_features, out_features)`.
    pub fn dims(&self) -> (usize, usize) {
        let [i, o] = self.weight.lazy_shape().dims();
        (i, o)
    }

    /// Whether this layer carries a LoRA branch.
    pub fn is_adapted(&self) -> bool {
        self.lora.is_some()
    }

    /// Adds (or replaces) the LoRA branch with A and B in PEFT layout and dropout probability
    /// `dropout` on its input (in `[0, 1)`, checked by `LoraSpec::validate`).
    pub(crate) fn with_lora(
        mut self,
        name: &str,
        module: &LoraModule,
        scaling: f32,
        dropout: f64,
        device: &Device,
    ) -> Result<Self, ModelError> {
        self.check_lora(name, module)?;
        let (a_t, b_t) = peft_to_burn(module);
        self.lora = Some(LoraBranch {
            a_t: Param::from_data(a_t, device).set_require_grad(false),
            b_t: Param::from_data(b_t, device),
            scaling,
            dropout: DropoutConfig::new(dropout).init(),
            a_each: None,
            b_each: None,
        });
        Ok(self)
    }

    /// Replaces A and B of an adapted layer, keeping the parameters' ids, device and
    /// trainability (A frozen, B trainable).
    pub(crate) fn load_lora(&mut self, name: &str, module: &LoraModule) -> Result<(), ModelError> {
        self.check_lora(name, module)?;
        let Some(branch) = self.lora.take() else {
            return Err(ModelError::UnexpectedModule(name.to_string()));
        };
        let device = branch.a_t.lazy_device();
        let (a_t, b_t) = peft_to_burn(module);
        let a_id: ParamId = branch.a_t.id;
        let b_id: ParamId = branch.b_t.id;
        self.lora = Some(LoraBranch {
            a_t: branch
                .a_t
                .transform_for_load(Tensor::from_data(a_t, &device), a_id),
            b_t: branch
                .b_t
                .transform_for_load(Tensor::from_data(b_t, &device), b_id),
            scaling: branch.scaling,
            dropout: branch.dropout,
            a_each: None,
            b_each: None,
        });
        Ok(())
    }

    /// Sets (or, with `None`, removes) the frozen dense correction `D` `[out, in]` (Hugging
    /// Face layout) added to the base weight; the error names the module.
    pub(crate) fn load_base_delta(
        &mut self,
        name: &str,
        delta: Option<&Matrix>,
    ) -> Result<(), ModelError> {
        self.base_delta = match delta {
            None => None,
            Some(d) => {
                self.check_base_delta(name, d)?;
                let (in_f, out_f) = self.dims();
                let data = TensorData::new(transpose(d.data(), out_f, in_f), [in_f, out_f]);
                let device = self.weight.lazy_device();
                Some(Param::from_data(data, &device).set_require_grad(false))
            }
        };
        Ok(())
    }

    /// Checks that a dense correction is `[out, in]` for this layer.
    pub(crate) fn check_base_delta(&self, name: &str, delta: &Matrix) -> Result<(), ModelError> {
        let (in_f, out_f) = self.dims();
        if delta.shape() == [out_f, in_f] {
            Ok(())
        } else {
            Err(ModelError::ModuleShape {
                module: name.to_string(),
                tensor: "base_delta",
                expected: [out_f, in_f],
                found: delta.shape(),
            })
        }
    }

    /// Chooses which LoRA factors train (receive gradients) from now on; the base weight
    /// and bias never do. A layer without a LoRA branch is unchanged.
    pub(crate) fn set_lora_trainable(&mut self, a: bool, b: bool) {
        if let Some(branch) = self.lora.take() {
            self.lora = Some(LoraBranch {
                a_t: branch.a_t.set_require_grad(a),
                b_t: branch.b_t.set_require_grad(b),
                scaling: branch.scaling,
                dropout: branch.dropout,
                a_each: None,
                b_each: None,
            });
        }
    }

    /// A `[r, in]` and B `[out, r]` in PEFT layout, read back from the device.
    pub(crate) fn read_lora(&self) -> Result<Option<LoraModule>, ModelError> {
        let Some(branch) = &self.lora else {
            return Ok(None);
        };
        let (a_t, [in_f, r]) = read(&branch.a_t)?;
        let (b_t, [r2, out_f]) = read(&branch.b_t)?;
        debug_assert_eq!(r, r2);
        let a = Matrix::new(r, in_f, transpose(&a_t, in_f, r))
            .map_err(|e| ModelError::backend("reading lora_A", e))?;
        let b = Matrix::new(out_f, r2, transpose(&b_t, r2, out_f))
            .map_err(|e| ModelError::backend("reading lora_B", e))?;
        Ok(Some(LoraModule { a, b }))
    }

    /// The frozen base weight in Hugging Face layout `[out, in]`, read back from the device.
    #[cfg(test)]
    pub(crate) fn read_base(&self) -> Result<Matrix, ModelError> {
        let (w_t, [in_f, out_f]) = read(&self.weight)?;
        Matrix::new(out_f, in_f, transpose(&w_t, in_f, out_f))
            .map_err(|e| ModelError::backend("reading a base weight", e))
    }

    /// `x·(W + D)ᵀ + b + (alpha/r)·(x·Aᵀ)·Bᵀ` over the last axis of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let bias = self.bias.as_ref().map(|b| b.val());
        // Adding `Dᵀ` costs `in × out` per call, small beside the matmul's `tokens × in × out`.
        let weight = match &self.base_delta {
            None => self.weight.val(),
            Some(d) => self.weight.val() + d.val(),
        };
        match &self.lora {
            None => linear(x, weight, bias),
            Some(branch) if branch.a_each.is_some() || branch.b_each.is_some() => {
                let base = linear(x.clone(), weight, bias);
                base + branch.per_example_forward(x)
            }
            Some(branch) => {
                let base = linear(x.clone(), weight, bias);
                let low_rank = linear(branch.dropout.forward(x), branch.a_t.val(), None)
                    .mul_scalar(branch.scaling);
                base + linear(low_rank, branch.b_t.val(), None)
            }
        }
    }

    /// Gives every trained factor of the branch `n` per-example copies (fresh leaves equal
    /// to it), through which the rows of the next batch of `n` examples go: the copies'
    /// gradients are then the per-example gradients DP-SGD clips, in one backward pass.
    /// The factors themselves get no gradient from a model with copies: DP-SGD expands a
    /// clone of the model for one step and drops it.
    pub(crate) fn expand_per_example(&mut self, n: usize) -> Vec<PerExample> {
        let Some(branch) = self.lora.as_mut() else {
            return Vec::new();
        };
        let copy = |p: &Param<Tensor<2>>| -> Option<Param<Tensor<3>>> {
            let value = p.val();
            value.is_require_grad().then(|| {
                let [rows, cols] = value.dims();
                // Built on the inner backend and brought back as a fresh leaf.
                Param::from_tensor(
                    Tensor::from_inner(value.inner().reshape([1, rows, cols]).repeat_dim(0, n))
                        .require_grad(),
                )
            })
        };
        branch.a_each = copy(&branch.a_t);
        branch.b_each = copy(&branch.b_t);
        let mut out = Vec::new();
        if let Some(copies) = &branch.a_each {
            out.push(PerExample {
                of: branch.a_t.id,
                copies: copies.clone(),
            });
        }
        if let Some(copies) = &branch.b_each {
            out.push(PerExample {
                of: branch.b_t.id,
                copies: copies.clone(),
            });
        }
        out
    }

    /// Checks that `module`'s A is `[r, in]` and B `[out, r]` for this layer (and, when a
    /// branch exists, its rank); the error names the tensor.
    pub(crate) fn check_lora(&self, name: &str, module: &LoraModule) -> Result<(), ModelError> {
        let (in_f, out_f) = self.dims();
        let rank = module.a.rows();
        let expected_rank = self
            .lora
            .as_ref()
            .map(|b| b.a_t.lazy_shape().dims::<2>()[1])
            .unwrap_or(rank);
        let check = |tensor: &'static str, expected: [usize; 2], found: [usize; 2]| {
            if expected == found {
                Ok(())
            } else {
                Err(ModelError::ModuleShape {
                    module: name.to_string(),
                    tensor,
                    expected,
                    found,
                })
            }
        };
        check("lora_A", [expected_rank, in_f], module.a.shape())?;
        check("lora_B", [out_f, expected_rank], module.b.shape())
    }
}

impl LoraBranch {
    /// `(alpha/r)·(x·Aᵢᵀ)·Bᵢᵀ` with example `i`'s copies for the rows of example `i` (the
    /// leading axis of `x`), the shared factor where a factor has no copies.
    fn per_example_forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dims = x.dims();
        let n = dims[0];
        let inner = dims[D - 1];
        let rows: usize = dims[1..D - 1].iter().product();
        let x3: Tensor<3> = self.dropout.forward(x).reshape([n, rows, inner]);
        let low = match &self.a_each {
            Some(a) => x3.matmul(a.val()),
            None => linear(x3, self.a_t.val(), None),
        }
        .mul_scalar(self.scaling);
        let out = match &self.b_each {
            Some(b) => low.matmul(b.val()),
            None => linear(low, self.b_t.val(), None),
        };
        let mut shape = dims;
        shape[D - 1] = out.dims()[2];
        out.reshape(shape)
    }
}

/// PEFT `A [r, in]`, `B [out, r]` → burn `Aᵀ [in, r]`, `Bᵀ [r, out]`.
fn peft_to_burn(module: &LoraModule) -> (TensorData, TensorData) {
    let [r, in_f] = module.a.shape();
    let [out_f, _] = module.b.shape();
    (
        TensorData::new(transpose(module.a.data(), r, in_f), [in_f, r]),
        TensorData::new(transpose(module.b.data(), out_f, r), [r, out_f]),
    )
}

fn read(param: &Param<Tensor<2>>) -> Result<(Vec<f32>, [usize; 2]), ModelError> {
    let tensor = param.val();
    let dims = tensor.dims();
    let data = tensor
        .try_into_data()
        .map_err(|e| ModelError::backend("reading a parameter", e))?
        .try_into_vec_as::<f32>()
        .map_err(|e| ModelError::backend("reading a parameter", e))?;
    Ok((data, dims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init::WeightInit;

    const IN: usize = 6;
    const OUT: usize = 5;
    const R: usize = 3;

    fn layer(device: &Device) -> (LoraLinear, Vec<f32>) {
        let w = WeightInit::new(3).uniform("w", OUT, IN, 0.5);
        (LoraLinear::frozen(&w, OUT, IN, device), w)
    }

    fn module(b_scale: f32) -> LoraModule {
        let init = WeightInit::new(9);
        let mut b = Matrix::new(OUT, R, init.uniform("b", OUT, R, 1.0)).unwrap();
        b.data_mut().iter_mut().for_each(|v| *v *= b_scale);
        LoraModule {
            a: Matrix::new(R, IN, init.uniform("a", R, IN, 1.0)).unwrap(),
            b,
        }
    }

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_into_vec_as::<f32>().unwrap()
    }

    /// `x [n, in] · Mᵀ` with `M [out, in]`, in f64.
    fn matmul_t(x: &[f32], n: usize, m: &[f64], out: usize, inner: usize) -> Vec<f64> {
        (0..n)
            .flat_map(|i| {
                (0..out).map(move |o| {
                    (0..inner)
                        .map(|k| x[i * inner + k] as f64 * m[o * inner + k])
                        .sum()
                })
            })
            .collect()
    }

    #[test]
    fn zero_b_is_the_frozen_base_and_set_b_adds_the_scaled_low_rank_update() {
        let device = Device::flex();
        let (base, w) = layer(&device);
        let x_host = WeightInit::new(4).uniform("x", 4, IN, 1.0);
        let x = Tensor::<2>::from_data(TensorData::new(x_host.clone(), [4, IN]), &device);
        let plain = values(base.forward(x.clone()));

        // B = 0: bit-identical to the frozen base.
        let (adapted, _) = layer(&device);
        let adapted = adapted
            .with_lora("m", &module(0.0), 2.0, 0.0, &device)
            .unwrap();
        assert_eq!(values(adapted.forward(x.clone())), plain);

        // B ≠ 0: base + scaling · x·Aᵀ·Bᵀ, computed by hand.
        let scaling = 16.0 / R as f32;
        let m = module(1.0);
        let (adapted, _) = layer(&device);
        let adapted = adapted.with_lora("m", &m, scaling, 0.0, &device).unwrap();
        let got = values(adapted.forward(x));
        let delta = m.delta(1.0).unwrap(); // B·A, [out, in]
        let w64: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let d64: Vec<f64> = delta.data().iter().map(|&v| v as f64).collect();
        let expect_base = matmul_t(&x_host, 4, &w64, OUT, IN);
        let expect_delta = matmul_t(&x_host, 4, &d64, OUT, IN);
        for i in 0..got.len() {
            let expected = expect_base[i] + scaling as f64 * expect_delta[i];
            assert!(
                (got[i] as f64 - expected).abs() < 1e-5,
                "element {i}: {} vs {expected}",
                got[i]
            );
        }
        // The update is not negligible, so the comparison above can fail.
        assert!(got.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-2));
    }

    #[test]
    fn lora_round_trips_in_peft_layout_and_shapes_are_checked() {
        let device = Device::flex();
        let (l, w) = layer(&device);
        let m = module(1.0);
        let mut l = l.with_lora("m", &m, 1.0, 0.0, &device).unwrap();
        assert_eq!(l.read_lora().unwrap().unwrap(), m);
        assert_eq!(l.read_base().unwrap().data(), &w[..]);

        let mut wrong = module(1.0);
        wrong.b = Matrix::zeros(OUT + 1, R);
        let err = l
            .load_lora("model.layers.0.mlp.up_proj", &wrong)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("model.layers.0.mlp.up_proj.lora_B"), "{msg}");
    }

    #[test]
    fn a_dense_correction_is_added_to_the_base_weight_and_replaced_not_accumulated() {
        let device = Device::flex();
        let x_host = WeightInit::new(4).uniform("x", 4, IN, 1.0);
        let x = Tensor::<2>::from_data(TensorData::new(x_host.clone(), [4, IN]), &device);
        let (l, w) = layer(&device);
        let mut l = l.with_lora("m", &module(1.0), 0.5, 0.0, &device).unwrap();
        let without = values(l.forward(x.clone()));
        let d = Matrix::new(OUT, IN, WeightInit::new(5).uniform("d", OUT, IN, 0.3)).unwrap();
        l.load_base_delta("m", Some(&d)).unwrap();
        let got = values(l.forward(x.clone()));
        let d64: Vec<f64> = d.data().iter().map(|&v| v as f64).collect();
        let extra = matmul_t(&x_host, 4, &d64, OUT, IN);
        for i in 0..got.len() {
            let expected = without[i] as f64 + extra[i];
            assert!((got[i] as f64 - expected).abs() < 1e-5, "element {i}");
        }
        assert!(
            extra.iter().any(|v| v.abs() > 1e-2),
            "the correction matters"
        );
        // Loading another correction replaces it; removing it restores the base exactly.
        l.load_base_delta("m", Some(&Matrix::zeros(OUT, IN)))
            .unwrap();
        assert_eq!(values(l.forward(x.clone())), without);
        l.load_base_delta("m", None).unwrap();
        assert_eq!(values(l.forward(x)), without);
        // The checkpoint's weight is untouched, and a misshapen correction is refused by name.
        assert_eq!(l.read_base().unwrap().data(), &w[..]);
        let err = l
            .load_base_delta(
                "model.layers.0.self_attn.q_proj",
                Some(&Matrix::zeros(IN, OUT)),
            )
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("q_proj.base_delta") && err.contains("[5, 6]"),
            "{err}"
        );
    }

    #[test]
    fn trainability_is_chosen_per_round_and_the_base_never_trains() {
        let device = Device::flex();
        let (l, _) = layer(&device);
        let mut l = l.with_lora("m", &module(1.0), 1.0, 0.0, &device).unwrap();
        l.set_lora_trainable(true, false);
        l.load_lora("m", &module(0.5)).unwrap();
        let t = l.clone().train();
        let branch = t.lora.as_ref().unwrap();
        assert!(branch.a_t.val().is_require_grad());
        assert!(!branch.b_t.val().is_require_grad());
        assert!(!t.weight.val().is_require_grad());
        l.set_lora_trainable(true, true);
        let t = l.train();
        let branch = t.lora.as_ref().unwrap();
        assert!(branch.a_t.val().is_require_grad() && branch.b_t.val().is_require_grad());
        assert!(!t.weight.val().is_require_grad());
    }

    #[test]
    fn only_b_requires_grad_after_train() {
        let device = Device::flex();
        let (l, _) = layer(&device);
        let l = l.with_lora("m", &module(1.0), 1.0, 0.0, &device).unwrap();
        let mut l = l;
        l.load_lora("m", &module(0.5)).unwrap();
        let l = l.train();
        let branch = l.lora.as_ref().unwrap();
        assert!(branch.b_t.val().is_require_grad());
        assert!(!branch.a_t.val().is_require_grad());
        assert!(!l.weight.val().is_require_grad());
    }
}
