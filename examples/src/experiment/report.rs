//! The experiment's Markdown tables and raw JSON.

use std::fmt::Write as _;
use std::path::Path;

use super::{Arm, ArmRun, ExperimentError, ExperimentResults, RoundScores};

/// Writes `results.json` (every number measured) into `dir`.
pub fn write_json(results: &ExperimentResults, dir: &Path) -> Result<(), ExperimentError> {
    let path = dir.join("strategies.json");
    let json = serde_json::to_string_pretty(results).expect("results serialise");
    std::fs::write(&path, json + "\n").map_err(|source| ExperimentError::Write { path, source })
}

/// The measured tables in Markdown: for each number of local steps, every lab's final
/// held-out loss under every arm, and whether each federated arm beat local-only training
/// for every lab; then FedIT's aggregation error per round.
pub fn tables(results: &ExperimentResults) -> String {
    let mut out = String::new();
    let mut steps: Vec<usize> = results.runs.iter().map(|r| r.local_steps).collect();
    steps.sort_unstable();
    steps.dedup();
    let unit = &results.loss_unit;
    for s in &steps {
        let runs: Vec<_> = results
            .runs
            .iter()
            .filter(|r| r.local_steps == *s)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\n#### {s} local step{} per round: held-out loss after round {} (nats per {unit}; lower is better)\n",
            if *s == 1 { "" } else { "s" },
            results.rounds,
        );
        lab_table(&mut out, results, &runs, |r| &r.loss);
        let _ = write!(out, "| wall time | | |");
        for run in &runs {
            let _ = write!(out, " {:.0} s |", run.seconds);
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "\nThe same models in bits per character of the held-out text (the tokenizer's unit taken out; lower is better):\n"
        );
        lab_table(&mut out, results, &runs, |r| &r.bits_per_char);

        let verdicts: Vec<_> = results
            .verdicts
            .iter()
            .filter(|v| v.local_steps == *s)
            .collect();
        if verdicts.iter().any(|v| v.beats_local_only.is_some()) {
            let _ = writeln!(
                out,
                "\nDoes every lab gain? Per federated arm: labs whose model beats their local-only model, the smallest margin (local-only − federated; negative = worse than alone), and the share of their language's centralised improvement reached ((before − federated) / (before − centralised_language)).\n"
            );
            let _ = writeln!(
                out,
                "| arm | labs better than alone | smallest margin | lowest share of centralised gain | mean share |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|");
            for run in runs.iter().filter(|r| r.arm.is_federated()) {
                let mine: Vec<_> = verdicts.iter().filter(|v| v.arm == run.arm).collect();
                let better = mine
                    .iter()
                    .filter(|v| v.beats_local_only == Some(true))
                    .count();
                let margin = mine
                    .iter()
                    .filter_map(|v| v.local_only.map(|l| l - v.federated))
                    .fold(f64::INFINITY, f64::min);
                let shares: Vec<f64> = mine
                    .iter()
                    .filter_map(|v| v.share_of_centralised_gain)
                    .collect();
                let (low, mean) = if shares.is_empty() {
                    ("n/a".to_string(), "n/a".to_string())
                } else {
                    (
                        format!(
                            "{:.0}%",
                            100.0 * shares.iter().copied().fold(f64::INFINITY, f64::min)
                        ),
                        format!(
                            "{:.0}%",
                            100.0 * shares.iter().sum::<f64>() / shares.len() as f64
                        ),
                    )
                };
                let _ = writeln!(
                    out,
                    "| {} | {better} of {} | {margin:+.3} | {low} | {mean} |",
                    run.arm.name(),
                    mine.len()
                );
            }
        }
    }
    let fedit: Vec<_> = results
        .runs
        .iter()
        .filter(|r| r.arm == Arm::FedIt && !r.fedit_error.is_empty())
        .collect();
    if !fedit.is_empty() {
        let _ = writeln!(
            out,
            "\n#### FedIT's aggregation error per round, ‖Σpᵢ BᵢAᵢ − B̄Ā‖_F / ‖Σpᵢ BᵢAᵢ − B_g A_g‖_F\n"
        );
        let _ = write!(out, "| local steps |");
        for r in 1..=results.rounds {
            let _ = write!(out, " round {r} |");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "|---|{}", "---|".repeat(results.rounds as usize));
        for run in fedit {
            let _ = write!(out, "| {} |", run.local_steps);
            for e in &run.fedit_error {
                let _ = write!(out, " {e:.4} |");
            }
            let _ = writeln!(out);
        }
    }
    out
}

/// One row per lab (its score before training, then each arm's after the last round, the
/// best in bold) and the mean over labs, for the metric `metric` picks.
fn lab_table(
    out: &mut String,
    results: &ExperimentResults,
    runs: &[&ArmRun],
    metric: fn(&RoundScores) -> &Vec<f64>,
) {
    let Some(first) = runs.first() else { return };
    let unit = &results.loss_unit;
    let _ = write!(out, "| lab | train {unit}s | before |");
    for run in runs {
        let _ = write!(out, " {} |", run.arm.name());
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "|---|---|---|{}", "---|".repeat(runs.len()));
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for (i, lab) in results.labs.iter().enumerate() {
        let finals: Vec<f64> = runs
            .iter()
            .map(|r| metric(r.rounds.last().expect("rounds"))[i])
            .collect();
        let best = finals.iter().copied().fold(f64::INFINITY, f64::min);
        let _ = write!(
            out,
            "| {} ({}) | {} | {:.3} |",
            lab.name,
            lab.language_name,
            lab.train_tokens,
            metric(&first.rounds[0])[i]
        );
        for v in finals {
            if v == best {
                let _ = write!(out, " **{v:.3}** |");
            } else {
                let _ = write!(out, " {v:.3} |");
            }
        }
        let _ = writeln!(out);
    }
    let _ = write!(out, "| mean | | {:.3} |", mean(metric(&first.rounds[0])));
    for run in runs {
        let _ = write!(
            out,
            " {:.3} |",
            mean(metric(run.rounds.last().expect("rounds")))
        );
    }
    let _ = writeln!(out);
}

/// Writes `strategies-tables.md` (the generated tables, included by the report) into `dir`.
pub fn write_tables(results: &ExperimentResults, dir: &Path) -> Result<(), ExperimentError> {
    let path = dir.join("strategies-tables.md");
    let languages = results.languages();
    let header = format!(
        "<!-- generated by `cargo run --release -p mekong-examples --bin strategy-experiment`; do not edit -->\n\nModel `{}` ({}), layout `{}` ({} labs, {} languages: {}), LoRA rank {}, batch {} × {} {}s, AdamW lr {}, {} rounds, seed {}.\n",
        results.model,
        if results.pretrained {
            "pretrained"
        } else {
            "byte-level, seeded random base"
        },
        results.layout.name(),
        results.labs.len(),
        languages.len(),
        languages
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        results.lora_rank,
        results.batch_size,
        results.seq_len,
        results.loss_unit,
        results.learning_rate,
        results.rounds,
        results.seed,
    );
    std::fs::write(&path, header + &tables(results))
        .map_err(|source| ExperimentError::Write { path, source })
}
