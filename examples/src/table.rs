//! The pilot's results table.

use std::fmt::Write;

use fedclient::round_clock::{Phase, RoundTiming};

use crate::pilot::PilotReport;

/// Held-out loss per lab: before, with the model the lab ends up using after the federation,
/// alone with the same budget, and with its language's text pooled in one place; then the
/// share of that centralised improvement the federation reached.
pub fn render(report: &PilotReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: held-out next-token loss (nats per {}; lower is better), {} labs ({}), {}, {} rounds × {} steps, {}",
        report.model,
        report.token_unit,
        report.rows.len(),
        report.layout.name(),
        report.strategy.name(),
        report.rounds,
        report.steps,
        report.device
    );
    let lab_width = report
        .rows
        .iter()
        .map(|r| r.lab.len())
        .max()
        .unwrap_or(3)
        .max(3);
    let private = report.privacy.as_ref().is_some_and(|p| p.enabled());
    let record = report.privacy.as_ref().is_some_and(|p| p.record_level());
    let _ = write!(
        out,
        "{:<lab_width$} {:<16} {:>7} {:>7} {:>9} {:>10} {:>11} {:>8} {:>13}",
        "lab",
        "language",
        "tokens",
        "before",
        "federated",
        "local-only",
        "centralised",
        "of gain",
        "bits/ch (fed)",
    );
    let _ = writeln!(
        out,
        "{}{}",
        if private { "       ε" } else { "" },
        if record { " record ε" } else { "" }
    );
    let fmt = |e: Option<&fedclient::eval::EvalStats>| {
        e.map_or_else(|| "-".to_string(), |e| format!("{:.3}", e.loss))
    };
    for row in &report.rows {
        let verdict = match row.beats_local_only() {
            Some(true) => " ",
            Some(false) => "!",
            None => " ",
        };
        let share = row
            .share_of_centralised_gain()
            .map_or_else(|| "-".to_string(), |s| format!("{:.0}%", 100.0 * s));
        let _ = write!(
            out,
            "{:<lab_width$} {:<16} {:>7} {:>7.3} {:>8.3}{verdict} {:>10} {:>11} {:>8} {:>13.3}",
            row.lab,
            format!("{} ({})", row.name, row.code),
            row.train_tokens,
            row.before.loss,
            row.federated.loss,
            fmt(row.local_only.as_ref()),
            fmt(row.centralised.as_ref()),
            share,
            row.federated.bits_per_char,
        );
        let column = |on: bool, value: Option<f64>, width: usize| match (on, value) {
            (true, Some(e)) => format!(" {e:>width$.2}"),
            (true, None) => format!(" {:>width$}", "-"),
            (false, _) => String::new(),
        };
        let _ = writeln!(
            out,
            "{}{}",
            column(private, row.epsilon, 7),
            column(record, row.record_epsilon, 8)
        );
    }
    let judged: Vec<_> = report
        .rows
        .iter()
        .filter_map(|r| r.beats_local_only())
        .collect();
    if !judged.is_empty() {
        let better = judged.iter().filter(|b| **b).count();
        let lowest = report
            .rows
            .iter()
            .filter_map(|r| r.share_of_centralised_gain())
            .fold(f64::INFINITY, f64::min);
        let _ = writeln!(
            out,
            "federation beats training alone for {better} of {} labs (! marks the others); lowest share of the centralised gain: {}",
            judged.len(),
            if lowest.is_finite() {
                format!("{:.0}%", 100.0 * lowest)
            } else {
                "-".into()
            }
        );
    }
    let _ = writeln!(
        out,
        "federated: {}; local-only: the lab alone on its own text; centralised: its language's labs' text pooled in one place (what the federation avoids); of gain: (before − federated) / (before − centralised). Baselines train A and B.",
        match report.strategy {
            fedcore::AggregationMode::GroupB =>
                "the global A with the lab's language's B (group_b: B averaged over the language's labs)",
            fedcore::AggregationMode::FedSaLora => "the global A with the lab's own B (FedSA-LoRA)",
            _ => "the one global adapter all labs share",
        }
    );
    let _ = writeln!(
        out,
        "transport: mutual TLS (a federation CA, a certificate per lab for the key it enrolled, provisioned for this run)"
    );
    if report.secure && private {
        let _ = writeln!(
            out,
            "secure aggregation: on — the aggregator saw only each round's noised sum (rounding within ±{:.1e} per value, beside the noise)",
            report.max_error_bound
        );
    } else if report.secure {
        let _ = writeln!(
            out,
            "secure aggregation: on — the aggregator saw only each round's sum (mean update within ±{:.1e} per value of the exact weighted mean)",
            report.max_error_bound
        );
    } else {
        let _ = writeln!(
            out,
            "secure aggregation: OFF — the aggregator saw every lab's update in plaintext"
        );
    }
    if let Some(p) = report.privacy.as_ref().filter(|p| p.enabled()) {
        let _ = writeln!(
            out,
            "differential privacy: distributed discrete Gaussian on every sum (noise multiplier {}, L2 clip {} per lab update, δ = {:e}); ε: what each lab's data spent over the rounds it contributed to, by its own count",
            p.noise_multiplier, p.l2_clip, p.delta
        );
    }
    if let Some((p, r)) = report
        .privacy
        .as_ref()
        .and_then(|p| p.record.map(|r| (p, r)))
    {
        let _ = writeln!(
            out,
            "record-level DP-SGD in every lab (noise multiplier {}, per-record gradient clip {}, Poisson sampling of disjoint {}-token records, δ = {:e}); record ε: each lab's, from its own sampling rate",
            r.noise_multiplier, r.max_grad_norm, report.seq_len, p.delta
        );
    }
    if let Some(c) = &report.canary {
        let show = |e: &crate::canary::Exposure| {
            format!(
                "{:.1} bits (rank {} of {})",
                e.bits,
                e.rank,
                e.candidates + 1
            )
        };
        let _ = writeln!(
            out,
            "canary: \"{}\" × {} in {}'s training text; exposure (chance ≈ 1 bit, at most {:.1}): its own model {}, the global adapter {}, the most under another lab's model {}",
            crate::canary::Canary::sentence(&c.canary.secret),
            c.canary.repeats,
            c.canary.lab,
            ((c.global.candidates + 1) as f64).log2(),
            show(&c.own),
            show(&c.global),
            show(&c.others_max)
        );
    }
    let _ = writeln!(
        out,
        "federation {:.1} s, baselines {:.1} s, whole run {:.1} s; final global adapter (PEFT): {}",
        report.federated_time.as_secs_f64(),
        report.baseline_time.as_secs_f64(),
        report.total_time.as_secs_f64(),
        report.final_adapter_dir.display()
    );
    out.push_str(&render_time_breakdown(report));
    out
}

