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

use mekong_e2e::wire_lab::{WireBehaviour, WireLab};
use mekong_e2e::{aggregator_config, secure_test_plan, test_identity, widen};
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
    println!(
        "| participants | parameters | peak RSS, whole run | RSS after keys advertised | peak RSS, secure stages | round time |"
    );
    println!("|---|---|---|---|---|---|");
    for n in sizes {
        let (params, [overall, at_reset, secure], elapsed) = measure(n);
        let mib = |kb: u64| kb as f64 / 1024.0;
        println!(
            "| {n} | {params} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} s |",
            mib(overall),
            mib(at_reset),
            mib(secure),
            elapsed.as_secs_f64()
        );
    }
}

/// The aggregator side: serve one round, then report peak memory on stdout.
fn serve_child(config_path: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(std::io::stderr)
        .try_init();
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
        // Once every lab has advertised its keys (so has downloaded the global adapter),
        // reset the peak so that the second figure covers the secure stages alone: key
        // sharing, the masked-input streams and unmasking.
        loop {
            let stage = server.status().secure.map(|(s, _)| s);
            if stage.is_some_and(|s| s != fedcore::secagg::protocol::Stage::AdvertiseKeys) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let overall = vm_kb("VmHWM");
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let at_reset = vm_kb("VmRSS");
        server.finished().await;
        let secure_peak = vm_kb("VmHWM");
        println!(
            "PEAK {} {} {}",
            overall.max(secure_peak),
            at_reset,
            secure_peak
        );
        server.drain(Duration::from_secs(5)).await;
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

fn measure(n: usize) -> (usize, [u64; 3], Duration) {
    let dir = tempfile::tempdir().expect("temp dir");
    let names: Vec<String> = (0..n).map(|i| format!("lab{i:03}")).collect();
    let identities: Vec<_> = (0..n).map(|i| test_identity(i as u8)).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 1, 3_600_000, 600_000);
    // ~1M B parameters: 24 layers × (5·512 + 2·1376) outputs × rank 8.
    widen(&mut plan, 24, 8);
    let params = plan.initial_adapter().b_manifest().len();
    let config = aggregator_config(plan.clone(), &dir.path().join("out"));
    let config_path = dir.path().join("aggregator.toml");
    std::fs::write(&config_path, config.to_toml()).expect("config written");

    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, &config_path)
        .env("RUST_LOG", "warn")
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(format!("/tmp/membench-child-{n}.log")).expect("log file"))
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
    let _start_kb: u64 = field("START").parse().expect("kB");
    let url = field("URL");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let child = std::sync::Arc::new(std::sync::Mutex::new(child));
    let watched = child.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_millis(100));
            match watched.lock().expect("child lock").try_wait() {
                Ok(Some(status)) => {
                    if !status.success() {
                        eprintln!("the aggregator process ended early: {status}");
                    }
                    return;
                }
                Ok(None) => {}
                Err(_) => return,
            }
        }
    });
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let lab = WireLab::join(&url, plan.clone(), name, *identities[i].bytes()).await;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
            let delta: Vec<f32> = (0..params).map(|_| rng.random_range(-0.05..0.05)).collect();
            tasks.push(tokio::spawn(lab.run(delta, 1_000, WireBehaviour::Honest)));
        }
        for t in tasks {
            if let Err(e) = t.await {
                std::thread::sleep(Duration::from_millis(500));
                let status = child.lock().expect("child lock").try_wait();
                panic!("a lab failed ({e}); the aggregator process: {status:?}");
            }
        }
    });
    let elapsed = started.elapsed();
    let peaks: Vec<u64> = field("PEAK")
        .split_whitespace()
        .map(|v| v.parse().expect("kB"))
        .collect();
    while child
        .lock()
        .expect("child lock")
        .try_wait()
        .expect("status")
        .is_none()
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    (params, [peaks[0], peaks[1], peaks[2]], elapsed)
}
