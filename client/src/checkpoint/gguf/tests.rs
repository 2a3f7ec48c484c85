//! Tests of the GGUF reader against references produced by independent code: gguf-py's
//! dequantisation (`scripts/gguf_dequant_vectors.py`), a tiny Llama converted the way llama.cpp
//! converts (`scripts/make_tiny_gguf.py`), transformers' GGUF tokenizer
//! (`scripts/gguf_tokenizer_reference.py`, with SmolLM2 from `scripts/fetch-model.sh`), and
//! small broken files written by [`super::test_writer`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value as Json;

use super::dequant::{self, GgmlType};
use super::reader::{Array, GgufFile, Value};
use super::test_writer::GgufBuilder;
use super::{GgufWeights, names};
use crate::checkpoint::{self, CheckpointFormat, WeightSource};
use crate::error::CheckpointError;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Dequantisation

/// Every supported type, on blocks of fixed random bytes, equals gguf-py's dequantisation bit
/// for bit (the arithmetic is the same sequence of f32 operations, so 0 ulp is expected).
#[test]
fn dequant_matches_gguf_py() {
    let fixture = read_json(&fixtures().join("gguf/dequant.json"));
    let mut seen = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let name = case["type"].as_str().unwrap();
        let t = GgmlType::from_id(case["ggml_type"].as_u64().unwrap() as u32).unwrap();
        assert_eq!(t.name(), name);
        let bytes = hex::decode(case["bytes"].as_str().unwrap()).unwrap();
        let expected: Vec<u32> = case["expected_bits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(expected.len() as u64, case["elements"].as_u64().unwrap());
        let got = dequant::dequantize(t, &bytes).unwrap();
        assert_eq!(got.len(), expected.len(), "{name}");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(
                g.to_bits(),
                *e,
                "{name} element {i}: got {g}, gguf-py {}",
                f32::from_bits(*e)
            );
        }
        seen.push(name.to_string());
    }
    assert_eq!(
        seen.join(", "),
        dequant::SUPPORTED,
        "the fixture covers every supported type"
    );
}

// ---------------------------------------------------------------------------------------------
// The tiny Llama: HF directory and its GGUF conversion

fn tiny_dir() -> PathBuf {
    fixtures().join("tiny-llama-gguf")
}

/// ggml's `quantize_row_q8_0_ref` followed by dequantisation: what the converter stored.
fn q8_0_roundtrip(row: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(row.len());
    for block in row.chunks_exact(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        let stored_d = f16::from_f32(d).to_f32();
        // `np_roundf`/`roundf`: half away from zero, which is what f32::round does.
        // Through int8 as ggml stores it, so that -0.4 becomes +0.0, not -0.0.
        out.extend(
            block
                .iter()
                .map(|v| f32::from((v * id).round() as i8) * stored_d),
        );
    }
    out
}

/// What storing `values` as `t` and reading them back gives.
fn stored_as(t: GgmlType, values: &[f32]) -> Vec<f32> {
    match t.name() {
        "F32" => values.to_vec(),
        "F16" => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
        "BF16" => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        "Q8_0" => q8_0_roundtrip(values),
        other => panic!("the tiny fixture has no {other} tensors"),
    }
}

