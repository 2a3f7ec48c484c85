//! Record-level DP-SGD inside a lab (Abadi et al. 2016), the guarantee that matters when a
//! federation has few labs: whatever the center or the other labs see of this lab's
//! updates, no single record of its text changes them by much.
//!
//! - **Records**: the lab's text cut into disjoint windows of `seq_len` predictions
//!   ([`PoissonRecords`]); no token is in two records, so a guarantee per record is a
//!   guarantee per stretch of `seq_len` tokens (a longer document is a group of records).
//! - **Sampling**: each step takes every record independently with probability
//!   `q = batch_size / records` (Poisson sampling, what the accountant's amplification
//!   assumes), drawn from the OS's randomness: a center that knows the plan's seeds must not
//!   know which records a step used.
//! - **Per-record gradients**: one backward pass per sampled record (microbatches of one),
//!   each gradient clipped to L2 norm `max_grad_norm` (C) over all trained tensors.
//! - **Noise**: the clipped gradients are summed, Gaussian noise of standard deviation σ·C
//!   (OS randomness, Box–Muller in f64) is added to every trained value, and the sum is
//!   divided by the expected batch size; the optimizer then steps as usual (post-processing).
//!
//! The accountant is `fedcore::privacy::rdp` (the Poisson-subsampled Gaussian, equal to
//! Opacus): `steps` steps at rate `q` with noise multiplier σ.

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;

use super::StepGradient;
use crate::error::ModelError;
use crate::model::{LoraLlama, RowBatch};
use fedcore::privacy::RecordDpSpec;

/// A lab's text as disjoint records, and their Poisson sampling (see the module docs).
pub struct PoissonRecords<'a> {
    tokens: &'a [u32],
    seq_len: usize,
    prefix: Option<u32>,
    window: usize,
    records: usize,
    rate: f64,
}

impl<'a> PoissonRecords<'a> {
    /// The records of `tokens` for rows of `seq_len` predictions (`prefix`: the model's
    /// [`LoraLlama::window_prefix`]), sampled at a rate giving `expected_batch` records per
    /// step on average (all of them when there are fewer).
    pub fn new(
        tokens: &'a [u32],
        seq_len: usize,
        prefix: Option<u32>,
        expected_batch: usize,
    ) -> Result<Self, ModelError> {
        let window = seq_len + usize::from(prefix.is_none());
        let records = tokens.len() / window;
        if records == 0 {
            return Err(ModelError::TooFewTokens {
                what: "training corpus (DP-SGD records)",
                tokens: tokens.len(),
                needed: window,
            });
        }
        Ok(PoissonRecords {
            tokens,
            seq_len,
            prefix,
            window,
            records,
            rate: (expected_batch as f64 / records as f64).min(1.0),
        })
    }

    /// How many disjoint records the text holds.
    pub fn records(&self) -> usize {
        self.records
    }

    /// Each record's probability of being in a step: the accountant's `q`.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// The expected number of records per step, `q · records`.
    pub fn expected_batch(&self) -> f64 {
        self.rate * self.records as f64
    }

    /// One step's sample: the start of every record taken.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> Vec<usize> {
        (0..self.records)
            .filter(|_| rng.random::<f64>() < self.rate)
            .map(|i| i * self.window)
            .collect()
    }

    /// The records starting at `starts`, one row each.
    pub fn batch(&self, starts: &[usize]) -> RowBatch {
        RowBatch::windows_after(self.prefix, self.tokens, starts, self.seq_len)
    }

    /// The record starting at `start`, as a one-row batch.
    pub fn record(&self, start: usize) -> RowBatch {
        RowBatch::windows_after(self.prefix, self.tokens, &[start], self.seq_len)
    }
}

