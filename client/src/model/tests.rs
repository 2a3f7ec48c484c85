//! Model-level tests: construction from a plan, adapter round trips, causality.

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TargetModule, TrainingSpec};

use super::LoraLlama;
use crate::error::ModelError;

fn plan(lora: LoraSpec) -> FederationPlan {
    FederationPlan {
        privacy: Default::default(),
        federation: "test".into(),
        model: ModelSpec::tiny(),
        lora,
        training: TrainingSpec::default(),
        rounds: RoundSpec::default(),
        roster: Vec::new(),
        secure_aggregation: fedcore::secagg::spec::SecureAggregationSpec {
            enabled: false,
            ..Default::default()
        },
        strategy: Default::default(),
    }
}

fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

#[test]
fn initial_adapter_is_bit_identical_to_the_plan_and_logits_are_sane() {
    let device = Device::flex();
    let p = plan(LoraSpec::default());
    let model = LoraLlama::new(&p.model, &p.lora, &device).unwrap();
    assert_eq!(model.export_adapter(), p.initial_adapter());
    assert_eq!(
        model.trainable_params(),
        p.initial_adapter().b_manifest().len()
    );

    let ids: Vec<i64> = "Mekong".bytes().map(i64::from).collect();
    let logits = model.forward(tokens(&ids, &device));
    assert_eq!(logits.dims(), [1, ids.len(), 256]);
    let v = logits.into_data().try_into_vec_as::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(max > 0.1 && max < 20.0, "logit scale {max}");
}

#[test]
fn base_weights_depend_only_on_the_init_seed() {
    let device = Device::flex();
    let spec = ModelSpec::tiny();
    let a = LoraLlama::new(&spec, &LoraSpec::default(), &device).unwrap();
    let b = LoraLlama::new(&spec, &LoraSpec::default(), &device).unwrap();
    assert_eq!(
        super::snapshot::parameters(&a),
        super::snapshot::parameters(&b)
    );
    let mut other = spec.clone();
    other.init_seed += 1;
    let c = LoraLlama::new(&other, &LoraSpec::default(), &device).unwrap();
    let (pa, pc) = (
        super::snapshot::parameters(&a),
        super::snapshot::parameters(&c),
    );
    assert_ne!(pa[0].1, pc[0].1, "{}", pa[0].0);
}

#[test]
fn adapter_round_trips_and_changes_the_output() {
    let device = Device::flex();
    let p = plan(LoraSpec::default());
    let model = LoraLlama::new(&p.model, &p.lora, &device).unwrap();
    let ids: Vec<i64> = (0..12).map(|i| (i * 37 % 256) as i64).collect();
    let before = model.forward(tokens(&ids, &device)).into_data();

    let mut adapter = model.export_adapter();
    for (i, (_, m)) in adapter.modules_mut().enumerate() {
        for (j, v) in m.b.data_mut().iter_mut().enumerate() {
            *v = ((i * 31 + j * 7) % 13) as f32 * 0.01 - 0.06;
        }
    }
    let model = model.load_adapter(&adapter).unwrap();
    assert_eq!(model.export_adapter(), adapter);
    let after = model.forward(tokens(&ids, &device)).into_data();
    assert_ne!(before, after, "a non-zero B must change the logits");
}

/// A dense correction `D = (α/r)·B'·A` on the base computes what the adapter with `B'` does:
/// the correction is applied to every adapted module, never trains, and an empty map takes
/// it off again bit for bit.
#[test]
fn a_dense_correction_on_the_base_equals_the_same_update_as_lora() {
    let device = Device::flex();
    let p = plan(LoraSpec::default());
    let model = LoraLlama::new(&p.model, &p.lora, &device).unwrap();
    let trainable = model.trainable_params();
    let ids: Vec<i64> = (0..12).map(|i| (i * 53 % 256) as i64).collect();
    let plain = model.forward(tokens(&ids, &device)).into_data();

    let zero_b = model.export_adapter();
    let mut adapter = zero_b.clone();
    for (i, (_, m)) in adapter.modules_mut().enumerate() {
        for (j, v) in m.b.data_mut().iter_mut().enumerate() {
            *v = ((i * 17 + j * 5) % 11) as f32 * 0.01 - 0.05;
        }
    }
    let scaling = adapter.config().scaling();
    let corrections: std::collections::BTreeMap<String, fedcore::Matrix> = adapter
        .modules()
        .iter()
        .map(|(name, m)| (name.clone(), m.delta(scaling).unwrap()))
        .collect();

    let as_lora = model.load_adapter(&adapter).unwrap();
    let want: Vec<f32> = as_lora
        .forward(tokens(&ids, &device))
        .into_data()
        .try_into_vec_as()
        .unwrap();
    let model = as_lora
        .load_adapter(&zero_b)
        .unwrap()
        .load_base_delta(&corrections)
        .unwrap();
    assert_eq!(
        model.trainable_params(),
        trainable,
        "corrections never train"
    );
    let got: Vec<f32> = model
        .forward(tokens(&ids, &device))
        .into_data()
        .try_into_vec_as()
        .unwrap();
    let plain_v: Vec<f32> = plain.clone().try_into_vec_as().unwrap();
    assert!(
        got.iter().zip(&plain_v).any(|(a, b)| (a - b).abs() > 1e-3),
        "the correction changes the logits"
    );
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-4, "logit {i}: {g} vs {w}");
    }
    let model = model.load_base_delta(&Default::default()).unwrap();
    assert_eq!(model.forward(tokens(&ids, &device)).into_data(), plain);

    // A correction for a module the model does not adapt, or none for one it does, is
    // refused by name before anything changes.
    let mut missing = corrections.clone();
    let (gone, _) = missing.pop_first().unwrap();
    let err = model.load_base_delta(&missing).err().unwrap().to_string();
    assert!(err.contains(&gone), "{err}");
}