/// Every tensor of the GGUF, read through the checkpoint's `WeightSource`, equals the Hugging
/// Face tensor after the same rounding to its stored type: names, dimension order and the
/// undoing of llama.cpp's q/k permutation are all right. The q/k tensors of this model are not
/// symmetric under the permutation, so a missing or wrong un-permutation fails here.
#[test]
fn tiny_llama_gguf_matches_hf_tensors() {
    let dir = tiny_dir();
    let gguf_path = dir.join("tiny-llama.gguf");
    let gguf = checkpoint::open(&gguf_path).unwrap();
    let hf = checkpoint::open(&dir).unwrap();
    assert_eq!(gguf.format, CheckpointFormat::Gguf);
    assert_eq!(gguf.weights.names(), hf.weights.names());

    let file = GgufFile::open(&gguf_path).unwrap();
    let stored: BTreeMap<String, &super::reader::TensorInfo> = file
        .tensors
        .iter()
        .map(|t| {
            (
                names::hf_name(&t.name, super::spec::Arch::Llama)
                    .unwrap()
                    .hf,
                t,
            )
        })
        .collect();
    let mut kinds = std::collections::BTreeSet::new();
    for name in hf.weights.names() {
        let want = hf.weights.tensor(&name).unwrap();
        let got = gguf.weights.tensor(&name).unwrap();
        assert_eq!(got.shape, want.shape, "{name}");
        let info = stored[&name];
        let t = info.ggml_type;
        kinds.insert(t.name());
        let expected = stored_as(t, &want.data);
        let mismatches = got
            .data
            .iter()
            .zip(&expected)
            .filter(|(g, e)| g.to_bits() != e.to_bits())
            .count();
        assert_eq!(mismatches, 0, "{name} ({}): values differ", t.name());
        if name.contains("q_proj") || name.contains("k_proj") {
            // The rows as stored are in llama.cpp's interleaved order, so the un-permutation
            // above did something.
            let raw = dequant::dequantize(t, &file.read_tensor_bytes(info).unwrap()).unwrap();
            assert_ne!(raw, got.data, "{name}: the stored rows are permuted");
        }
    }
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        vec!["BF16", "F16", "F32", "Q8_0"]
    );

    // The architecture agrees with config.json (the GGUF states no head_dim, as it is the
    // default hidden / heads).
    let (g, h) = (&gguf.spec, &hf.spec);
    assert_eq!(
        (
            g.vocab_size,
            g.hidden_size,
            g.intermediate_size,
            g.num_hidden_layers
        ),
        (
            h.vocab_size,
            h.hidden_size,
            h.intermediate_size,
            h.num_hidden_layers
        )
    );
    assert_eq!(
        (
            g.num_attention_heads,
            g.num_key_value_heads,
            g.max_position_embeddings
        ),
        (
            h.num_attention_heads,
            h.num_key_value_heads,
            h.max_position_embeddings
        )
    );
    assert_eq!(
        (g.rope_theta, g.rms_norm_eps),
        (h.rope_theta, h.rms_norm_eps)
    );
    assert_eq!(
        (g.tie_word_embeddings, g.qkv_bias, g.o_bias, g.mlp_bias),
        (false, false, false, false)
    );
    assert_eq!(g.head_dim, None);
    assert_eq!(h.head_dim, Some(8));
    assert!(g.rope_scaling.is_none());
    assert_eq!(g.name, "tiny-llama-gguf");
    assert_eq!(
        g.weights_sha256,
        Some(crate::checkpoint::fingerprint::checkpoint_fingerprint(&[&gguf_path]).unwrap())
    );
}

/// The SentencePiece ("llama") tokenizer rebuilt from the tiny GGUF's vocabulary and scores
/// gives transformers' ids, with and without BOS, and its decoding.
#[test]
fn tiny_llama_gguf_tokenizer_matches_transformers() {
    let ckpt = checkpoint::open(&tiny_dir().join("tiny-llama.gguf")).unwrap();
    let tok = ckpt.tokenizer.as_ref().unwrap();
    let reference = read_json(&tiny_dir().join("tokenizer-reference.json"));
    assert_eq!(tok.bos_token.as_deref(), reference["bos_token"].as_str());
    assert_eq!(tok.eos_token.as_deref(), reference["eos_token"].as_str());
    assert!(tok.chat_template.as_deref().unwrap().contains("messages"));
    let ids = |v: &Json| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let plain = tok.tokenizer.encode(text, false).unwrap();
        assert_eq!(plain.get_ids(), ids(&case["ids"]), "{text:?}");
        let special = tok.tokenizer.encode(text, true).unwrap();
        assert_eq!(
            special.get_ids(),
            ids(&case["ids_with_special"]),
            "{text:?} with BOS"
        );
        let decoded = tok.tokenizer.decode(plain.get_ids(), false).unwrap();
        assert_eq!(decoded, case["decoded"].as_str().unwrap(), "{text:?}");
    }
}

/// A character the SentencePiece vocabulary cannot spell (no byte piece for it) becomes
/// `<unk>`, as in SentencePiece and llama.cpp (transformers' conversion drops it silently).
#[test]
fn sentencepiece_unknown_character_is_unk() {
    let ckpt = checkpoint::open(&tiny_dir().join("tiny-llama.gguf")).unwrap();
    let tok = &ckpt.tokenizer.as_ref().unwrap().tokenizer;
    let ids = tok.encode("a 7 b", false).unwrap().get_ids().to_vec();
    assert!(ids.contains(&0), "{ids:?}");
    // The one byte piece the vocabulary has is used for the newline.
    let nl = tok.token_to_id("<0x0A>").unwrap();
    assert!(tok.encode("a\nb", false).unwrap().get_ids().contains(&nl));
}

// ---------------------------------------------------------------------------------------------
// SmolLM2 (a real GGUF): needs scripts/fetch-model.sh

const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The SmolLM2 GGUF in `$MEKONG_MODEL_DIR` or `~/.cache/mekong/models`. Absent: a failure when
/// `MEKONG_REQUIRE_MODEL=1`, else `None` after printing SKIPPED.
fn smollm2(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("MEKONG_MODEL_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/mekong/models"))
        });
    let path = dir.map(|d| d.join(SMOLLM2));
    match path {
        Some(p) if p.is_file() => Some(p),
        other => {
            let msg = format!(
                "{test}: {SMOLLM2} not found (looked at {:?}); run scripts/fetch-model.sh",
                other
            );
            if std::env::var("MEKONG_REQUIRE_MODEL").as_deref() == Ok("1") {
                panic!("{msg} (MEKONG_REQUIRE_MODEL=1)");
            }
            println!("SKIPPED {msg}");
            None
        }
    }
}

