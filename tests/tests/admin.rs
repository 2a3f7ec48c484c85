//! The aggregator's admin port, end to end: a real secure federation on loopback (three
//! labs training real burn models, two of which opt in to reporting held-out losses), then
//! `/healthz`, `/metrics` parsed as Prometheus text, `/api/status` and the status page
//! rendered by headless Chromium.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use fedaggregator::RunningServer;
use fedaggregator::admin::StatusReport;
use fedaggregator::admin::client::{fetch_status, get};
use fedaggregator::config::AdminSection;
use fedclient::participant::{self, Quiet};
use mekong_e2e::{aggregator_config, corpus, participant_options, secure_test_plan, test_identity};
use mekong_proto::policy::SharedMetric;

const LABS: [(&str, &str, bool); 3] = [
    ("lab-lo", "lo", true),
    ("lab-km", "km", true),
    ("lab-th", "th", false),
];
const ROUNDS: u64 = 2;

/// Runs a two-round secure federation with the admin port on and returns the still-serving
/// aggregator (and its output directory).
async fn federation() -> (RunningServer, tempfile::TempDir) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let identities: Vec<_> = (0..LABS.len() as u8).map(test_identity).collect();
    let roster: Vec<(&str, _)> = LABS.iter().map(|l| l.0).zip(&identities).collect();
    let plan = secure_test_plan(&roster, ROUNDS, 120_000, 10_000);
    let mut config = aggregator_config(plan.clone(), dir.path());
    config.admin = Some(AdminSection::loopback(0));
    let server = fedaggregator::start(&config).await.unwrap();
    let mut labs = Vec::new();
    for (i, (name, code, shares)) in LABS.into_iter().enumerate() {
        let mut options = participant_options(&server.url(), name, code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        if shares {
            options.share_metrics.insert(SharedMetric::HeldoutLoss);
            options.share_metrics.insert(SharedMetric::RoundTiming);
        }
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            Arc::new(Quiet),
        )));
    }
    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    server.finished().await;
    (server, dir)
}

fn admin_url(server: &RunningServer) -> String {
    format!(
        "http://{}",
        server.admin_addr().expect("admin port configured")
    )
}

/// Parses Prometheus/OpenMetrics text strictly: every line is a `# HELP`, `# TYPE`,
/// `# UNIT` comment or a `name{labels} value` sample, the last line is `# EOF`, and every
/// sample belongs to a declared metric family. Returns `name{labels}` → value.
fn parse_prometheus(text: &str) -> BTreeMap<String, f64> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    let mut families = Vec::new();
    let mut samples = BTreeMap::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let mut parts = comment.splitn(3, ' ');
            let kind = parts.next().unwrap();
            let name = parts.next().expect("a metric name");
            assert!(["HELP", "TYPE", "UNIT"].contains(&kind), "{line}");
            if kind == "TYPE" {
                let t = parts.next().unwrap();
                assert!(
                    ["counter", "gauge", "histogram", "info"].contains(&t),
                    "{line}"
                );
                families.push(name.to_string());
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("`series value`");
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
        if let Some(labels) = series.strip_prefix(name) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "{line}"
            );
        }
        assert!(
            families.iter().any(|f| name.starts_with(f.as_str())),
            "sample {name} of no declared family"
        );
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        samples.insert(series.to_string(), value);
    }
    samples
}