/// Where the federation's time went: per round, the mean over labs of each phase of
/// `fedclient::round_clock`, and the federation's wall time against every lab training
/// alone for the same steps.
pub fn render_time_breakdown(report: &PilotReport) -> String {
    let mut out = String::new();
    let rounds = report
        .lab_timings
        .iter()
        .map(|(_, r)| r.len())
        .max()
        .unwrap_or(0);
    if rounds == 0 {
        return out;
    }
    let _ = writeln!(
        out,
        "\nwhere each lab's time went (seconds, mean over the {} labs; wait = idle until the center or the other labs move on):",
        report.lab_timings.len()
    );
    let mut header = String::from("| round | wall |");
    let mut rule = String::from("|---|---|");
    for phase in Phase::ALL {
        let _ = write!(header, " {} |", phase.name());
        rule.push_str("---|");
    }
    header.push_str(" other |");
    rule.push_str("---|");
    let _ = writeln!(out, "{header}\n{rule}");
    let mut all = RoundTiming::default();
    let row = |label: String, t: &RoundTiming, n: f64, out: &mut String| {
        let _ = write!(out, "| {label} | {:.1} |", t.wall_s / n);
        for phase in Phase::ALL {
            let _ = write!(out, " {:.1} |", t.phases.get(phase) / n);
        }
        // Rounding, not time: phases timed back to back can exceed the wall by microseconds.
        let other = t.unaccounted_s() / n;
        let _ = writeln!(
            out,
            " {:.1} |",
            if other.abs() < 0.05 { 0.0 } else { other }
        );
    };
    for round in 0..rounds {
        let mut sum = RoundTiming::default();
        let mut labs = 0.0f64;
        for (_, timings) in &report.lab_timings {
            if let Some(t) = timings.get(round) {
                sum.wall_s += t.wall_s;
                sum.phases.merge(&t.phases);
                labs += 1.0;
            }
        }
        all.wall_s += sum.wall_s;
        all.phases.merge(&sum.phases);
        row(format!("{}", round + 1), &sum, labs.max(1.0), &mut out);
    }
    row(
        "all".into(),
        &all,
        report.lab_timings.len().max(1) as f64,
        &mut out,
    );
    if !report.lab_runs.is_empty() {
        let n = report.lab_runs.len() as f64;
        let mean = |f: fn(&fedclient::participant::RunTiming) -> f64| {
            report.lab_runs.iter().map(f).sum::<f64>() / n
        };
        let mut scoring = String::new();
        for (what, seconds) in [
            ("scoring the base", mean(|r| r.initial_eval_s)),
            ("scoring its final model", mean(|r| r.final_eval_s)),
        ] {
            if seconds >= 0.05 {
                let _ = write!(scoring, ", {what} {seconds:.1} s");
            }
        }
        let _ = writeln!(
            out,
            "outside the rounds, per lab: joining and building the model {:.1} s{scoring} (of {:.1} s in all)",
            mean(|r| r.setup_s),
            mean(|r| r.wall_s)
        );
    }
    let finals = &report.final_scoring;
    if finals.labs > 0 {
        let _ = writeln!(
            out,
            "after the last round: the labs' final models scored, {} distinct for {} labs{}, {:.1} s (part of the federation)",
            finals.models,
            finals.labs,
            if finals.models < finals.labs {
                " (a language's labs end with the same model)"
            } else {
                ""
            },
            finals.time.as_secs_f64()
        );
    }
    if report.base_scoring_time > std::time::Duration::ZERO {
        let _ = writeln!(
            out,
            "before the labs started: the base scored once per language, {:.1} s (the table's starting point, not part of the federation)",
            report.base_scoring_time.as_secs_f64()
        );
    }
    if report.local_only_time > std::time::Duration::ZERO {
        let fed = report.federated_time.as_secs_f64();
        let alone = report.local_only_time.as_secs_f64();
        let _ = writeln!(
            out,
            "federation {fed:.1} s = {:.2} × every lab alone for the same steps ({alone:.1} s; centralised models {:.1} s)",
            fed / alone,
            report.centralised_time.as_secs_f64()
        );
    }
    out
}