/// Token ids of the first 3000 characters of each UDHR language equal the reference (see
/// scripts/gguf_tokenizer_reference.py), and decoding gives the text back.
#[test]
fn smollm2_udhr_token_ids_match_reference() {
    let Some(path) = smollm2("smollm2_udhr_token_ids_match_reference") else {
        return;
    };
    let reference = read_json(&fixtures().join("gguf/smollm2-udhr-ids.json"));
    let chars = reference["chars"].as_u64().unwrap() as usize;
    let file = GgufFile::open(&path).unwrap();
    let tok = super::tokenizer::tokenizer_from_metadata(&file)
        .unwrap()
        .unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(
        tok.chat_template
            .as_deref()
            .unwrap()
            .contains("<|im_start|>")
    );
    let udhr = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/udhr");
    let languages = reference["languages"].as_object().unwrap();
    assert_eq!(languages.len(), 9);
    for (lang, entry) in languages {
        let text: String = std::fs::read_to_string(udhr.join(format!("{lang}.txt")))
            .unwrap()
            .chars()
            .take(chars)
            .collect();
        let expected: Vec<u32> = entry["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let got = tok.tokenizer.encode(text.as_str(), false).unwrap();
        let got = got.get_ids();
        if got != expected.as_slice() {
            let at = got
                .iter()
                .zip(&expected)
                .take_while(|(a, b)| a == b)
                .count();
            panic!(
                "{lang}: {} ids, reference {}; first difference at {at}: {:?} vs {:?}",
                got.len(),
                expected.len(),
                &got[at..(at + 5).min(got.len())],
                &expected[at..(at + 5).min(expected.len())]
            );
        }
        assert_eq!(tok.tokenizer.decode(got, false).unwrap(), text, "{lang}");
    }
    // Special tokens stay whole, as the chat template needs.
    let im_start = tok.tokenizer.token_to_id("<|im_start|>").unwrap();
    let ids = tok.tokenizer.encode("<|im_start|>user\nHi", false).unwrap();
    assert_eq!(ids.get_ids()[0], im_start);
}

/// SmolLM2 opens as the research notes describe it, every tensor converts to finite values of
/// the shape the architecture implies, and opening and loading take reasonable time.
#[test]
fn smollm2_opens_and_loads() {
    let Some(path) = smollm2("smollm2_opens_and_loads") else {
        return;
    };
    let reference = read_json(&fixtures().join("gguf/smollm2-udhr-ids.json"));
    let start = std::time::Instant::now();
    let ckpt = checkpoint::open(&path).unwrap();
    let opened = start.elapsed();
    let s = &ckpt.spec;
    assert_eq!(
        (
            s.num_hidden_layers,
            s.hidden_size,
            s.intermediate_size,
            s.vocab_size
        ),
        (30, 576, 1536, 49152)
    );
    assert_eq!((s.num_attention_heads, s.num_key_value_heads), (9, 3));
    assert!(s.tie_word_embeddings && !s.qkv_bias);
    assert_eq!((s.rope_theta, s.max_position_embeddings), (100_000.0, 8192));
    // The plan's fingerprint is over the file's bytes, whose SHA-256 the fixture records.
    let file_sha = hex::encode(crate::checkpoint::fingerprint::file_sha256(&path).unwrap());
    assert_eq!(Some(file_sha.as_str()), reference["model_sha256"].as_str());

    let load = std::time::Instant::now();
    let names = ckpt.weights.names();
    assert_eq!(names.len(), 2 + 30 * 9);
    let mut values = 0usize;
    for name in &names {
        let t = ckpt.weights.tensor(name).unwrap();
        assert!(t.data.iter().all(|v| v.is_finite()), "{name}");
        values += t.data.len();
    }
    let loaded = load.elapsed();
    assert_eq!(values, 134_515_008);
    println!(
        "SmolLM2-135M Q4_1: open (header, tokenizer, SHA-256 fingerprint) {opened:.2?}, \
         dequantise all {} tensors ({values} values) {loaded:.2?}",
        names.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Files written here: metadata types, un-permutation, and what bad files give

fn s(v: &str) -> Value {
    Value::Str(v.to_string())
}

/// The metadata a minimal valid llama file needs, for a 2-layer model of width 8.
fn llama_meta(b: GgufBuilder) -> GgufBuilder {
    b.kv("general.architecture", s("llama"))
        .kv("general.name", s("unit"))
        .kv("llama.block_count", Value::U32(1))
        .kv("llama.context_length", Value::U32(16))
        .kv("llama.embedding_length", Value::U32(8))
        .kv("llama.feed_forward_length", Value::U32(16))
        .kv("llama.attention.head_count", Value::U32(2))
        .kv("llama.attention.head_count_kv", Value::U32(1))
        .kv("llama.rope.freq_base", Value::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
}

fn seq(n: usize) -> Vec<f32> {
    (0..n).map(|v| v as f32).collect()
}

/// A small llama file with an embedding and the q/k tensors of block 0.
fn tiny_llama_builder() -> GgufBuilder {
    llama_meta(GgufBuilder::new())
        .f32_tensor("token_embd.weight", &[8, 4], &seq(32))
        .f32_tensor("blk.0.attn_q.weight", &[8, 8], &seq(64))
        .f32_tensor("blk.0.attn_k.weight", &[8, 4], &seq(32))
        .f32_tensor("blk.0.attn_k.bias", &[4], &seq(4))
}

#[test]
fn reads_every_metadata_type() {
    let dir = tempfile::tempdir().unwrap();
    let values = vec![
        ("a.u8", Value::U8(200)),
        ("a.i8", Value::I8(-5)),
        ("a.u16", Value::U16(60000)),
        ("a.i16", Value::I16(-300)),
        ("a.u32", Value::U32(4_000_000_000)),
        ("a.i32", Value::I32(-7)),
        ("a.f32", Value::F32(1.5)),
        ("a.bool", Value::Bool(true)),
        ("a.str", s("ຄວາມ")),
        ("a.u64", Value::U64(1 << 40)),
        ("a.i64", Value::I64(-(1 << 40))),
        ("a.f64", Value::F64(-2.25)),
        ("b.u8s", Value::Array(Array::U8(vec![1, 2]))),
        ("b.i8s", Value::Array(Array::I8(vec![-1]))),
        ("b.u16s", Value::Array(Array::U16(vec![7]))),
        ("b.i16s", Value::Array(Array::I16(vec![-7]))),
        ("b.u32s", Value::Array(Array::U32(vec![1, 2, 3]))),
        ("b.i32s", Value::Array(Array::I32(vec![-1, 3]))),
        ("b.f32s", Value::Array(Array::F32(vec![0.5]))),
        ("b.bools", Value::Array(Array::Bool(vec![true, false]))),
        (
            "b.strs",
            Value::Array(Array::Str(vec!["x".into(), "".into()])),
        ),
        ("b.u64s", Value::Array(Array::U64(vec![9]))),
        ("b.i64s", Value::Array(Array::I64(vec![-9]))),
        ("b.f64s", Value::Array(Array::F64(vec![0.25]))),
        ("b.empty", Value::Array(Array::F32(vec![]))),
        (
            "b.nested",
            Value::Array(Array::Nested(vec![
                Array::U8(vec![1]),
                Array::Str(vec!["y".into()]),
            ])),
        ),
    ];
    let mut b = GgufBuilder::new();
    for (k, v) in &values {
        b = b.kv(k, v.clone());
    }
    let path = b
        .f32_tensor("t", &[2], &[1.0, 2.0])
        .write(dir.path(), "m.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.version, 3);
    for (k, v) in &values {
        assert_eq!(file.get(k), Some(v), "{k}");
    }
    assert_eq!(file.alignment, 32);
    assert_eq!(file.data_offset % 32, 0);
    let t = file.tensor_info("t").unwrap();
    assert_eq!(file.read_tensor_bytes(t).unwrap().len(), 8);

    // Version 2 has the same layout; a custom alignment moves the data.
    let mut b = GgufBuilder::new().kv("general.alignment", Value::U32(64));
    b.version = 2;
    let path = b
        .f32_tensor("a", &[3], &[1.0, 2.0, 3.0])
        .f32_tensor("b", &[1], &[4.0])
        .write(dir.path(), "v2.gguf");
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(
        (file.version, file.alignment, file.data_offset % 64),
        (2, 64, 0)
    );
    let b_info = file.tensor_info("b").unwrap();
    assert_eq!(b_info.offset, 64);
    assert_eq!(
        file.read_tensor_bytes(b_info).unwrap(),
        4.0f32.to_le_bytes()
    );
}

/// Llama files get q/k rows (and the k bias) un-permuted with their own head counts, and
/// dimensions reversed; Qwen2 files are left as stored.
#[test]
fn unpermutes_llama_qk_but_not_qwen2() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_builder().write(dir.path(), "l.gguf");
    let w = GgufWeights::new(GgufFile::open(&path).unwrap(), 2, 1).unwrap();
    let emb = w.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!((emb.shape.clone(), emb.data.clone()), (vec![4, 8], seq(32)));
    let q = w.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, vec![8, 8]);
    assert_eq!(q.data, names::unpermute_rows(&seq(64), 8, 8, 2).unwrap());
    // Head width 4: stored rows 0,1,2,3 are HF rows 0,2,1,3.
    assert_eq!(&q.data[8..16], &seq(64)[16..24]);
    let k = w.tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.data, names::unpermute_rows(&seq(32), 4, 8, 1).unwrap());
    let kb = w.tensor("model.layers.0.self_attn.k_proj.bias").unwrap();
    assert_eq!(kb.data, vec![0.0, 2.0, 1.0, 3.0]);

    let mut qwen = tiny_llama_builder();
    qwen.metadata[0].1 = s("qwen2");
    let path = qwen.write(dir.path(), "q.gguf");
    let w = GgufWeights::new(GgufFile::open(&path).unwrap(), 2, 1).unwrap();
    let q = w.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.data, seq(64));
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("bad.gguf"), "names the file: {msg}");
    msg
}

