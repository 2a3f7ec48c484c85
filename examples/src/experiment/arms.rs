//! Running one arm of the experiment: a federation under one mode, local-only training, or
//! centralised training on a language's or every lab's data at once.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::tensor::Device;
use fedclient::error::ModelError;
use fedclient::eval::evaluate;
use fedclient::model::{LoraLlama, RowBatch};
use fedclient::train::{BatchSource, RandomWindows, train, train_local};
use fedcore::aggregate::WeightedSum;
use fedcore::strategy::{AggregatedUpload, GlobalModel, GroupSpec, ServerState, StrategySpec};
use fedcore::{AggregationMode, LoraAdapter, Matrix, Strategy};

use super::parallel::map_in_order;
use super::{Arm, ArmRun, ExperimentError, ExperimentOptions, Lab, RoundScores};

/// Runs `arm` with `steps` local steps per round from `base` (B = 0, A from the shared
/// seed); `before` is the base's score (round 0), the same for every arm.
pub fn run_arm(
    arm: Arm,
    steps: usize,
    options: &ExperimentOptions,
    labs: &[Lab],
    base: &LoraLlama,
    before: &RoundScores,
    device: &Device,
) -> Result<ArmRun, ExperimentError> {
    let started = Instant::now();
    let mut fedit_error = Vec::new();
    let mut rounds = vec![before.clone()];
    let run = Run {
        steps,
        options,
        labs,
        base,
        device,
    };
    match arm {
        Arm::LocalOnly => run.local_only(&mut rounds)?,
        Arm::CentralisedLanguage => run.centralised(true, &mut rounds)?,
        Arm::Centralised => run.centralised(false, &mut rounds)?,
        Arm::FfaLora | Arm::FedSvd | Arm::FedIt | Arm::FedSaLora | Arm::GroupB => {
            let mode = match arm {
                Arm::FfaLora => AggregationMode::FfaLora,
                Arm::FedSvd => AggregationMode::FedSvd,
                Arm::FedIt => AggregationMode::FedIt,
                Arm::FedSaLora => AggregationMode::FedSaLora,
                _ => AggregationMode::GroupB,
            };
            run.federated(mode, &mut rounds, &mut fedit_error)?
        }
    };
    Ok(ArmRun {
        arm,
        local_steps: steps,
        rounds,
        fedit_error,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The seed of lab `lab`'s batches in `round` (distinct per lab and round, the same in every
/// arm so that arms see the same batches).
fn batch_seed(options: &ExperimentOptions, lab: usize, round: u64) -> u64 {
    options
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((lab as u64) << 32)
        .wrapping_add(round)
}

/// Held-out loss of every lab under `models[model_of(lab index)]`. A model shared by several
/// labs of one language is scored once.
pub fn score(
    round: u64,
    labs: &[Lab],
    options: &ExperimentOptions,
    device: &Device,
    models: &[&LoraLlama],
    model_of: impl Fn(usize) -> usize,
) -> Result<RoundScores, ModelError> {
    // The distinct (model, language) pairs, each scored once, on every core.
    let mut first_lab: BTreeMap<(usize, &str), usize> = BTreeMap::new();
    for (i, lab) in labs.iter().enumerate() {
        first_lab
            .entry((model_of(i), lab.language.as_str()))
            .or_insert(i);
    }
    let jobs: Vec<((usize, &str), LoraLlama, &Lab)> = first_lab
        .iter()
        .map(|(&key, &i)| (key, models[key.0].clone(), &labs[i]))
        .collect();
    let scored = map_in_order(jobs, |(key, model, lab)| {
        evaluate(&model, &lab.corpus.heldout, options.seq_len, device)
            .map(|s| (key, (s.loss, s.bits_per_char)))
    });
    let mut cache: BTreeMap<(usize, &str), (f64, f64)> = BTreeMap::new();
    for s in scored {
        let (key, value) = s?;
        cache.insert(key, value);
    }
    let mut loss = Vec::with_capacity(labs.len());
    let mut bits_per_char = Vec::with_capacity(labs.len());
    for (i, lab) in labs.iter().enumerate() {
        let (l, b) = cache[&(model_of(i), lab.language.as_str())];
        loss.push(l);
        bits_per_char.push(b);
    }
    Ok(RoundScores {
        round,
        loss,
        bits_per_char,
    })
}

/// One arm's run: the shared inputs.
struct Run<'a> {
    steps: usize,
    options: &'a ExperimentOptions,
    labs: &'a [Lab],
    base: &'a LoraLlama,
    device: &'a Device,
}

impl Run<'_> {
    /// The baselines' starting model: standard LoRA, A and B both trained, as a lab would
    /// fine-tune alone with PEFT (the strongest baseline; the federated modes that train B
    /// only are at a disadvantage against it, which the report says).
    fn alone(&self) -> LoraLlama {
        self.base.clone().set_trainable(true, true)
    }

    /// Whether to score after `round`.
    fn scores_after(&self, round: u64) -> bool {
        self.options.eval_every_round || round == self.options.rounds
    }

    /// The languages in lab order, each once, and each lab's index into them.
    fn languages(&self) -> (Vec<String>, Vec<usize>) {
        let mut languages: Vec<String> = Vec::new();
        let mut index = Vec::new();
        for lab in self.labs {
            let i = match languages.iter().position(|l| *l == lab.language) {
                Some(i) => i,
                None => {
                    languages.push(lab.language.clone());
                    languages.len() - 1
                }
            };
            index.push(i);
        }
        (languages, index)
    }

    /// A federation under `mode`: every lab every round, token-weighted mean of the uploads.
    fn federated(
        &self,
        mode: AggregationMode,
        scores: &mut Vec<RoundScores>,
        fedit_error: &mut Vec<f64>,
    ) -> Result<(), ExperimentError> {
        let (options, labs, base, device) = (self.options, self.labs, self.base, self.device);
        let spec = options.training(self.steps);
        let (model_spec, lora) = (base.model_spec().clone(), base.lora_spec().clone());
        let modules = model_spec.lora_modules(&lora.target_modules);
        let (languages, language_of) = self.languages();
        let groups = (mode == AggregationMode::GroupB).then(|| GroupSpec {
            members: labs
                .iter()
                .map(|l| (l.name.clone(), l.language.clone()))
                .collect(),
            // Plaintext here; the runtime's plan validation asks for more with secure
            // aggregation on.
            min_labs: 1,
        });
        let strategy = Strategy::new(
            StrategySpec {
                mode,
                groups,
                ..StrategySpec::default()
            },
            &lora,
            &modules,
            false,
        )?;
        let mut global = if mode == AggregationMode::GroupB {
            let mut sorted = languages.clone();
            sorted.sort();
            GlobalModel::with_groups(base.export_adapter(), &sorted)
        } else {
            GlobalModel::new(base.export_adapter())
        };
        let mut state = ServerState::default();
        // FedSA-LoRA: each lab's own B, kept between rounds.
        let mut personal: Vec<Option<LoraAdapter>> = vec![None; labs.len()];
        let load = |adapter: &LoraAdapter| base.clone().load_adapter(adapter);
        for round in 1..=options.rounds {
            let layout = strategy.upload_layout(&global, &state);
            let trains = strategy.trains(&state);
            let mut sum = WeightedSum::new(layout.len());
            let mut trained_adapters = Vec::new();
            // Every lab's model is loaded here (in order) and trained on every core; the
            // uploads are summed in lab order, as a sequential run would.
            let jobs = labs
                .iter()
                .enumerate()
                .map(|(i, lab)| {
                    let download = strategy.download(&global, &lab.name, personal[i].as_ref())?;
                    let model = load(&download)?.set_trainable(trains.a, trains.b);
                    Ok::<_, ExperimentError>((i, lab, download, model))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let trained = map_in_order(jobs, |(i, lab, download, model)| {
                let seed = batch_seed(options, i, round);
                let (trained, _) = train_local(model, &lab.corpus.train, &spec, seed, device)?;
                Ok::<_, ExperimentError>((download, trained.export_adapter()))
            });
            for (lab, result) in labs.iter().zip(trained) {
                let (download, adapter) = result?;
                let upload = strategy.upload(&layout, &lab.name, &download, &adapter)?;
                sum.add(lab.corpus.train_samples() as u64, &upload)?;
                trained_adapters.push(adapter);
            }
            if mode == AggregationMode::FedIt {
                let weights: Vec<f64> = labs
                    .iter()
                    .map(|l| l.corpus.train_samples() as f64)
                    .collect();
                fedit_error.push(factor_averaging_error(
                    &global.adapter,
                    &trained_adapters,
                    &weights,
                )?);
            }
            let outcome =
                strategy.aggregate(&global, &state, &AggregatedUpload::from_weighted_sum(&sum)?)?;
            global = outcome.global;
            state = outcome.state;
            if mode == AggregationMode::FedSaLora {
                personal = trained_adapters.into_iter().map(Some).collect();
            }
            if !self.scores_after(round) {
                continue;
            }
            // Each lab is scored with the model it would use: FedSA-LoRA's own (the new
            // global A, its own B), group_b's language model (A, the language's B), the
            // one global otherwise.
            let (models, model_of): (Vec<LoraLlama>, Box<dyn Fn(usize) -> usize>) = match mode {
                AggregationMode::FedSaLora => (
                    labs.iter()
                        .enumerate()
                        .map(|(i, lab)| {
                            load(&strategy.download(&global, &lab.name, personal[i].as_ref())?)
                                .map_err(ExperimentError::from)
                        })
                        .collect::<Result<_, _>>()?,
                    Box::new(|i| i),
                ),
                AggregationMode::GroupB => (
                    languages
                        .iter()
                        .map(|l| load(&global.for_group(l)?).map_err(ExperimentError::from))
                        .collect::<Result<_, _>>()?,
                    Box::new(|i| language_of[i]),
                ),
                _ => (vec![load(&global.adapter)?], Box::new(|_| 0)),
            };
            let refs: Vec<&LoraLlama> = models.iter().collect();
            scores.push(score(round, labs, options, device, &refs, model_of)?);
        }
        Ok(())
    }

    /// Every lab alone: the same rounds × steps and the same batches as in the federation.
    fn local_only(&self, scores: &mut Vec<RoundScores>) -> Result<(), ExperimentError> {
        let (options, labs, device) = (self.options, self.labs, self.device);
        let spec = options.training(self.steps);
        let mut models: Vec<LoraLlama> = labs.iter().map(|_| self.alone()).collect();
        for round in 1..=options.rounds {
            let jobs: Vec<(usize, &Lab, LoraLlama)> = labs
                .iter()
                .enumerate()
                .zip(models.drain(..))
                .map(|((i, lab), model)| (i, lab, model))
                .collect();
            for trained in map_in_order(jobs, |(i, lab, model)| {
                let seed = batch_seed(options, i, round);
                train_local(model, &lab.corpus.train, &spec, seed, device).map(|(m, _)| m)
            }) {
                models.push(trained?);
            }
            if self.scores_after(round) {
                let refs: Vec<&LoraLlama> = models.iter().collect();
                scores.push(score(round, labs, options, device, &refs, |i| i)?);
            }
        }
        Ok(())
    }

    /// One model per language (`per_language`) or one for everything, each step on one
    /// batch of every lab it covers (the tokens those labs see in one local step).
    fn centralised(
        &self,
        per_language: bool,
        scores: &mut Vec<RoundScores>,
    ) -> Result<(), ExperimentError> {
        let (options, labs, device) = (self.options, self.labs, self.device);
        let spec = options.training(self.steps);
        let (languages, language_of) = self.languages();
        let pools = if per_language { languages.len() } else { 1 };
        let pool_of = |i: usize| if per_language { language_of[i] } else { 0 };
        let mut models: Vec<LoraLlama> = (0..pools).map(|_| self.alone()).collect();
        for round in 1..=options.rounds {
            // The pools train independently, on every core.
            let jobs: Vec<(usize, LoraLlama)> = models.drain(..).enumerate().collect();
            for trained in map_in_order(jobs, |(p, model)| {
                let sources = labs
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| pool_of(*i) == p)
                    .map(|(i, lab)| {
                        RandomWindows::new(
                            &lab.corpus.train,
                            options.batch_size,
                            options.seq_len,
                            model.window_prefix(),
                            batch_seed(options, i, round),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                train(model, &spec, &mut Pooled(sources), device, &mut ()).map(|(m, _)| m)
            }) {
                models.push(trained?);
            }
            if self.scores_after(round) {
                let refs: Vec<&LoraLlama> = models.iter().collect();
                scores.push(score(round, labs, options, device, &refs, pool_of)?);
            }
        }
        Ok(())
    }
}

/// `‖Σpᵢ BᵢAᵢ − B̄Ā‖_F / ‖Σpᵢ BᵢAᵢ − B_g A_g‖_F` over all modules: FedIT's error relative to
/// the size of the round's exact mean update (`p` normalised from `weights`).
pub fn factor_averaging_error(
    global: &LoraAdapter,
    trained: &[LoraAdapter],
    weights: &[f64],
) -> Result<f64, ExperimentError> {
    let total: f64 = weights.iter().sum();
    let mut err2 = 0f64;
    let mut update2 = 0f64;
    for (name, g) in global.modules() {
        let (out_f, in_f) = (g.b.rows(), g.a.cols());
        let mut exact = vec![0f64; out_f * in_f];
        let mut a_mean = vec![0f64; g.a.data().len()];
        let mut b_mean = vec![0f64; g.b.data().len()];
        for (t, w) in trained.iter().zip(weights) {
            let p = w / total;
            let m = t.module(name).expect("same layout as the global");
            add_scaled(&mut exact, m.b.matmul(&m.a)?.data(), p);
            add_scaled(&mut a_mean, m.a.data(), p);
            add_scaled(&mut b_mean, m.b.data(), p);
        }
        let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let naive = Matrix::new(out_f, g.b.cols(), to_f32(&b_mean))?.matmul(&Matrix::new(
            g.a.rows(),
            in_f,
            to_f32(&a_mean),
        )?)?;
        let before = g.b.matmul(&g.a)?;
        for ((e, n), b) in exact.iter().zip(naive.data()).zip(before.data()) {
            err2 += (e - f64::from(*n)).powi(2);
            update2 += (e - f64::from(*b)).powi(2);
        }
    }
    Ok(if update2 > 0.0 {
        (err2 / update2).sqrt()
    } else {
        0.0
    })
}

fn add_scaled(acc: &mut [f64], values: &[f32], p: f64) {
    for (a, v) in acc.iter_mut().zip(values) {
        *a += p * f64::from(*v);
    }
}

/// One batch of every source per step.
struct Pooled<'a>(Vec<RandomWindows<'a>>);

impl BatchSource for Pooled<'_> {
    fn next_batch(&mut self) -> Result<RowBatch, ModelError> {
        let mut parts = self.0.iter_mut().map(|s| s.next_batch());
        let mut out = parts.next().expect("at least one lab")?;
        for part in parts {
            out.append(&part?);
        }
        Ok(out)
    }
}
