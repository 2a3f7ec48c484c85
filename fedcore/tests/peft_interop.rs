//! Interoperability with Python PEFT, checked against adapters PEFT itself saved.
//!
//! `tests/fixtures/peft/<name>/` was written by `scripts/make_peft_fixture.py`: PEFT 0.21's
//! `get_peft_model` + `save_pretrained` on the committed tiny checkpoints
//! (`client/tests/fixtures/tiny-qwen2`, `tiny-llama3`), every lora_A and lora_B set to a known
//! formula (`fixture.json` records the settings and the formula). Here Mekong builds the same
//! adapter from a plan's model and LoRA sections and must write what PEFT wrote, and must read
//! what PEFT wrote exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use fedcore::peft::{self, CONFIG_FILE, WEIGHTS_FILE};
use fedcore::{AdapterError, LoraAdapter, LoraSpec, ModelSpec, TargetModule};
use safetensors::SafeTensors;
use serde::Deserialize;
use serde_json::{Value, json};

const FIXTURES: [&str; 4] = [
    "tiny-qwen2-all",
    "tiny-qwen2-qv",
    "tiny-llama3-all",
    "tiny-llama3-qv",
];

/// Keys of PEFT's adapter_config.json whose value depends on the environment that saved it,
/// not on the adapter. `peft_version` is the PEFT version that saved the file; Mekong does not
/// write it (see `fedcore::peft::encode_config`). Every other key must be equal.
const ENVIRONMENT_KEYS: [&str; 1] = ["peft_version"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("fedcore sits in the workspace")
        .to_path_buf()
}

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft")
        .join(name)
}

/// `fixture.json`: what the script asked PEFT for.
#[derive(Debug, Deserialize)]
struct Record {
    base_model: String,
    r: usize,
    lora_alpha: f32,
    lora_dropout: f32,
    target_modules: Vec<String>,
}

struct Fixture {
    record: Record,
    weights: Vec<u8>,
    config: String,
}

fn fixture(name: &'static str) -> Fixture {
    let dir = fixture_dir(name);
    let read =
        |file: &str| fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{name}/{file}: {e}"));
    Fixture {
        record: serde_json::from_slice(&read("fixture.json")).unwrap(),
        weights: read(WEIGHTS_FILE),
        config: String::from_utf8(read(CONFIG_FILE)).unwrap(),
    }
}

/// The plan's model section for a Hugging Face checkpoint, from its `config.json` (the fields
/// that decide the adapted modules' shapes; the rest do not matter here).
fn model_spec(base_model: &str) -> ModelSpec {
    let path = repo_root().join(base_model).join("config.json");
    let c: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    let n = |k: &str| {
        c[k].as_u64()
            .unwrap_or_else(|| panic!("{k} in {}", path.display())) as usize
    };
    let spec = ModelSpec {
        name: base_model.to_string(),
        vocab_size: n("vocab_size"),
        hidden_size: n("hidden_size"),
        intermediate_size: n("intermediate_size"),
        num_hidden_layers: n("num_hidden_layers"),
        num_attention_heads: n("num_attention_heads"),
        num_key_value_heads: n("num_key_value_heads"),
        max_position_embeddings: n("max_position_embeddings"),
        head_dim: c["head_dim"].as_u64().map(|d| d as usize),
        ..ModelSpec::tiny()
    };
    spec.validate().unwrap();
    spec
}

fn lora_spec(record: &Record) -> LoraSpec {
    LoraSpec {
        rank: record.r,
        alpha: record.lora_alpha,
        target_modules: record
            .target_modules
            .iter()
            .map(|t| TargetModule::from_peft_name(t).unwrap())
            .collect(),
        a_seed: 1,
        dropout: record.lora_dropout,
    }
}

/// The formula of `scripts/make_peft_fixture.py` (`fixture.json`, "values"): for layer L,
/// target t and half h (0 = A, 1 = B), s = 14L + 2t + h, and value i is
/// (2·((7i + 13s) mod 97) − 97) / 128.
fn expected_values(module: &str, is_a: bool, len: usize) -> Vec<f32> {
    let parts: Vec<&str> = module.split('.').collect();
    let layer: usize = parts[2].parse().unwrap();
    let target = TargetModule::from_peft_name(parts[4]).unwrap();
    let t = TargetModule::ALL.iter().position(|x| *x == target).unwrap();
    let s = 14 * layer + 2 * t + usize::from(!is_a);
    (0..len)
        .map(|i| (2 * ((7 * i + 13 * s) % 97) as i64 - 97) as f32 / 128.0)
        .collect()
}