#[test]
fn bad_magic_and_version() {
    let mut bytes = tiny_llama_builder().to_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let msg = open_err(&bytes);
    assert!(msg.contains("not a GGUF file"), "{msg}");

    let mut bytes = tiny_llama_builder().to_bytes();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    let msg = open_err(&bytes);
    assert!(
        msg.contains("version 50331648") && msg.contains("big-endian"),
        "{msg}"
    );

    let msg = open_err(b"GG");
    assert!(msg.contains("truncated") && msg.contains("magic"), "{msg}");
}

/// Cutting the file anywhere gives an error, never a panic or a short tensor: in the header it
/// names what was being read, in the data the tensor that no longer fits.
#[test]
fn truncated_files_are_refused() {
    let bytes = tiny_llama_builder().to_bytes();
    let file = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ok.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let f = GgufFile::open(&path).unwrap();
        (
            f.data_offset,
            f.tensor_info("blk.0.attn_k.bias").unwrap().offset,
        )
    };
    for cut in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let msg = open_err(&bytes[..cut]);
        assert!(msg.contains("truncated"), "cut at {cut}: {msg}");
    }
    // Cut inside the last tensor's data: the error names it.
    let msg = open_err(&bytes[..(file.0 + file.1 + 6) as usize]);
    assert!(
        msg.contains("`blk.0.attn_k.bias`") && msg.contains("truncated"),
        "{msg}"
    );
    // Cut inside metadata: the error names the key being read.
    let key_at = bytes
        .windows(b"llama.rope.freq_base".len())
        .position(|w| w == b"llama.rope.freq_base")
        .unwrap();
    let msg = open_err(&bytes[..key_at + 24]);
    assert!(msg.contains("llama.rope.freq_base"), "{msg}");
}

