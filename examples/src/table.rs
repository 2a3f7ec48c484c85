//! The pilot's results table.

use std::fmt::Write;

use crate::pilot::PilotReport;

/// Held-out loss per language, before / federated / local-only, as a text table.
pub fn render(report: &PilotReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{}: held-out next-token loss (nats per {}; lower is better), {} rounds × {} steps, {}",
        report.model, report.token_unit, report.rounds, report.steps, report.device
    );
    let _ = writeln!(
        out,
        "{:<16} {:>8} {:>8} {:>10} {:>11} {:>13} {:>14}",
        "language",
        "tokens",
        "before",
        "federated",
        "local-only",
        "bits/ch (fed)",
        "bits/ch (local)"
    );
    for row in &report.rows {
        let (local_loss, local_bits) = row.local_only.as_ref().map_or_else(
            || ("-".to_string(), "-".to_string()),
            |e| (format!("{:.3}", e.loss), format!("{:.3}", e.bits_per_char)),
        );
        let _ = writeln!(
            out,
            "{:<16} {:>8} {:>8.3} {:>10.3} {:>11} {:>13.3} {:>14}",
            format!("{} ({})", row.name, row.code),
            row.train_tokens,
            row.before.loss,
            row.federated.loss,
            local_loss,
            row.federated.bits_per_char,
            local_bits
        );
    }
    let _ = writeln!(
        out,
        "federated: the one global adapter all labs share; local-only: each lab's own adapter."
    );
    let _ = writeln!(
        out,
        "transport: mutual TLS (a federation CA, a certificate per lab for the key it enrolled, provisioned for this run)"
    );
    if report.secure {
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
    let _ = writeln!(
        out,
        "federation {:.1} s, local-only baseline {:.1} s; final global adapter (PEFT): {}",
        report.federated_time.as_secs_f64(),
        report.baseline_time.as_secs_f64(),
        report.final_adapter_dir.display()
    );
    out
}
