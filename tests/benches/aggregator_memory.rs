//! Peak memory of the real aggregator during one securely aggregated round of `n`
//! participants × ~1M parameters, for several `n`: the target is flat in `n` (masked inputs
//! are folded into one running sum as they stream in; none is stored).
//!
//! The aggregator runs in a child process (this binary re-executed), so its peak resident
//! set (`VmHWM` from /proc, Linux only) is its own; the participants are wire-level labs in
//! this process, doing the full protocol (keys, shares, masks, streaming, unmasking).
//!
//! Run: `cargo bench -p mekong-e2e --bench aggregator_memory [-- 10 50 100]`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fedcore::ModelSpec;
use mekong_e2e::wire_lab::{WireBehaviour, WireLab};
use mekong_e2e::{aggregator_config, secure_test_plan, test_identity};
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "MEKONG_MEMBENCH_CONFIG";

fn main() {
    if let Ok(config) = std::env::var(CHILD_ENV) {
        serve_child(&config);
        return;
    }
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 50, 100]
    } else {
        sizes
    };
    println!("| participants | parameters | aggregator peak RSS | at start | round time |");
    println!("|---|---|---|---|---|");
    for n in sizes {
        let (params, peak_kb, start_kb, elapsed) = measure(n);
        println!(
            "| {n} | {params} | {:.1} MiB | {:.1} MiB | {:.1} s |",
            peak_kb as f64 / 1024.0,
            start_kb as f64 / 1024.0,
            elapsed.as_secs_f64()
        );
    }
}

/// The aggregator side: serve one round, then report peak memory on stdout.
fn serve_child(config_path: &str) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let config = fedaggregator::AggregatorConfig::load(std::path::Path::new(config_path))
            .expect("config");
        let server = fedaggregator::start(&config)
            .await
            .expect("aggregator starts");
        println!("START {}", vm_kb("VmRSS"));
        println!("URL {}", server.url());
        server.finished().await;
        server.drain(Duration::from_secs(5)).await;
        println!("PEAK {}", vm_kb("VmHWM"));
        server.shutdown().await.expect("shutdown");
    });
}

/// A `Vm*` line of /proc/self/status, in kB (0 where unavailable).
fn vm_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn measure(n: usize) -> (usize, u64, u64, Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let names: Vec<String> = (0..n).map(|i| format!("lab{i:03}")).collect();
    let identities: Vec<_> = (0..n).map(|i| test_identity(i as u8)).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 1, 3_600_000, 600_000);
    // ~1M B parameters: 24 layers × (5·512 + 2·1376) outputs × rank 8.
    plan.model = ModelSpec {
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 24,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        ..ModelSpec::tiny()
    };
    plan.lora.rank = 8;
    plan.lora.target_modules = fedcore::TargetModule::ALL.to_vec();
    let params = plan.initial_adapter().b_manifest().len();
    let config = aggregator_config(plan.clone(), &dir.path().join("out"));
    let config_path = dir.path().join("aggregator.toml");
    std::fs::write(&config_path, config.to_toml()).expect("config written");

    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, &config_path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("aggregator process");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut field = |tag: &str| -> String {
        let line = lines.next().expect("a line").expect("readable");
        line.strip_prefix(tag)
            .unwrap_or_else(|| panic!("expected {tag}, got {line}"))
            .trim()
            .to_string()
    };
    let start_kb: u64 = field("START").parse().expect("kB");
    let url = field("URL");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let lab = WireLab::join(&url, plan.clone(), name, *identities[i].bytes()).await;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            let delta: Vec<f32> = (0..params).map(|_| rng.random_range(-0.05..0.05)).collect();
            tasks.push(tokio::spawn(lab.run(delta, 1_000, WireBehaviour::Honest)));
        }
        for t in tasks {
            t.await.expect("lab task");
        }
    });
    let elapsed = started.elapsed();
    let peak_kb: u64 = field("PEAK").parse().expect("kB");
    child.wait().expect("aggregator exits");
    (params, peak_kb, start_kb, elapsed)
}