/// Counts and lengths far beyond the file are refused before anything is allocated.
#[test]
fn absurd_counts_are_refused() {
    let base = GgufBuilder::new()
        .kv("general.architecture", s("llama"))
        .kv("tokens", Value::Array(Array::Str(vec!["a".into()])))
        .to_bytes();
    // The tensor count: bytes 8..16, the metadata count: 16..24.
    let mut b = base.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let msg = open_err(&b);
    assert!(
        msg.contains("tensors count") && msg.contains("above the limit"),
        "{msg}"
    );
    let mut b = base.clone();
    b[16..24].copy_from_slice(&(1u64 << 19).to_le_bytes());
    let msg = open_err(&b);
    assert!(
        msg.contains("truncated") && msg.contains("metadata pairs"),
        "{msg}"
    );

    // The array's length field follows its key, type (9) and element type (8).
    let at = base.windows(6).position(|w| w == b"tokens").unwrap() + 6 + 4 + 4;
    let mut b = base.clone();
    b[at..at + 8].copy_from_slice(&(3u64 << 20).to_le_bytes());
    let msg = open_err(&b);
    assert!(
        msg.contains("metadata array `tokens`") && msg.contains("truncated"),
        "{msg}"
    );
    let mut b = base.clone();
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let msg = open_err(&b);
    assert!(
        msg.contains("`tokens`") && msg.contains("above the limit"),
        "{msg}"
    );
    // The first string's length.
    let mut b = base.clone();
    b[at + 8..at + 16].copy_from_slice(&(1u64 << 50).to_le_bytes());
    let msg = open_err(&b);
    assert!(
        msg.contains("element 0 of metadata array `tokens`"),
        "{msg}"
    );
}