/// One DP-SGD step's gradient for `model` (on the autodiff device `autodiff`): the sampled
/// records' gradients, each clipped to `dp.max_grad_norm`, summed, noised and divided by
/// the expected batch size. `rng` draws the sample and the noise: it must be secret (the
/// OS's randomness) outside tests.
///
/// The per-record gradients come from one forward and one backward pass over the whole
/// sample: every trained LoRA factor gets one copy per record
/// ([`LoraLlama::expand_per_example`]), record `i` goes through copy `i`, so copy `i`'s
/// gradient is record `i`'s gradient. The copies are `records × rank × width`, small beside
/// the activations.
pub(crate) fn noised_gradient<R: Rng + ?Sized>(
    model: &LoraLlama,
    records: &PoissonRecords<'_>,
    dp: RecordDpSpec,
    autodiff: &Device,
    step: usize,
    rng: &mut R,
) -> Result<StepGradient, ModelError> {
    let sample = records.sample(rng);
    let mut grads = GradientsParams::new();
    let (mut loss, mut tokens, mut targets) = (0f64, 0, 0f64);
    if !sample.is_empty() {
        let n = sample.len();
        let batch = records.batch(&sample);
        let mut expanded = model.clone();
        let copies = expanded.expand_per_example(n);
        let (nll, weights) = batch.to_device(autodiff).nll(&expanded);
        // Every record has `seq` targets of weight 1: the sum of the records' mean losses.
        let total = (nll * weights).sum().div_scalar(batch.seq as f32);
        let value: f32 = total
            .clone()
            .try_into_scalar()
            .map_err(|e| ModelError::backend("reading the training loss", e))?;
        if !value.is_finite() {
            return Err(ModelError::Diverged { step, loss: value });
        }
        let backward = total.backward();
        let per_record: Vec<_> = copies
            .iter()
            .filter_map(|c| c.copies.val().grad(&backward).map(|g| (c.of, g)))
            .collect();
        let mut squared: Option<Tensor<1>> = None;
        for (_, g) in &per_record {
            let sq = g.clone().square().sum_dim(2).sum_dim(1).reshape([n]);
            squared = Some(match squared {
                Some(acc) => acc + sq,
                None => sq,
            });
        }
        if let Some(squared) = squared {
            // min(1, C / ‖g_i‖) per record.
            let factors = squared
                .sqrt()
                .clamp_min(1e-30)
                .recip()
                .mul_scalar(dp.max_grad_norm as f32)
                .clamp_max(1.0)
                .reshape([n, 1, 1]);
            for (id, g) in per_record {
                let [_, rows, cols] = g.dims();
                let clipped = (g * factors.clone()).sum_dim(0).reshape([rows, cols]);
                grads.register::<2>(id, clipped);
            }
        }
        loss = f64::from(value) / n as f64;
        tokens = batch.rows * batch.seq;
        targets = batch.trained_targets();
    }
    add_noise(model, &mut grads, dp, records, rng)?;
    Ok(StepGradient {
        grads,
        loss,
        tokens,
        trained_targets: targets,
    })
}

/// Adds DP-SGD's noise, N(0, (σ·C)²), to the gradient of every trained tensor of `model`
/// and divides by the expected batch size.
fn add_noise<R: Rng + ?Sized>(
    model: &LoraLlama,
    grads: &mut GradientsParams,
    dp: RecordDpSpec,
    records: &PoissonRecords<'_>,
    rng: &mut R,
) -> Result<(), ModelError> {
    let mut visitor = AddNoise {
        grads,
        stddev: dp.noise_multiplier * dp.max_grad_norm,
        divide_by: records.expected_batch(),
        rng,
        error: None,
    };
    model.visit(&mut visitor);
    visitor.error.map_or(Ok(()), Err)
}

/// Adds N(0, stddev²) to every trained tensor's gradient (a zero gradient when no sampled
/// record reached it), then divides by `divide_by`.
struct AddNoise<'a, R: ?Sized> {
    grads: &'a mut GradientsParams,
    stddev: f64,
    divide_by: f64,
    rng: &'a mut R,
    error: Option<ModelError>,
}