/// Mekong's adapter for the fixture's model and settings: the plan's config and module shapes,
/// with A and B set to the fixture's formula.
fn ours(f: &Fixture) -> LoraAdapter {
    let model = model_spec(&f.record.base_model);
    let lora = lora_spec(&f.record);
    lora.validate().unwrap();
    let mut adapter = LoraAdapter::init_ffa(
        lora.adapter_config(&model.name),
        &model.lora_modules(&lora.target_modules),
        lora.a_seed,
    );
    for (name, m) in adapter.modules_mut() {
        let a = expected_values(name, true, m.a.data().len());
        m.a.data_mut().copy_from_slice(&a);
        let b = expected_values(name, false, m.b.data().len());
        m.b.data_mut().copy_from_slice(&b);
    }
    adapter
}

/// Name → (dtype, shape) of every tensor, and the `__metadata__`.
type Layout = (
    BTreeMap<String, (String, Vec<usize>)>,
    Option<BTreeMap<String, String>>,
);

fn layout(bytes: &[u8]) -> Layout {
    let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
    let st = SafeTensors::deserialize(bytes).unwrap();
    let tensors = st
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                (format!("{:?}", v.dtype()), v.shape().to_vec()),
            )
        })
        .collect();
    let metadata = meta
        .metadata()
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
    (tensors, metadata)
}

/// The config as a JSON value with the environment's keys removed and `target_modules` (a set)
/// sorted.
fn normalised_config(json: &str) -> Value {
    let mut v: Value = serde_json::from_str(json).unwrap();
    let map = v.as_object_mut().unwrap();
    for key in ENVIRONMENT_KEYS {
        map.remove(key);
    }
    if let Some(Value::Array(targets)) = map.get_mut("target_modules") {
        targets.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    }
    v
}