#[test]
fn malformed_tensor_infos_are_refused() {
    // A type id ggml does not have.
    let b = GgufBuilder::new()
        .tensor("w", &[4], 99, vec![0; 16])
        .to_bytes();
    let msg = open_err(&b);
    assert!(
        msg.contains("`w`") && msg.contains("unknown ggml type 99"),
        "{msg}"
    );
    // Rows not a whole number of blocks.
    let b = GgufBuilder::new()
        .tensor("w", &[16, 2], 8, vec![0; 34])
        .to_bytes();
    let msg = open_err(&b);
    assert!(
        msg.contains("`w`") && msg.contains("block size 32"),
        "{msg}"
    );
    // Too many dimensions, and an empty one.
    let b = GgufBuilder::new()
        .tensor("w", &[1, 1, 1, 1, 1], 0, vec![0; 4])
        .to_bytes();
    assert!(open_err(&b).contains("5 dimensions"));
    let b = GgufBuilder::new()
        .tensor("w", &[4, 0], 0, vec![])
        .to_bytes();
    assert!(open_err(&b).contains("empty or impossibly large"));
    // Two tensors of one name.
    let b = GgufBuilder::new()
        .f32_tensor("w", &[1], &[0.0])
        .f32_tensor("w", &[1], &[0.0])
        .to_bytes();
    assert!(open_err(&b).contains("`w` appears twice"));
    // A misaligned offset (the second tensor's offset field is the last 8 bytes before
    // padding; rewrite it to 4).
    let builder = GgufBuilder::new()
        .f32_tensor("a", &[1], &[0.0])
        .f32_tensor("b", &[1], &[0.0]);
    let mut b = builder.to_bytes();
    let pos = b.windows(1).rposition(|w| w == b"b").unwrap() + 1 + 4 + 8 + 4;
    b[pos..pos + 8].copy_from_slice(&4u64.to_le_bytes());
    let msg = open_err(&b);
    assert!(msg.contains("`b`") && msg.contains("alignment 32"), "{msg}");
    // A bad alignment value.
    let b = GgufBuilder::new()
        .kv("general.alignment", Value::U64(32))
        .to_bytes();
    assert!(open_err(&b).contains("general.alignment"));
    let b = GgufBuilder::new()
        .kv("general.alignment", Value::U32(24))
        .to_bytes();
    assert!(open_err(&b).contains("power of two"));
    // A duplicate key and an unknown value type.
    let b = GgufBuilder::new()
        .kv("k", Value::U8(1))
        .kv("k", Value::U8(2))
        .to_bytes();
    assert!(open_err(&b).contains("`k` appears twice"));
    let mut b = GgufBuilder::new().kv("k", Value::U8(1)).to_bytes();
    let pos = b.windows(1).position(|w| w == b"k").unwrap() + 1;
    b[pos..pos + 4].copy_from_slice(&13u32.to_le_bytes());
    assert!(open_err(&b).contains("`k` has unknown value type 13"));
}