impl<R: Rng + ?Sized> ModuleVisitor for AddNoise<'_, R> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let value = param.val();
        if !value.is_require_grad() || self.error.is_some() {
            return;
        }
        let inner = value.inner();
        let shape = inner.shape();
        let values: Vec<f32> = (0..shape.num_elements())
            .map(|_| (gaussian(self.rng) * self.stddev) as f32)
            .collect();
        let noise = Tensor::<D>::from_data(TensorData::new(values, shape), &inner.device());
        let noised = match self.grads.remove::<D>(param.id) {
            Some(grad) => grad + noise,
            None => noise,
        };
        self.grads
            .register::<D>(param.id, noised.div_scalar(self.divide_by as f32));
    }
}

/// One standard normal draw (Box–Muller, in f64).
fn gaussian<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    // 1 − u lies in (0, 1], so its logarithm is finite.
    let u = 1.0 - rng.random::<f64>();
    let v = rng.random::<f64>();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TextTokenizer;
    use crate::train::clip::{global_norm, scale};
    use burn::optim::GradientsAccumulator;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The reference [`noised_gradient`] is tested against: one backward pass per sampled
    /// record (microbatches of one), each gradient clipped on its own. Otherwise the same.
    /// One DP-SGD step's gradient for `model` (on the autodiff device `autodiff`): the sampled
    /// records' gradients, each clipped to `dp.max_grad_norm`, summed, noised and divided by
    /// the expected batch size. `rng` draws the sample and the noise: it must be secret (the
    /// OS's randomness) outside tests.
    fn noised_gradient_per_record<R: Rng + ?Sized>(
        model: &LoraLlama,
        records: &PoissonRecords<'_>,
        dp: RecordDpSpec,
        autodiff: &Device,
        step: usize,
        rng: &mut R,
    ) -> Result<StepGradient, ModelError> {
        let sample = records.sample(rng);
        let mut accumulator = GradientsAccumulator::<LoraLlama>::new();
        let (mut loss_sum, mut tokens, mut targets) = (0f64, 0, 0f64);
        for &start in &sample {
            let batch = records.record(start);
            let weight = batch.trained_targets().max(1.0);
            let (nll, weights) = batch.to_device(autodiff).nll(model);
            let loss = (nll * weights).sum().div_scalar(weight as f32);
            let mut grads = GradientsParams::from_grads(loss.backward(), model);
            let value: f32 = loss
                .try_into_scalar()
                .map_err(|e| ModelError::backend("reading the training loss", e))?;
            if !value.is_finite() {
                return Err(ModelError::Diverged { step, loss: value });
            }
            let norm = global_norm(model, &grads)?;
            if norm > dp.max_grad_norm {
                scale(model, &mut grads, (dp.max_grad_norm / norm) as f32);
            }
            accumulator.accumulate(model, grads);
            loss_sum += f64::from(value);
            tokens += batch.rows * batch.seq;
            targets += batch.trained_targets();
        }
        let mut grads = accumulator.grads();
        add_noise(model, &mut grads, dp, records, rng)?;
        Ok(StepGradient {
            grads,
            loss: loss_sum / sample.len().max(1) as f64,
            tokens,
            trained_targets: targets,
        })
    }

    #[test]
    fn records_are_disjoint_and_sampled_at_their_rate() {
        let tokens: Vec<u32> = (0..1000).collect();
        let records = PoissonRecords::new(&tokens, 9, None, 10).unwrap();
        assert_eq!(records.records(), 100);
        assert!((records.rate() - 0.1).abs() < 1e-12);
        let a = records.record(0);
        let b = records.record(10);
        assert_eq!(a.inputs, (0..9).collect::<Vec<u32>>());
        assert_eq!(a.targets, (1..10).collect::<Vec<u32>>());
        assert_eq!(
            b.inputs[0], 10,
            "the next record starts after the last target"
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let total: usize = (0..2000).map(|_| records.sample(&mut rng).len()).sum();
        let mean = total as f64 / 2000.0;
        // Binomial(100, 0.1): mean 10, standard error of the mean 3/√2000.
        assert!((mean - 10.0).abs() < 0.35, "{mean}");
        let few = PoissonRecords::new(&tokens, 9, None, 500).unwrap();
        assert_eq!(few.rate(), 1.0);
        assert!(PoissonRecords::new(&tokens[..5], 9, None, 1).is_err());
    }

    /// Every gradient value of `model`'s trained tensors, in visiting order.
    fn flatten(model: &LoraLlama, grads: &GradientsParams) -> Vec<f32> {
        struct Collect<'a> {
            grads: &'a GradientsParams,
            out: Vec<f32>,
        }
        impl ModuleVisitor for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if let Some(g) = self.grads.get::<D>(param.id) {
                    self.out
                        .extend(g.into_data().try_to_vec::<f32>().expect("f32 gradients"));
                }
            }
        }
        let mut c = Collect {
            grads,
            out: Vec::new(),
        };
        model.visit(&mut c);
        c.out
    }

    /// The tiny model on `device` in training mode, and the sample text's tokens.
    fn setup_on(device: &Device) -> (LoraLlama, Vec<u32>) {
        let text = crate::train::tests::sample_text();
        let tokens = crate::data::ByteTokenizer.encode(&text);
        let model = LoraLlama::new(
            &fedcore::ModelSpec::tiny(),
            &fedcore::LoraSpec::default(),
            device,
        )
        .unwrap()
        .train();
        (model, tokens)
    }

    fn setup() -> (LoraLlama, Vec<u32>, Device) {
        let device = Device::flex();
        let (model, tokens) = setup_on(&device);
        (model, tokens, device)
    }

    /// Without noise or clipping, with every record sampled, the DP gradient is the plain
    /// gradient of the batch of all records (each record's mean loss, averaged): the
    /// per-record passes and their sum are right.
    #[test]
    fn without_noise_or_clipping_it_is_the_batch_gradient() {
        let (model, tokens, device) = setup();
        let autodiff = device.autodiff();
        let records = PoissonRecords::new(&tokens, 32, None, usize::MAX).unwrap();
        assert_eq!(records.rate(), 1.0);
        let n = records.records();
        let dp = RecordDpSpec {
            noise_multiplier: 0.0,
            max_grad_norm: 1e9,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let got = noised_gradient(&model, &records, dp, &autodiff, 0, &mut rng).unwrap();
        let starts: Vec<usize> = (0..n).map(|i| i * 33).collect();
        let batch = RowBatch::windows(&tokens, &starts, 32);
        let (nll, weights) = batch.to_device(&autodiff).nll(&model);
        let loss = (nll * weights)
            .sum()
            .div_scalar(batch.trained_targets() as f32);
        let want = GradientsParams::from_grads(loss.backward(), &model);
        let (got, want) = (flatten(&model, &got.grads), flatten(&model, &want));
        assert_eq!(got.len(), want.len());
        assert!(!got.is_empty());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * scale, "{g} vs {w}");
        }
    }

    /// Each record's gradient is clipped before the sum, and the noise has σ·C / B per
    /// value.
    #[test]
    fn records_are_clipped_and_the_noise_has_the_stated_size() {
        let (model, tokens, device) = setup();
        let autodiff = device.autodiff();
        let records = PoissonRecords::new(&tokens, 32, None, usize::MAX).unwrap();
        let n = records.records() as f64;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let clip = 1e-4;
        let clipped = noised_gradient(
            &model,
            &records,
            RecordDpSpec {
                noise_multiplier: 0.0,
                max_grad_norm: clip,
            },
            &autodiff,
            0,
            &mut rng,
        )
        .unwrap();
        let norm = global_norm(&model, &clipped.grads).unwrap();
        // The mean of n vectors of norm ≤ C; these records' gradients point alike, so close
        // to C.
        assert!(norm <= clip * (1.0 + 1e-4) && norm > 0.5 * clip, "{norm}");
        let noised = noised_gradient(
            &model,
            &records,
            RecordDpSpec {
                noise_multiplier: 2.0,
                max_grad_norm: clip,
            },
            &autodiff,
            0,
            &mut rng,
        )
        .unwrap();
        let (a, b) = (
            flatten(&model, &noised.grads),
            flatten(&model, &clipped.grads),
        );
        let diffs: Vec<f64> = a.iter().zip(&b).map(|(x, y)| f64::from(x - y)).collect();
        let sd = (diffs.iter().map(|d| d * d).sum::<f64>() / diffs.len() as f64).sqrt();
        let expected = 2.0 * clip / n;
        assert!((sd / expected - 1.0).abs() < 0.05, "{sd} vs {expected}");
    }

    /// The one-pass per-example gradients equal one backward pass per record, clipped or
    /// not (same sample, no noise).
    #[test]
    fn one_pass_equals_one_pass_per_record() {
        let (model, tokens, device) = setup();
        // A nonzero B, so that A has a gradient too.
        let mut adapter = model.export_adapter();
        for (_, module) in adapter.modules_mut() {
            for (i, v) in module.b.data_mut().iter_mut().enumerate() {
                *v = 0.01 * ((i % 7) as f32 - 3.0);
            }
        }
        let model = model.load_adapter(&adapter).unwrap();
        let autodiff = device.autodiff();
        let records = PoissonRecords::new(&tokens, 32, None, 6).unwrap();
        // B alone (FFA-LoRA), A and B (FedIT, FedSA-LoRA), A alone (a RoLoRA A round).
        for ((a, b), clip) in [(false, true), (true, true), (true, false)]
            .into_iter()
            .flat_map(|t| [1e9, 0.05, 1e-4].map(|c| (t, c)))
        {
            let model = model.clone().set_trainable(a, b);
            let dp = RecordDpSpec {
                noise_multiplier: 0.0,
                max_grad_norm: clip,
            };
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let fast = noised_gradient(&model, &records, dp, &autodiff, 0, &mut rng).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let slow =
                noised_gradient_per_record(&model, &records, dp, &autodiff, 0, &mut rng).unwrap();
            assert!(
                (fast.loss - slow.loss).abs() < 1e-4 * slow.loss,
                "clip {clip}"
            );
            let _ = (a, b);
            assert_eq!(fast.tokens, slow.tokens);
            let (a, b) = (flatten(&model, &fast.grads), flatten(&model, &slow.grads));
            assert_eq!(a.len(), b.len());
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-3 * scale, "clip {clip}: {x} vs {y}");
            }
        }
    }

    /// The per-example copies' batched products on wgpu give flex's clipped gradient (same
    /// sample, no noise): DP-SGD on a lab's GPU computes what the CPU does.
    #[test]
    fn wgpu_gives_flexs_clipped_gradient() {
        use crate::device::{DeviceChoice, select_device, wgpu_available};
        let required = std::env::var("MEKONG_REQUIRE_WGPU").is_ok_and(|v| v == "1");
        if !wgpu_available() {
            assert!(!required, "MEKONG_REQUIRE_WGPU=1 but wgpu found no adapter");
            eprintln!("SKIPPED wgpu_gives_flexs_clipped_gradient: no wgpu adapter");
            return;
        }
        let wgpu = select_device(DeviceChoice::Wgpu).unwrap().device;
        let tokens = crate::data::ByteTokenizer.encode(&crate::train::tests::sample_text());
        let records = PoissonRecords::new(&tokens, 32, None, 4).unwrap();
        let dp = RecordDpSpec {
            noise_multiplier: 0.0,
            max_grad_norm: 0.05,
        };
        let gradient = |device: &Device| {
            let model = setup_on(device).0.set_trainable(true, true);
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let g = noised_gradient(
                &model,
                &records,
                dp,
                &device.clone().autodiff(),
                0,
                &mut rng,
            )
            .unwrap();
            flatten(&model, &g.grads)
        };
        let (flex, gpu) = (gradient(&Device::flex()), gradient(&wgpu));
        assert_eq!(flex.len(), gpu.len());
        let scale = flex.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0);
        for (a, b) in flex.iter().zip(&gpu) {
            assert!((a - b).abs() <= 1e-3 * scale, "flex {a} vs wgpu {b}");
        }
    }

    #[test]
    fn gaussian_draws_have_unit_variance() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let n = 200_000;
        let draws: Vec<f64> = (0..n).map(|_| gaussian(&mut rng)).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var - 1.0).abs() < 0.015, "{var}");
    }
}