/// Key names, shapes, dtypes and metadata of the weights, and every adapter_config.json value
/// but the environment's, are exactly PEFT's for the same model and targets.
#[test]
fn peft_fixture_keys_shapes_and_config_match_ours() {
    for name in FIXTURES {
        let f = fixture(name);
        let adapter = ours(&f);

        let (peft_tensors, peft_meta) = layout(&f.weights);
        let (our_tensors, our_meta) = layout(&peft::encode_weights(&adapter));
        let peft_keys: BTreeSet<_> = peft_tensors.keys().collect();
        let our_keys: BTreeSet<_> = our_tensors.keys().collect();
        assert_eq!(
            our_keys
                .symmetric_difference(&peft_keys)
                .collect::<Vec<_>>(),
            Vec::<&&String>::new(),
            "{name}: tensor keys differ (ours vs PEFT's)"
        );
        assert_eq!(our_tensors, peft_tensors, "{name}: dtypes or shapes differ");
        assert_eq!(
            our_meta,
            Some(BTreeMap::from([("format".to_string(), "pt".to_string())]))
        );
        assert_eq!(our_meta, peft_meta, "{name}: safetensors metadata differs");

        let our_text = peft::encode_config(adapter.config());
        let ours = normalised_config(&our_text);
        let theirs = normalised_config(&f.config);
        let our_keys: BTreeSet<_> = ours.as_object().unwrap().keys().collect();
        let their_keys: BTreeSet<_> = theirs.as_object().unwrap().keys().collect();
        assert_eq!(
            our_keys
                .symmetric_difference(&their_keys)
                .collect::<Vec<_>>(),
            Vec::<&&String>::new(),
            "{name}: adapter_config.json keys differ"
        );
        for key in their_keys {
            assert_eq!(
                ours[key], theirs[key],
                "{name}: adapter_config.json `{key}`"
            );
        }
        // Written as PEFT writes it: keys sorted, target_modules sorted (PEFT's order is a
        // set's), and no environment key Mekong cannot know.
        let raw: Value = serde_json::from_str(&our_text).unwrap();
        assert_eq!(raw["target_modules"], ours["target_modules"]);
        for key in ENVIRONMENT_KEYS {
            assert!(raw.get(key).is_none(), "{name}: we wrote `{key}`");
        }
        let positions: Vec<usize> = raw
            .as_object()
            .unwrap()
            .keys()
            .map(|k| our_text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(positions.is_sorted(), "{name}: keys are not written sorted");
    }
}

/// Reading PEFT's files gives PEFT's settings and exactly the values the script set.
#[test]
fn peft_fixture_imports_with_the_values_peft_saved() {
    for name in FIXTURES {
        let f = fixture(name);
        let adapter = peft::read_dir(&fixture_dir(name)).unwrap();
        let config = adapter.config();
        assert_eq!(config.rank, f.record.r, "{name}");
        assert_eq!(config.alpha, f.record.lora_alpha, "{name}");
        assert_eq!(config.dropout, f.record.lora_dropout, "{name}");
        assert_eq!(config.base_model, f.record.base_model, "{name}");
        let model = model_spec(&f.record.base_model);
        let lora = lora_spec(&f.record);
        assert_eq!(*config, lora.adapter_config(&model.name), "{name}");
        let shapes = model.lora_modules(&lora.target_modules);
        assert_eq!(adapter.modules().len(), shapes.len(), "{name}");
        for (shape, (module, m)) in shapes.iter().zip(adapter.modules()) {
            assert_eq!(*module, shape.name, "{name}");
            assert_eq!(
                m.a.shape(),
                [f.record.r, shape.in_features],
                "{name} {module}"
            );
            assert_eq!(
                m.b.shape(),
                [shape.out_features, f.record.r],
                "{name} {module}"
            );
            assert_eq!(
                m.a.data(),
                expected_values(module, true, m.a.data().len()),
                "{name} {module} A"
            );
            assert_eq!(
                m.b.data(),
                expected_values(module, false, m.b.data().len()),
                "{name} {module} B"
            );
        }
        assert_eq!(adapter, ours(&f), "{name}");
    }
}

/// PEFT → Mekong → bytes → Mekong loses nothing, and the bytes Mekong writes for PEFT's
/// adapter are PEFT's own safetensors file, byte for byte (both sides use safetensors 0.8's
/// serializer; if a safetensors upgrade changes header padding this last check is the one to
/// revisit, the layout check above is the contract).
#[test]
fn peft_fixture_round_trips_losslessly() {
    for name in FIXTURES {
        let f = fixture(name);
        let config = peft::decode_config(&f.config).unwrap();
        let adapter = peft::decode_weights(&f.weights, config).unwrap();
        let weights = peft::encode_weights(&adapter);
        let json = peft::encode_config(adapter.config());
        let back = peft::decode_weights(&weights, peft::decode_config(&json).unwrap()).unwrap();
        assert_eq!(back, adapter, "{name}");
        assert_eq!(back.config(), adapter.config(), "{name}");
        assert_eq!(back.content_hash(), adapter.content_hash(), "{name}");
        assert!(
            weights == f.weights,
            "{name}: our safetensors bytes differ from PEFT's"
        );

        let dir = tempfile::tempdir().unwrap();
        peft::write_dir(dir.path(), &adapter).unwrap();
        assert_eq!(peft::read_dir(dir.path()).unwrap(), adapter, "{name}");
    }
}

fn refusal(config: &Value) -> AdapterError {
    peft::decode_config(&config.to_string()).expect_err(&config.to_string())
}

/// Settings Mekong cannot reproduce exactly are refused, and the error names the key.
#[test]
fn peft_settings_mekong_cannot_reproduce_are_refused_by_key() {
    let base: Value = serde_json::from_str(&fixture("tiny-qwen2-all").config).unwrap();
    let cases: Vec<(&str, Value)> = vec![
        ("peft_type", json!("IA3")),
        ("task_type", json!("SEQ_CLS")),
        ("r", json!(0)),
        ("r", json!(4.5)),
        ("lora_alpha", json!(0)),
        ("lora_alpha", json!("8")),
        ("lora_dropout", json!(1.0)),
        ("lora_dropout", json!(-0.1)),
        ("target_modules", json!(".*\\.q_proj")),
        ("target_modules", json!(["q_proj", "lm_head"])),
        ("target_modules", json!([])),
        ("base_model_name_or_path", json!(7)),
        ("use_dora", json!(true)),
        ("use_rslora", json!(true)),
        ("fan_in_fan_out", json!(true)),
        ("bias", json!("all")),
        ("bias", json!("lora_only")),
        ("rank_pattern", json!({"q_proj": 8})),
        (
            "alpha_pattern",
            json!({"model.layers.0.self_attn.q_proj": 16}),
        ),
        ("layers_to_transform", json!([0])),
        ("layers_to_transform", json!(1)),
        ("modules_to_save", json!(["lm_head"])),
        ("exclude_modules", json!(["model.layers.1.mlp.down_proj"])),
        ("exclude_modules", json!(".*down_proj")),
        ("lora_bias", json!(true)),
        ("target_parameters", json!(["mlp.experts.gate_up_proj"])),
        ("trainable_token_indices", json!([1, 2])),
        ("layer_replication", json!([[0, 2], [1, 2]])),
        ("use_qalora", json!(true)),
        ("megatron_config", json!({"tensor_model_parallel_size": 2})),
        ("alora_invocation_tokens", json!([5, 6])),
        ("arrow_config", json!({"top_k": 3})),
        ("use_bdlora", json!({"nblocks": 2})),
        ("velora_config", json!({"rank": 2})),
        ("monteclora_config", json!({"n_samples": 2})),
        ("kasa_config", json!({"beta": 1})),
        ("init_lora_weights", json!("pissa")),
        ("init_lora_weights", json!("pissa_niter_4")),
        ("init_lora_weights", json!("olora")),
        ("init_lora_weights", json!("corda")),
        ("init_lora_weights", json!("loftq")),
        ("init_lora_weights", json!("lora_ga")),
        ("init_lora_weights", json!("mica")),
        // A key from a newer PEFT, switched on.
        ("use_some_future_variant", json!(true)),
    ];
    for (key, value) in cases {
        let mut config = base.clone();
        config[key] = value.clone();
        let err = refusal(&config);
        assert!(
            matches!(&err, AdapterError::ConfigKey { key: k, .. } if k == key),
            "{key} = {value}: wrong error {err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&format!("`{key}`")), "{message}");
        assert!(message.contains(CONFIG_FILE), "{message}");
    }
    // A missing peft_type or r is named too.
    for key in ["peft_type", "r", "target_modules", "lora_alpha"] {
        let mut config = base.clone();
        config.as_object_mut().unwrap().remove(key);
        let err = refusal(&config);
        assert!(
            matches!(&err, AdapterError::ConfigKey { key: k, .. } if k == key),
            "without {key}: {err:?}"
        );
    }
    // Read from a directory, the error names the file's path as well as the key.
    let dir = tempfile::tempdir().unwrap();
    let mut config = base.clone();
    config["use_dora"] = json!(true);
    fs::write(dir.path().join(CONFIG_FILE), config.to_string()).unwrap();
    fs::write(
        dir.path().join(WEIGHTS_FILE),
        fixture("tiny-qwen2-all").weights,
    )
    .unwrap();
    let message = peft::read_dir(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains(&dir.path().join(CONFIG_FILE).display().to_string()),
        "{message}"
    );
    assert!(message.contains("`use_dora`"), "{message}");
}

/// What is not refused: off values PEFT itself treats as off, environment keys with any value,
/// initialisations that leave the base alone, unknown keys that are off, and an old PEFT
/// config without the keys newer versions added.
#[test]
fn peft_settings_that_change_nothing_are_accepted() {
    let base: Value = serde_json::from_str(&fixture("tiny-qwen2-all").config).unwrap();
    let expected = peft::decode_config(&base.to_string()).unwrap();
    let cases: Vec<(&str, Value)> = vec![
        ("peft_version", json!("0.99.0@abc")),
        ("revision", json!("main")),
        ("inference_mode", json!(false)),
        ("task_type", Value::Null),
        ("modules_to_save", json!([])),
        ("exclude_modules", json!([])),
        ("layers_to_transform", Value::Null),
        ("rank_pattern", Value::Null),
        ("use_bdlora", json!(false)),
        ("init_lora_weights", json!(false)),
        ("init_lora_weights", json!("gaussian")),
        ("init_lora_weights", json!("eva")),
        ("init_lora_weights", json!("orthogonal")),
        ("eva_config", json!({"rho": 2.0})),
        ("qalora_group_size", json!(32)),
        ("use_some_future_variant", json!(false)),
        ("some_future_config", Value::Null),
        (
            "target_modules",
            json!([
                "up_proj",
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "down_proj",
                "q_proj"
            ]),
        ),
    ];
    for (key, value) in cases {
        let mut config = base.clone();
        config[key] = value.clone();
        let got = peft::decode_config(&config.to_string())
            .unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        assert_eq!(got, expected, "{key} = {value}");
    }
    // An adapter saved by an old PEFT (0.6-era keys only), lora_dropout absent.
    let old = json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "x",
        "bias": "none", "fan_in_fan_out": false, "inference_mode": true,
        "init_lora_weights": true, "modules_to_save": null, "revision": null
    });
    let got = peft::decode_config(&old.to_string()).unwrap();
    assert_eq!(got.dropout, 0.0);
    assert_eq!(got.target_modules, vec![TargetModule::Q, TargetModule::V]);
}

/// Writes Mekong's export of every fixture's adapter (built from scratch, as in
/// `peft_fixture_keys_shapes_and_config_match_ours`) to `$MEKONG_PEFT_EXPORT/<name>/`, for
/// `scripts/check_peft_loads.py` to load into Python PEFT:
///
/// ```text
/// MEKONG_PEFT_EXPORT=/tmp/mekong-peft cargo test -p fedcore --test peft_interop -- --ignored
/// python scripts/check_peft_loads.py /tmp/mekong-peft
/// ```
#[test]
#[ignore = "writes files for scripts/check_peft_loads.py; run by hand"]
fn export_ours_for_python_peft() {
    let root = std::env::var_os("MEKONG_PEFT_EXPORT")
        .map(PathBuf::from)
        .expect("set MEKONG_PEFT_EXPORT to the directory to write the adapters into");
    for name in FIXTURES {
        let f = fixture(name);
        let dir = root.join(name);
        peft::write_dir(&dir, &ours(&f)).unwrap();
        fs::copy(
            fixture_dir(name).join("fixture.json"),
            dir.join("fixture.json"),
        )
        .unwrap();
        println!("wrote {}", dir.display());
    }
}
