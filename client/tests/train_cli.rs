//! `fedclient train` end to end: the binary fine-tunes a real (tiny) GGUF checkpoint with its
//! own tokenizer and chat template on plain text and prompt/response records, reports
//! held-out scores per language, and writes an adapter that reads back as PEFT.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixture_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama-gguf/tiny-llama.gguf")
}

fn udhr(language: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/udhr")
        .join(format!("{language}.txt"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fedclient(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedclient"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("fedclient runs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `(before, after)` from a line `"{lang}: held-out loss B -> A, ..."`.
fn heldout_loss(stdout: &str, language: &str) -> (f64, f64) {
    let prefix = format!("{language}: held-out loss ");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} line in:\n{stdout}"));
    let mut numbers = line.split([' ', ',']).filter_map(|w| w.parse::<f64>().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[test]
fn fine_tunes_text_and_prompt_response_data_and_writes_a_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    // English text: the fixture's 128-token vocabulary covers Latin letters.
    let en = dir.path().join("en");
    std::fs::create_dir(&en).unwrap();
    let english = udhr("en");
    let paragraphs: Vec<&str> = english.lines().filter(|l| !l.is_empty()).collect();
    std::fs::write(en.join("udhr.txt"), paragraphs[..60].join("\n")).unwrap();
    // Instruction data: the loss is on the responses only.
    let qa = dir.path().join("qa.jsonl");
    let records: String = paragraphs[..40]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            serde_json::json!({"prompt": format!("Recite paragraph {i}."), "response": p})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&qa, records).unwrap();
    let out_dir = dir.path().join("adapter");

    let model = fixture_model();
    let out = fedclient(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        &format!("en={}", en.display()),
        "--data",
        &format!("qa={}", qa.display()),
        "--steps",
        "40",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--lr",
        "2e-2",
        "--rank",
        "4",
        "--targets",
        "q_proj,v_proj,down_proj",
        "--device",
        "cpu",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let log = text(&out);
    assert!(out.status.success(), "{log}");
    for language in ["en", "qa"] {
        let (before, after) = heldout_loss(&log, language);
        assert!(
            after < before - 0.05,
            "{language}: held-out loss {before} -> {after}\n{log}"
        );
    }
    // Plain text also gets bits per character; prompt/response records do not.
    assert!(log.contains("en: held-out plain text bits/char"), "{log}");
    assert!(!log.contains("qa: held-out plain text"), "{log}");

    let adapter = fedcore::peft::read_dir(&out_dir).expect("the adapter reads back as PEFT");
    assert_eq!(adapter.config().rank, 4);
    let names: Vec<String> = adapter.modules().iter().map(|(n, _)| n.clone()).collect();
    assert!(
        names.iter().any(|n| n.ends_with("self_attn.q_proj")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.ends_with("mlp.down_proj")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.ends_with("k_proj")), "{names:?}");
    // B was trained: not all zeros.
    assert!(
        adapter
            .modules()
            .iter()
            .any(|(_, m)| m.b.data().iter().any(|&v| v != 0.0))
    );
}

#[test]
fn bad_inputs_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture_model();
    let out_dir = dir.path().join("adapter");
    let run = |model: &str, data: &str| {
        text(&fedclient(&[
            "train",
            "--model",
            model,
            "--data",
            data,
            "--steps",
            "1",
            "--seq-len",
            "32",
            "--device",
            "cpu",
            "--out",
            out_dir.to_str().unwrap(),
        ]))
    };

    let missing = dir.path().join("no-such-model.gguf");
    let log = run(missing.to_str().unwrap(), "en=x.txt");
    assert!(
        log.contains("no base model at") && log.contains("fetch-model.sh"),
        "{log}"
    );

    let log = run(model.to_str().unwrap(), "en");
    assert!(log.contains("expected LANG=PATH"), "{log}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\"}\n{\"text\": \"fine too\"}\n{\"prompt\": \"no response\"}\n",
    )
    .unwrap();
    let log = run(model.to_str().unwrap(), &format!("qa={}", bad.display()));
    assert!(
        log.contains("bad.jsonl:3:") && log.contains("response"),
        "{log}"
    );
    assert!(!out_dir.exists(), "no adapter is written after an error");
}