/// A tensor in a type the reader cannot convert opens, and reading it names the tensor and
/// the ggml type.
#[test]
fn unsupported_quant_type_names_tensor_and_type() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_builder()
        .tensor("blk.0.attn_v.weight", &[256, 1], 13, vec![0; 176])
        .write(dir.path(), "q5k.gguf");
    let w = GgufWeights::new(GgufFile::open(&path).unwrap(), 2, 1).unwrap();
    let err = w
        .tensor("model.layers.0.self_attn.v_proj.weight")
        .unwrap_err();
    assert!(
        matches!(err, CheckpointError::UnsupportedDtype { .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.0.self_attn.v_proj.weight")
            && msg.contains("blk.0.attn_v.weight")
            && msg.contains("Q5_K")
            && msg.contains("Q4_K"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_llama_builder().write(dir.path(), "m.gguf");
    let w = GgufWeights::new(GgufFile::open(&path).unwrap(), 2, 1).unwrap();
    let err = w.tensor("model.layers.0.mlp.up_proj.weight").unwrap_err();
    assert!(matches!(err, CheckpointError::MissingTensor { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("model.layers.0.mlp.up_proj.weight") && msg.contains("m.gguf"),
        "{msg}"
    );
    // open() itself needs the embedding to know the vocabulary.
    let path = llama_meta(GgufBuilder::new()).write(dir.path(), "empty.gguf");
    let msg = checkpoint::open(&path).unwrap_err().to_string();
    assert!(msg.contains("token_embd.weight"), "{msg}");
}

#[test]
fn spec_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let spec_err = |b: GgufBuilder, name: &str| {
        let path = b.write(dir.path(), name);
        let file = GgufFile::open(&path).unwrap();
        super::spec::spec_from_metadata(&file)
            .unwrap_err()
            .to_string()
    };
    let full = || tiny_llama_builder();
    let ok = super::spec::spec_from_metadata(
        &GgufFile::open(&full().write(dir.path(), "ok.gguf")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (ok.vocab_size, ok.hidden_size, ok.num_key_value_heads),
        (4, 8, 1)
    );
    assert!(ok.tie_word_embeddings && ok.qkv_bias.eq(&false));

    let mut b = full();
    b.metadata.retain(|(k, _)| k != "llama.block_count");
    let msg = spec_err(b, "a.gguf");
    assert!(msg.contains("`llama.block_count`: missing"), "{msg}");

    let mut b = full();
    b.metadata[0].1 = s("gemma2");
    let msg = spec_err(b, "b.gguf");
    assert!(
        msg.contains("general.architecture") && msg.contains("gemma2"),
        "{msg}"
    );

    let b = full().kv("llama.rope.scaling.type", s("yarn"));
    let msg = spec_err(b, "c.gguf");
    assert!(
        msg.contains("llama.rope.scaling.type") && msg.contains("yarn"),
        "{msg}"
    );

    let b = full()
        .kv("llama.rope.scaling.type", s("linear"))
        .kv("llama.rope.scaling.factor", Value::F32(4.0));
    let path = b.write(dir.path(), "d.gguf");
    let spec = super::spec::spec_from_metadata(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(
        spec.rope_scaling,
        Some(fedcore::RopeScaling::Linear { factor: 4.0 })
    );

    let b = full().f32_tensor("rope_freqs.weight", &[2], &[1.0, 1.0]);
    let msg = spec_err(b, "e.gguf");
    assert!(msg.contains("rope_freqs.weight"), "{msg}");

    let b = full().kv("llama.rope.dimension_count", Value::U32(2));
    let msg = spec_err(b, "f.gguf");
    assert!(msg.contains("llama.rope.dimension_count"), "{msg}");

    let b = full().kv("llama.vocab_size", Value::U32(5));
    let msg = spec_err(b, "g.gguf");
    assert!(
        msg.contains("llama.vocab_size") && msg.contains("4 rows"),
        "{msg}"
    );

    let mut b = full();
    b.metadata[2].1 = s("two");
    let msg = spec_err(b, "h.gguf");
    assert!(
        msg.contains("llama.block_count") && msg.contains("string"),
        "{msg}"
    );
}

// ---------------------------------------------------------------------------------------------
// A byte-level vocabulary written here

/// A byte-level vocabulary of the 256 byte symbols plus `Ġ1` (merge `Ġ 1`), `ab` and a control
/// token.
fn byte_level_builder(pre: &str) -> GgufBuilder {
    let table: Vec<String> = {
        let mut t = Vec::new();
        let mut next = 256u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            t.push(if printable {
                char::from(b).to_string()
            } else {
                let c = char::from_u32(next).unwrap().to_string();
                next += 1;
                c
            });
        }
        t
    };
    let mut tokens = table;
    tokens.extend(["Ġ1".to_string(), "ab".to_string(), "<|end|>".to_string()]);
    let mut types = vec![1i32; tokens.len()];
    *types.last_mut().unwrap() = 3;
    tiny_llama_builder()
        .kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s(pre))
        .kv("tokenizer.ggml.tokens", Value::Array(Array::Str(tokens)))
        .kv("tokenizer.ggml.token_type", Value::Array(Array::I32(types)))
        .kv(
            "tokenizer.ggml.merges",
            Value::Array(Array::Str(vec!["Ġ 1".into(), "a b".into()])),
        )
        .kv("tokenizer.ggml.eos_token_id", Value::U32(258))
}

/// The split expressions follow `tokenizer.ggml.pre`: SmolLM's puts every digit on its own, so
/// " 1" cannot merge into `Ġ1`, GPT-2's can. Decoding inverts encoding for any text, and the
/// control token is matched whole.
#[test]
fn byte_level_tokenizer_follows_pre() {
    let dir = tempfile::tempdir().unwrap();
    let build = |pre: &str| {
        let path = byte_level_builder(pre).write(dir.path(), &format!("{pre}.gguf"));
        super::tokenizer::tokenizer_from_metadata(&GgufFile::open(&path).unwrap())
            .unwrap()
            .unwrap()
    };
    let smollm = build("smollm");
    let gpt2 = build("gpt-2");
    let enc = |t: &crate::checkpoint::CheckpointTokenizer, text: &str| {
        t.tokenizer.encode(text, false).unwrap().get_ids().to_vec()
    };
    let g = gpt2.tokenizer.token_to_id("Ġ").unwrap();
    let one = gpt2.tokenizer.token_to_id("1").unwrap();
    assert_eq!(enc(&gpt2, "ab 1"), vec![257, 256]);
    assert_eq!(enc(&smollm, "ab 1"), vec![257, g, one]);
    assert_eq!(smollm.eos_token.as_deref(), Some("<|end|>"));
    assert_eq!(enc(&smollm, "ab<|end|>"), vec![257, 258]);
    for text in ["ຄວາມ 12 ab\n\n  x\t", "\u{0}\u{7f}é", ""] {
        let ids = enc(&smollm, text);
        assert_eq!(smollm.tokenizer.decode(&ids, false).unwrap(), text);
    }

    let path = byte_level_builder("nonesuch").write(dir.path(), "x.gguf");
    let err = super::tokenizer::tokenizer_from_metadata(&GgufFile::open(&path).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.pre") && err.contains("nonesuch"),
        "{err}"
    );
}

/// The tiny Gemma 3 of `client/tests/fixtures/tiny-gemma3`, written as llama.cpp's converter
/// writes Gemma 3 (`gemma3.*` keys, GGUF tensor names, norms stored as `1 + w`, a per-layer
/// sliding-window flag list), builds the model the Hugging Face files build: this checks the
/// name map, the norm offset and the metadata, and that nothing is un-permuted.
#[test]
fn gemma3_gguf_builds_the_same_model_as_its_hf_form() {
    use crate::model::LoraLlama;
    use burn::tensor::{Device, Int, Tensor, TensorData};
    use fedcore::LoraSpec;

    let hf_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-gemma3");
    let mut hf = checkpoint::open(&hf_dir).unwrap();
    let spec = hf.spec.clone();
    let g = spec.architecture.gemma3().unwrap().clone();
    let to_gguf: &[(&str, &str)] = &[
        ("self_attn.q_proj", "attn_q"),
        ("self_attn.k_proj", "attn_k"),
        ("self_attn.v_proj", "attn_v"),
        ("self_attn.o_proj", "attn_output"),
        ("mlp.gate_proj", "ffn_gate"),
        ("mlp.up_proj", "ffn_up"),
        ("mlp.down_proj", "ffn_down"),
        ("input_layernorm", "attn_norm"),
        ("self_attn.q_norm", "attn_q_norm"),
        ("self_attn.k_norm", "attn_k_norm"),
        ("post_attention_layernorm", "post_attention_norm"),
        ("pre_feedforward_layernorm", "ffn_norm"),
        ("post_feedforward_layernorm", "post_ffw_norm"),
    ];
    let flags: Vec<bool> = (0..spec.num_hidden_layers)
        .map(|i| !g.is_full_attention(i))
        .collect();
    let mut b = GgufBuilder::new()
        .kv("general.architecture", s("gemma3"))
        .kv("general.name", s("tiny-gemma3"))
        .kv(
            "gemma3.block_count",
            Value::U32(spec.num_hidden_layers as u32),
        )
        .kv(
            "gemma3.context_length",
            Value::U32(spec.max_position_embeddings as u32),
        )
        .kv(
            "gemma3.embedding_length",
            Value::U32(spec.hidden_size as u32),
        )
        .kv(
            "gemma3.feed_forward_length",
            Value::U32(spec.intermediate_size as u32),
        )
        .kv(
            "gemma3.attention.head_count",
            Value::U32(spec.num_attention_heads as u32),
        )
        .kv(
            "gemma3.attention.head_count_kv",
            Value::U32(spec.num_key_value_heads as u32),
        )
        .kv(
            "gemma3.attention.key_length",
            Value::U32(spec.head_dim() as u32),
        )
        .kv(
            "gemma3.attention.value_length",
            Value::U32(spec.head_dim() as u32),
        )
        .kv("gemma3.rope.freq_base", Value::F32(spec.rope_theta))
        .kv(
            "gemma3.attention.layer_norm_rms_epsilon",
            Value::F32(spec.rms_norm_eps),
        )
        .kv(
            "gemma3.attention.sliding_window",
            Value::U32(g.sliding_window as u32),
        )
        .kv(
            "gemma3.attention.sliding_window_pattern",
            Value::Array(Array::Bool(flags)),
        );
    for name in hf.weights.names() {
        let t = hf.weights.tensor(&name).unwrap();
        let gguf = match name.as_str() {
            "model.embed_tokens.weight" => "token_embd.weight".to_string(),
            "model.norm.weight" => "output_norm.weight".to_string(),
            _ => {
                let rest = name.strip_prefix("model.layers.").unwrap();
                let (layer, module) = rest.split_once('.').unwrap();
                let module = module.strip_suffix(".weight").unwrap();
                let &(_, base) = to_gguf.iter().find(|(h, _)| *h == module).unwrap();
                format!("blk.{layer}.{base}.weight")
            }
        };
        let mut data = t.data.clone();
        if name.ends_with("norm.weight") {
            data.iter_mut().for_each(|v| *v += 1.0);
        }
        let dims: Vec<u64> = t.shape.iter().rev().map(|&d| d as u64).collect();
        b = b.f32_tensor(&gguf, &dims, &data);
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = b.write(tmp.path(), "tiny-gemma3.gguf");
    let gguf = checkpoint::open(&path).unwrap();
    assert_eq!(gguf.format, CheckpointFormat::Gguf);

    // GGUF cannot state query_pre_attn_scalar: llama.cpp uses the head width. Give the HF
    // form the same, and everything else must agree as read.
    let mut expected_spec = spec.clone();
    if let fedcore::Architecture::Gemma3(l) = &mut expected_spec.architecture {
        l.query_pre_attn_scalar = spec.head_dim() as f32;
    }
    let mut got_spec = gguf.spec.clone();
    got_spec.name = expected_spec.name.clone();
    got_spec.weights_sha256 = expected_spec.weights_sha256.clone();
    assert_eq!(got_spec, expected_spec);
    hf.spec = expected_spec;

    let device = Device::flex();
    let lora = LoraSpec::default();
    let ids: Vec<i64> = vec![2, 17, 42, 99, 5, 63, 120, 7, 7, 31, 88];
    let logits = |c: &checkpoint::Checkpoint| {
        let model = LoraLlama::from_checkpoint(c, &lora, &device).unwrap();
        model
            .forward(Tensor::<2, Int>::from_data(
                TensorData::new(ids.clone(), [1, ids.len()]),
                &device,
            ))
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap()
    };
    let (a, b) = (logits(&hf), logits(&gguf));
    let max = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-5, "GGUF vs HF Gemma 3 logits differ by {max}");
}
