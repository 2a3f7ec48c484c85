//! `fedclient join --config participant.toml` with bad files and options: each stops before
//! any connection with an error that names the field, and the options override the file.

use std::path::Path;
use std::process::{Command, Output};

/// The connection part of a kit, as `fedaggregator provision` writes it (the files it names
/// need not exist for most checks here, which fail before they are read).
const KIT: &str = r#"federation = "pilot"
name = "lab-lo"
language = "lo"
aggregator = "127.0.0.1:9"
server_name = "localhost"
ca = "ca.pem"
certificate = "client.pem"
private_key = "client.key"
identity = "identity.key"
"#;

fn join(dir: &Path, toml: &str, extra: &[&str]) -> Output {
    let file = dir.join("participant.toml");
    std::fs::write(&file, format!("{KIT}{toml}")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_fedclient"))
        .arg("join")
        .arg("--config")
        .arg(&file)
        .args(extra)
        .env("RUST_LOG", "warn")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("fedclient runs")
}

fn refused(out: &Output, needles: &[&str]) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "must fail: {text}");
    for needle in needles {
        assert!(text.contains(needle), "{needle:?} not in: {text}");
    }
}

#[test]
fn bad_policy_and_local_fields_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    refused(
        &join(d, "[policy]\nmin_peers = 2\n", &[]),
        &["participant.toml", "policy.min_peers = 2", "at least 3"],
    );
    refused(&join(d, "[policy]\nmax_round = 3\n", &[]), &["max_round"]);
    refused(
        &join(d, "[policy]\nmax_rounds = 0\n", &[]),
        &["policy.max_rounds = 0"],
    );
    refused(
        &join(d, "[policy]\nshare_metrics = [\"train_text\"]\n", &[]),
        &["train_text"],
    );
    refused(
        &join(d, "[local]\ndata = \"lo.txt\"\ndevice = \"tpu\"\n", &[]),
        &["local.device = \"tpu\"", "auto, cpu or wgpu"],
    );
    refused(&join(d, "[local]\nmodel = \"m.gguf\"\n", &[]), &["data"]);
    refused(&join(d, "", &[]), &["no local data", "--data", "[local]"]);
    // The command line overrides the file, and is checked the same way.
    refused(
        &join(d, "[policy]\nmin_peers = 4\n", &["--min-peers", "1"]),
        &["policy.min_peers = 1"],
    );
    // Data named in [local] is read relative to the file, and a missing file is named.
    refused(
        &join(
            d,
            "[local]\ndata = \"missing/lo.txt\"\ndevice = \"cpu\"\n",
            &[],
        ),
        &["missing/lo.txt"],
    );
}

/// A kit unpacked away from the lab's enrollment directory: the error names the missing key
/// and says it comes from `fedclient enroll`, before anything connects.
#[test]
fn a_missing_lab_key_is_named_with_where_it_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: String = (0..200)
        .map(|i| format!("ສິດທິມະນຸດ {i} ທຸກຄົນເກີດມາມີອິດສະຫຼະ\n"))
        .collect();
    std::fs::write(d.join("lo.txt"), text).unwrap();
    refused(
        &join(d, "[local]\ndata = \"lo.txt\"\ndevice = \"cpu\"\n", &[]),
        &[
            "client.key",
            "TLS private key is missing",
            "fedclient enroll",
        ],
    );
}

/// `fedclient enroll` writes the lab's keys and its request, prints which file to send,
/// and never overwrites them.
#[test]
fn enroll_writes_keys_and_a_request_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("lab-lo");
    let enroll = || {
        Command::new(env!("CARGO_BIN_EXE_fedclient"))
            .args(["enroll", "--name", "lab-lo", "--language", "lo", "--out"])
            .arg(&out)
            .env("RUST_LOG", "warn")
            .output()
            .expect("fedclient runs")
    };
    let first = enroll();
    let shown = String::from_utf8_lossy(&first.stdout).into_owned();
    assert!(
        first.status.success(),
        "{shown}{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(shown.contains("enroll-request.toml"), "{shown}");
    assert!(shown.contains("keep private"), "{shown}");
    for file in ["identity.key", "client.key", "enroll-request.toml"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let before = std::fs::read(out.join("identity.key")).unwrap();
    refused(&enroll(), &["already exists", "refusing to overwrite"]);
    assert_eq!(std::fs::read(out.join("identity.key")).unwrap(), before);
}