fn check_metrics(text: &str, adapter_bytes: f64) {
    let m = parse_prometheus(text);
    let at = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(at("mekong_rounds_completed_total"), ROUNDS as f64);
    assert_eq!(at("mekong_round"), ROUNDS as f64);
    assert_eq!(at("mekong_rounds_total"), ROUNDS as f64);
    assert_eq!(at("mekong_stage{stage=\"finished\"}"), 1.0);
    assert_eq!(at("mekong_stage{stage=\"training\"}"), 0.0);
    assert_eq!(at("mekong_participants_joined"), 3.0);
    assert_eq!(at("mekong_participants_connected"), 3.0);
    assert_eq!(at("mekong_participants_left"), 0.0);
    assert_eq!(at("mekong_secure_attempts_failed_total"), 0.0);
    assert_eq!(at("mekong_participants_dropped_total"), 0.0);
    // Two labs opted in, one held-out report per round each; the third sent none. Each
    // round's timing is a second ReportMetrics call, sent when the round ends.
    assert_eq!(at("mekong_metric_reports_total"), 4.0);
    assert_eq!(at("mekong_rpc_calls_total{rpc=\"ReportMetrics\"}"), 8.0);
    assert_eq!(at("mekong_rpc_calls_total{rpc=\"Join\"}"), 3.0);
    assert_eq!(
        at("mekong_rpc_calls_total{rpc=\"SubmitMasked\"}"),
        3.0 * ROUNDS as f64
    );
    // Every lab streamed a masked vector at least as large as its update each round, and
    // was sent the global adapter each round.
    let masked = at("mekong_rpc_received_bytes_total{rpc=\"SubmitMasked\"}");
    assert!(
        masked >= 3.0 * ROUNDS as f64 * adapter_bytes / 2.0,
        "{masked}"
    );
    let fetched = at("mekong_rpc_sent_bytes_total{rpc=\"FetchTask\"}");
    assert!(fetched >= 3.0 * ROUNDS as f64 * adapter_bytes, "{fetched}");
    assert_eq!(at("mekong_round_duration_seconds_count"), ROUNDS as f64);
    for stage in [
        "advertise_keys",
        "share_keys",
        "masked_input",
        "consistency_check",
        "unmask",
    ] {
        assert_eq!(
            at(&format!(
                "mekong_stage_duration_seconds_count{{stage=\"{stage}\"}}"
            )),
            ROUNDS as f64,
            "{stage}"
        );
    }
    let round_seconds = at("mekong_round_duration_seconds_sum");
    assert!(
        round_seconds > 0.0 && round_seconds < 600.0,
        "{round_seconds}"
    );
    for language in ["lo", "km"] {
        for when in ["before", "after"] {
            let loss = at(&format!(
                "mekong_heldout_loss{{language=\"{language}\",when=\"{when}\"}}"
            ));
            // Byte-level model: between 0 and a little over ln 256.
            assert!(loss > 0.0 && loss < 7.0, "{language} {when}: {loss}");
        }
    }
    assert!(!text.contains("language=\"th\""), "lab-th did not opt in");
    // Where each opted-in lab's rounds went, by its own clock (issue #28): every round
    // reported once, training in it, and the phases within the rounds' wall time.
    for lab in ["lab-lo", "lab-km"] {
        let label = format!("participant=\"{lab}\"");
        assert_eq!(
            at(&format!("mekong_lab_rounds_timed_total{{{label}}}")),
            ROUNDS as f64,
            "{lab}"
        );
        let wall = at(&format!("mekong_lab_round_seconds_total{{{label}}}"));
        let phases: f64 = ["train", "evaluate", "download", "secure", "upload", "wait"]
            .iter()
            .map(|phase| {
                at(&format!(
                    "mekong_lab_phase_seconds_total{{{label},phase=\"{phase}\"}}"
                ))
            })
            .sum();
        let train = at(&format!(
            "mekong_lab_phase_seconds_total{{{label},phase=\"train\"}}"
        ));
        assert!(
            train > 0.0 && wall > 0.0,
            "{lab}: train {train}, wall {wall}"
        );
        assert!(
            (wall - phases).abs() <= 0.05 * wall,
            "{lab}: phases {phases} s of {wall} s"
        );
    }
    assert!(
        !text.contains("participant=\"lab-th\""),
        "lab-th shares no round timing"
    );
}

