//! `strategy-experiment`: regenerates docs/experiments/ (issue #5's strategy comparison).
//!
//! ```text
//! cargo run --release -p mekong-examples --bin strategy-experiment
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use fedclient::device::{DeviceChoice, select_device};
use mekong_examples::experiment::{self, Arm, ExperimentOptions};
use mekong_examples::pilot::ModelSize;

#[derive(Parser)]
#[command(
    name = "strategy-experiment",
    about = "Compare FFA-LoRA, FedSVD, FedIT, FedSA-LoRA, local-only and centralised training on the pilot's languages"
)]
struct Cli {
    /// Comma-separated language codes.
    #[arg(long, value_delimiter = ',', default_value = "lo,km,th,vi,my,id")]
    languages: Vec<String>,
    /// Byte-level model preset: tiny or small.
    #[arg(long, default_value = "small")]
    model: String,
    #[arg(long, default_value_t = 8)]
    rounds: u64,
    /// Local steps per round (comma-separated; one run of every arm each).
    #[arg(long, value_delimiter = ',', default_value = "1,5,20")]
    local_steps: Vec<usize>,
    /// Arms to run (comma-separated): ffa_lora, fedsvd, fedit, fedsa_lora, local_only,
    /// centralised.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ffa_lora,fedsvd,fedit,fedsa_lora,local_only,centralised"
    )]
    arms: Vec<String>,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    #[arg(long, default_value_t = 5e-3)]
    learning_rate: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where strategies.json, strategies-tables.md and strategies.png go.
    #[arg(long, default_value = "docs/experiments")]
    out: PathBuf,
    /// cpu, wgpu or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let model = match cli.model.as_str() {
        "tiny" => ModelSize::Tiny,
        "small" => ModelSize::Small,
        other => {
            return Err(anyhow!(
                "--model must be tiny or small (byte-level presets), got {other:?}"
            ));
        }
    };
    let arms = cli
        .arms
        .iter()
        .map(|a| Arm::parse(a).ok_or_else(|| anyhow!("--arms: unknown arm {a:?}")))
        .collect::<Result<Vec<_>>>()?;
    if cli.local_steps.contains(&0) {
        return Err(anyhow!("--local-steps: every value must be at least 1"));
    }
    let device: DeviceChoice = cli.device.parse().map_err(|e| anyhow!("--device: {e}"))?;
    let selected = select_device(device).context("selecting the device")?;
    let options = ExperimentOptions {
        languages: cli.languages,
        model,
        rounds: cli.rounds,
        local_steps: cli.local_steps,
        batch_size: cli.batch_size,
        seq_len: cli.seq_len,
        learning_rate: cli.learning_rate,
        arms,
        seed: cli.seed,
        out_dir: cli.out.clone(),
        ..ExperimentOptions::default()
    };
    println!(
        "strategy experiment: {} · {} languages · {} rounds · local steps {:?} · device {}",
        options.model_spec().name,
        options.languages.len(),
        options.rounds,
        options.local_steps,
        selected.label
    );
    let results = experiment::run(&options, &selected.device, |run| {
        let last = run.rounds.last().expect("round 0 at least");
        println!(
            "  {:<12} {:>2} local steps: mean held-out loss {:.3} -> {:.3} ({:.0} s)",
            run.arm.name(),
            run.local_steps,
            run.rounds[0].mean(),
            last.mean(),
            run.seconds
        );
    })
    .context("running the experiment")?;
    experiment::write_outputs(&results, &cli.out)
        .with_context(|| format!("writing into {}", cli.out.display()))?;
    println!(
        "wrote {}/strategies.{{json,png}} and strategies-tables.md",
        cli.out.display()
    );
    Ok(())
}
