//! A GGUF checkpoint builds the same model transformers builds from it: the tiny Llama of
//! `scripts/make_tiny_gguf.py`, converted the way llama.cpp converts (q/k rows permuted,
//! F16/BF16/Q8_0 storage), with logits transformers computed from the `.gguf` itself
//! (dequantised by gguf-py, un-permuted by transformers' own code) committed beside it. Our burn
//! model, loaded through `checkpoint::open`, must reproduce every logit within 1e-4.

use std::path::Path;

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedclient::checkpoint::{self, CheckpointFormat};
use fedclient::model::LoraLlama;
use fedcore::{LoraSpec, TargetModule};
use serde_json::Value;

#[test]
fn tiny_llama_gguf_logits_match_transformers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-gguf");
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<i64> = reference["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let expected: Vec<f64> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();

    let ckpt = checkpoint::open(&dir.join("tiny-llama.gguf")).unwrap();
    assert_eq!(ckpt.format, CheckpointFormat::Gguf);
    let lora = LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: TargetModule::ALL.to_vec(),
        a_seed: 3,
        dropout: 0.0,
    };
    let device = Device::flex();
    let model = LoraLlama::from_checkpoint(&ckpt, &lora, &device).unwrap();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), &device);
    let logits = model
        .forward(input)
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    assert_eq!(logits.len(), expected.len());
    assert_eq!(logits.len(), ids.len() * ckpt.spec.vocab_size);
    let spread = expected.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(spread > 0.5, "reference logits too small to test anything");
    let err = logits
        .iter()
        .zip(&expected)
        .fold(0f64, |m, (g, e)| m.max((*g as f64 - e).abs()));
    eprintln!("tiny-llama-gguf: max |Δlogit| = {err:e}");
    assert!(err < 1e-4, "max logit error {err}");
}