fn check_status(s: &StatusReport) {
    assert_eq!(s.federation, "e2e");
    assert_eq!(s.stage, "finished");
    assert_eq!((s.round, s.rounds_total), (ROUNDS, ROUNDS));
    assert!(s.secure_aggregation);
    assert_eq!(s.plan_sha256.len(), 64);
    let participants: Vec<_> = s
        .participants
        .iter()
        .map(|p| {
            (
                p.name.as_str(),
                p.language.as_str(),
                p.rounds_contributed,
                p.metric_reports,
            )
        })
        .collect();
    assert_eq!(
        participants,
        [
            ("lab-km", "km", ROUNDS, ROUNDS),
            ("lab-lo", "lo", ROUNDS, ROUNDS),
            ("lab-th", "th", ROUNDS, 0),
        ]
    );
    assert!(s.participants.iter().all(|p| p.connected));
    for p in &s.participants {
        let timed = p.round_timing.as_ref().map(|t| t.rounds);
        let expected = (p.name != "lab-th").then_some(ROUNDS);
        assert_eq!(timed, expected, "{}", p.name);
    }
    assert_eq!(s.rounds.len(), ROUNDS as usize);
    for (i, r) in s.rounds.iter().enumerate() {
        assert_eq!(r.round, i as u64 + 1);
        assert_eq!(r.contributors, ["lab-km", "lab-lo", "lab-th"]);
        assert!(r.dropped.is_empty());
        assert_eq!(r.secure_attempt, Some(0), "first attempt (0-based)");
        let bound = r.quantisation_bound.unwrap();
        assert!(bound > 0.0 && bound < 1e-3, "{bound}");
        assert!(r.duration_s > 0.0);
        assert_eq!(r.adapter_sha256.len(), 64);
    }
    assert_eq!(
        s.rounds.last().unwrap().adapter_sha256,
        s.global_adapter_sha256
    );
    let languages: Vec<_> = s.loss_curves.iter().map(|c| c.language.as_str()).collect();
    assert_eq!(languages, ["km", "lo"]);
    for curve in &s.loss_curves {
        let rounds: Vec<_> = curve.points.iter().map(|p| p.round).collect();
        assert_eq!(rounds, [1, 2]);
        for p in &curve.points {
            assert_eq!(p.labs, 1);
            assert!(p.tokens > 0);
            assert!(p.before.is_finite() && p.after.is_finite());
        }
        // Round 2 starts from the global round 1 produced, which learned from this lab.
        assert!(
            curve.points[1].before < curve.points[0].before,
            "{}: {:?}",
            curve.language,
            curve.points
        );
    }
    let stages: Vec<_> = s.stage_timings.iter().map(|t| t.stage.as_str()).collect();
    assert_eq!(
        stages,
        [
            "advertise_keys",
            "share_keys",
            "masked_input",
            "consistency_check",
            "unmask"
        ]
    );
    let summary = s.summary();
    assert!(
        summary.contains("federation e2e — finished, round 2/2"),
        "{summary}"
    );
    assert!(summary.contains("lab-th"), "{summary}");
    assert!(summary.contains("held-out loss [km] round 2"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_port_serves_health_metrics_and_status_of_a_real_federation() {
    let started = Instant::now();
    let (server, _dir) = federation().await;
    let url = admin_url(&server);

    let (code, body) = get(&url, "/healthz").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(
        body.starts_with("ok: federation e2e finished, round 2/2"),
        "{body}"
    );

    let (code, metrics) = get(&url, "/metrics").await.unwrap();
    assert_eq!(code, 200, "{metrics}");
    // The B factors every update carries (FFA-LoRA), as f32.
    let adapter_bytes = (mekong_e2e::test_plan(3, ROUNDS, 1, 1)
        .initial_adapter()
        .b_manifest()
        .len()
        * 4) as f64;
    check_metrics(&metrics, adapter_bytes);

    let status = fetch_status(&url).await.unwrap();
    check_status(&status);

    let (code, _) = get(&url, "/nowhere").await.unwrap();
    assert_eq!(code, 404);
    server.shutdown().await.unwrap();
    let err = fetch_status(&url).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach the admin port"), "{err}");
    eprintln!("admin e2e took {:.1} s", started.elapsed().as_secs_f64());
}

/// The Chromium binary, if installed (`MEKONG_CHROMIUM` overrides).
fn chromium() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("MEKONG_CHROMIUM") {
        return Some(p.into());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| ["chromium", "chromium-browser"].map(|n| d.join(n)))
        .find(|p| p.is_file())
}

/// `chromium --headless --dump-dom url`: the DOM after the page loaded, or why not.
fn dump_dom(chromium: &Path, url: &str, profile: &Path) -> String {
    let mut child = std::process::Command::new(chromium)
        .args([
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            "--dump-dom",
            url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("starting chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && !dom.is_empty(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_renders_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        assert!(
            std::env::var_os("MEKONG_REQUIRE_CHROMIUM").is_none(),
            "MEKONG_REQUIRE_CHROMIUM is set but no chromium is on PATH (apt-get install chromium)"
        );
        eprintln!(
            "skipped: no chromium on PATH (CI installs it and sets MEKONG_REQUIRE_CHROMIUM=1)"
        );
        return;
    };
    let (server, dir) = federation().await;
    let url = format!("{}/", admin_url(&server));
    let profile = dir.path().join("chromium-profile");
    let dom = tokio::task::spawn_blocking(move || dump_dom(&chromium, &url, &profile))
        .await
        .unwrap();
    // The DOM as the browser built it: participants' rows and the last round's row.
    let table = |id: &str| {
        let start = dom
            .find(&format!("<table id=\"{id}\">"))
            .unwrap_or_else(|| panic!("no #{id} table in\n{dom}"));
        let end = start + dom[start..].find("</table>").unwrap();
        dom[start..end].to_string()
    };
    let participants = table("participants");
    for (name, code, _) in LABS {
        assert!(
            participants.contains(&format!("<td>{name}</td><td>{code}</td>")),
            "{name} missing from\n{participants}"
        );
    }
    let rounds = table("rounds");
    let last = format!("<tr class=\"round\" id=\"round-{ROUNDS}\">");
    assert!(
        rounds.contains(&last),
        "round {ROUNDS} missing from\n{rounds}"
    );
    assert!(
        rounds.contains("lab-km, lab-lo, lab-th"),
        "contributors missing from\n{rounds}"
    );
    assert!(dom.contains("<span id=\"stage\">finished</span>"), "{dom}");
    // The loss curves are drawn: one group per language that opted in.
    assert!(dom.contains("<svg id=\"loss-curves\""), "{dom}");
    assert_eq!(dom.matches("class=\"curve\"").count(), 2, "{dom}");
    server.shutdown().await.unwrap();
}