#[test]
fn load_adapter_names_the_missing_or_misshaped_module() {
    let device = Device::flex();
    let p = plan(LoraSpec::default());
    let model = LoraLlama::new(&p.model, &p.lora, &device).unwrap();

    // An adapter for fewer targets lacks the model's k_proj.
    let fewer = plan(LoraSpec {
        target_modules: vec![TargetModule::Q, TargetModule::V],
        ..LoraSpec::default()
    })
    .initial_adapter();
    let err = model.clone().load_adapter(&fewer).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingModule(n) if n == "model.layers.0.self_attn.k_proj"),
        "{err}"
    );

    // A model adapting q,v only rejects the extra modules of a full adapter.
    let small = fewer_model(&device);
    let err = small.load_adapter(&p.initial_adapter()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnexpectedModule(n)
            if !n.ends_with("q_proj") && !n.ends_with("v_proj")),
        "{err}"
    );

    // A wrong-rank adapter is refused by rank.
    let err = model
        .clone()
        .load_adapter(
            &plan(LoraSpec {
                rank: 4,
                ..LoraSpec::default()
            })
            .initial_adapter(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");

    // A mis-shaped B is refused with the module and tensor named.
    let mut bad = p.initial_adapter();
    let (name, m) = bad.modules_mut().nth(5).unwrap();
    let name = name.to_string();
    m.b = fedcore::Matrix::zeros(m.b.rows() + 1, m.b.cols());
    // `LoraAdapter::new` would accept this (rank is consistent), so the model must catch it.
    let err = model.load_adapter(&bad).unwrap_err();
    assert!(err.to_string().contains(&format!("{name}.lora_B")), "{err}");
}

fn fewer_model(device: &Device) -> LoraLlama {
    let lora = LoraSpec {
        target_modules: vec![TargetModule::Q, TargetModule::V],
        ..LoraSpec::default()
    };
    LoraLlama::new(&ModelSpec::tiny(), &lora, device).unwrap()
}

#[test]
fn invalid_specs_are_refused_by_field() {
    let device = Device::flex();
    let mut spec = ModelSpec::tiny();
    spec.num_key_value_heads = 3;
    let err = LoraLlama::new(&spec, &LoraSpec::default(), &device).unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    let lora = LoraSpec {
        target_modules: vec![],
        ..LoraSpec::default()
    };
    let err = LoraLlama::new(&ModelSpec::tiny(), &lora, &device).unwrap_err();
    assert!(err.to_string().contains("target_modules"), "{err}");
}

#[test]
fn logits_at_t_ignore_tokens_after_t() {
    let device = Device::flex();
    // Tied embeddings and a non-zero B exercise every path; 4 query heads share 2 kv heads.
    let mut spec = ModelSpec::tiny();
    spec.tie_word_embeddings = true;
    let lora = LoraSpec::default();
    let model = LoraLlama::new(&spec, &lora, &device).unwrap();
    let mut adapter = model.export_adapter();
    for (_, m) in adapter.modules_mut() {
        m.b.data_mut()
            .iter_mut()
            .enumerate()
            .for_each(|(j, v)| *v = (j % 5) as f32 * 0.02);
    }
    let model = model.load_adapter(&adapter).unwrap();

    let seq = 16;
    let t = 9;
    let a: Vec<i64> = (0..seq).map(|i| (i * 11 + 3) as i64 % 256).collect();
    let mut b = a.clone();
    for (i, v) in b.iter_mut().enumerate().skip(t + 1) {
        *v = (*v + 100 + i as i64) % 256;
    }
    let la = model
        .forward(tokens(&a, &device))
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let lb = model
        .forward(tokens(&b, &device))
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let v = 256;
    let prefix = (t + 1) * v;
    let max_prefix = la[..prefix]
        .iter()
        .zip(&lb[..prefix])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max_prefix < 1e-5, "positions ≤ t changed by {max_prefix}");
    let max_suffix = la[prefix..]
        .iter()
        .zip(&lb[prefix..])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(
        max_suffix > 1e-3,
        "later positions should see their own tokens"
    );
}
