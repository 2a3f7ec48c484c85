//! Numerical parity with an independent implementation: tiny random Llama-family checkpoints
//! written by Hugging Face transformers (scripts/make_tiny_checkpoints.py), whose logits for a
//! fixed input transformers computed on CPU in f32 and committed beside them (and a GGUF
//! conversion of a tiny Llama, with logits transformers computed from the `.gguf`). Our burn model,
//! loaded from the same files, must reproduce every logit within 1e-4.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedclient::checkpoint::{self, CheckpointFormat};
use fedclient::model::LoraLlama;
use fedcore::{LoraSpec, TargetModule};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn lora() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        target_modules: TargetModule::ALL.to_vec(),
        a_seed: 3,
        dropout: 0.0,
    }
}

fn ids_tensor(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

/// Max |ours − reference| over every logit of the fixture's input: the checkpoint at `dir`
/// (or `dir/file` when given), the reference in `dir/reference.json`.
fn max_logit_error(dir: &Path) -> f64 {
    max_logit_error_of(dir, dir, CheckpointFormat::HfSafetensors)
}

fn max_logit_error_of(dir: &Path, checkpoint_path: &Path, format: CheckpointFormat) -> f64 {
    let reference: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids: Vec<i64> = reference["input_ids"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let expected: Vec<Vec<f64>> = reference["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();

    let device = Device::flex();
    let ckpt = checkpoint::open(checkpoint_path).unwrap();
    assert_eq!(ckpt.format, format);
    let model = LoraLlama::from_checkpoint(&ckpt, &lora(), &device).unwrap();
    let logits = model
        .forward(ids_tensor(&ids, &device))
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    let vocab = ckpt.spec.vocab_size;
    assert_eq!(logits.len(), ids.len() * vocab);
    assert_eq!(expected.len(), ids.len());
    let mut max = 0f64;
    for (t, row) in expected.iter().enumerate() {
        for (v, e) in row.iter().enumerate() {
            max = max.max((logits[t * vocab + v] as f64 - e).abs());
        }
    }
    // The logits are not trivially small, so the comparison can fail.
    let spread = expected.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        spread > 0.5,
        "reference logits too small to test anything: {spread}"
    );
    max
}

/// Logits of `doc_a` and `doc_b` packed in one row (positions restarting, attention kept
/// within each), the same documents run one at a time and concatenated, and the two run as
/// one unpacked row.
fn packed_separate_unpacked(
    model: &LoraLlama,
    doc_a: &[i64],
    doc_b: &[i64],
    device: &Device,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let alone = |doc: &[i64]| {
        model
            .forward(ids_tensor(doc, device))
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let separate: Vec<f32> = [alone(doc_a), alone(doc_b)].concat();
    let tokens: Vec<i64> = [doc_a, doc_b].concat();
    let positions: Vec<i64> = (0..doc_a.len() as i64)
        .chain(0..doc_b.len() as i64)
        .collect();
    let segments: Vec<i64> = std::iter::repeat_n(0, doc_a.len())
        .chain(std::iter::repeat_n(1, doc_b.len()))
        .collect();
    let packed = model
        .forward_packed(
            ids_tensor(&tokens, device),
            ids_tensor(&positions, device),
            ids_tensor(&segments, device),
        )
        .into_data()
        .try_into_vec_as::<f32>()
        .unwrap();
    (packed, separate, alone(&tokens))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn qwen2_with_biases_and_gqa_matches_transformers() {
    let err = max_logit_error(&fixture("tiny-qwen2"));
    eprintln!("tiny-qwen2: max |Δlogit| = {err:e}");
    assert!(err < 1e-4, "max logit error {err}");
}

#[test]
fn sharded_bf16_checkpoint_matches_transformers() {
    let err = max_logit_error(&fixture("tiny-qwen2-bf16"));
    eprintln!("tiny-qwen2-bf16: max |Δlogit| = {err:e}");
    assert!(err < 1e-4, "max logit error {err}");
}

#[test]
fn llama_tied_head_dim_and_llama3_rope_scaling_match_transformers() {
    let dir = fixture("tiny-llama3");
    let ckpt = checkpoint::open(&dir).unwrap();
    assert!(ckpt.spec.tie_word_embeddings);
    assert_eq!(ckpt.spec.head_dim(), 24);
    assert!(ckpt.spec.rope_scaling.is_some());
    let err = max_logit_error(&dir);
    eprintln!("tiny-llama3: max |Δlogit| = {err:e}");
    assert!(err < 1e-4, "max logit error {err}");
}

/// Gemma 3 (text): (1 + w) norms on both sides of attention and MLP, query/key norms, GeGLU,
/// scaled embeddings, `query_pre_attn_scalar`, and sliding-window layers (window 5 on a
/// 16-token input) with their own RoPE base beside a global one.
#[test]
fn gemma3_sandwich_norms_and_sliding_window_match_transformers() {
    let dir = fixture("tiny-gemma3");
    let ckpt = checkpoint::open(&dir).unwrap();
    let g = ckpt.spec.architecture.gemma3().expect("a Gemma 3 spec");
    assert_eq!(g.full_attention_layers, vec![2]);
    assert_eq!(g.sliding_window, 5);
    assert_eq!(g.rope_local_theta, 10_000.0);
    assert_eq!(g.query_pre_attn_scalar, 24.0);
    assert_eq!(ckpt.spec.rope_theta, 1e6);
    assert_eq!(ckpt.spec.head_dim(), 16);
    assert!(ckpt.spec.tie_word_embeddings);
    let err = max_logit_error(&dir);
    eprintln!("tiny-gemma3: max |Δlogit| = {err:e}");
    assert!(err < 1e-4, "max logit error {err}");
}

/// Packing holds with sliding windows too: documents longer than the window, packed in one
/// row, give the logits each gives alone.
#[test]
fn gemma3_packed_documents_match_separate_ones() {
    let device = Device::flex();
    let ckpt = checkpoint::open(&fixture("tiny-gemma3")).unwrap();
    let model = LoraLlama::from_checkpoint(&ckpt, &lora(), &device).unwrap();
    let doc_a: Vec<i64> = vec![2, 17, 42, 99, 3, 8, 61];
    let doc_b: Vec<i64> = vec![2, 64, 101, 11, 7, 7, 120, 33, 5];
    let (packed, expected, _) = packed_separate_unpacked(&model, &doc_a, &doc_b, &device);
    let max = max_abs_diff(&packed, &expected);
    assert!(max < 1e-5, "packed vs separate: {max}");
}

/// A GGUF checkpoint builds the same model transformers builds from it: the tiny Llama of
/// `scripts/make_tiny_gguf.py`, converted the way llama.cpp converts (q/k rows permuted,
/// F16/BF16/Q8_0 storage), with logits transformers computed from the `.gguf` itself
/// (dequantised by gguf-py, un-permuted by transformers' own code).
#[test]
fn tiny_llama_gguf_logits_match_transformers() {
    let dir = fixture("tiny-llama-gguf");
    let err = max_logit_error_of(&dir, &dir.join("tiny-llama.gguf"), CheckpointFormat::Gguf);
    eprintln!("tiny-llama-gguf: max |Δlogit| = {err:e}");
    assert!(err < 1e-4, "max logit error {err}");
}

/// Two documents packed in one row give the same logits as each run on its own: attention
/// does not cross the boundary and positions restart.
#[test]
fn packed_documents_do_not_see_each_other() {
    let device = Device::flex();
    let ckpt = checkpoint::open(&fixture("tiny-qwen2")).unwrap();
    let model = LoraLlama::from_checkpoint(&ckpt, &lora(), &device).unwrap();
    let doc_a: Vec<i64> = vec![5, 17, 42, 99, 3];
    let doc_b: Vec<i64> = vec![8, 64, 101, 11, 7, 7, 120];
    let (packed, expected, unpacked) = packed_separate_unpacked(&model, &doc_a, &doc_b, &device);
    let max = max_abs_diff(&packed, &expected);
    assert!(max < 1e-5, "packed vs separate: {max}");

    // Without the segment mask the second document would see the first: the test can fail.
    let leak = max_abs_diff(
        &unpacked[doc_a.len() * 128..],
        &expected[doc_a.len() * 128..],
    );
    assert!(
        leak > 1e-3,
        "the fixture cannot tell packed from unpacked: {leak}"
    );
}

#[test]
fn missing_tensor_and_bad_shape_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-qwen2");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    // A checkpoint whose file lacks one tensor.
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    let ckpt = checkpoint::open(dir.path()).unwrap();
    let err = LoraLlama::from_checkpoint(&ckpt, &lora(), &Device::flex()).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.1.mlp.up_proj.weight"),
        "{err}"
    );

    // A config that disagrees with the tensors' shapes.
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["intermediate_size"] = 72.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let ckpt = checkpoint::open(dir.path()).unwrap();
    let err = LoraLlama::from_checkpoint(&ckpt, &lora(), &Device::flex()).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("gate_proj.weight") && msg.contains("[72, 32]"),
        "{msg}"
    );

    // A truncated weights file.
    let half = &bytes[..bytes.len() / 2];
    std::fs::write(dir.path().join("model.safetensors"), half).unwrap();
    let err = checkpoint::open(dir.path()).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

/// A federation plan pins its base checkpoint: the right one loads, anything else is named.
#[test]
fn plans_pin_their_base_checkpoint() {
    let device = Device::flex();
    let ckpt = checkpoint::open(&fixture("tiny-qwen2")).unwrap();
    let pinned = ckpt.spec.clone();
    assert_eq!(pinned.weights_sha256.as_ref().unwrap().len(), 64);
    LoraLlama::for_plan(&pinned, &lora(), Some(&ckpt), &device).unwrap();

    // The bf16 copy holds other bytes: another fingerprint.
    let other = checkpoint::open(&fixture("tiny-qwen2-bf16")).unwrap();
    let err = LoraLlama::for_plan(&pinned, &lora(), Some(&other), &device).unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");

    let mut wider = pinned.clone();
    wider.intermediate_size = 80;
    let err = LoraLlama::for_plan(&wider, &lora(), Some(&ckpt), &device).unwrap_err();
    assert!(
        err.to_string().contains("model.intermediate_size is 80"),
        "{err}"
    );

    let err = LoraLlama::for_plan(&pinned, &lora(), None, &device).unwrap_err();
    assert!(err.to_string().contains("pins a pretrained base"), "{err}");

    let mut random = pinned.clone();
    random.weights_sha256 = None;
    let err = LoraLlama::for_plan(&random, &lora(), Some(&ckpt), &device).unwrap_err();
    assert!(err.to_string().contains("no model.weights_sha256"), "{err}");
}
