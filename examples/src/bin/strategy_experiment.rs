//! `strategy-experiment`: regenerates docs/experiments/ (issues #5 and #17: which
//! aggregation mode leaves every lab better off than training alone).
//!
//! ```text
//! cargo run --release -p mekong-examples --bin strategy-experiment
//! cargo run --release -p mekong-examples --bin strategy-experiment -- \
//!     --model auto --layout per-country --out docs/experiments/smollm2-per-country
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Parser;
use fedclient::device::{DeviceChoice, select_device};
use mekong_examples::experiment::{self, Arm, ExperimentModel, ExperimentOptions, Layout};
use mekong_examples::pilot::ModelSize;

#[derive(Parser)]
#[command(
    name = "strategy-experiment",
    about = "Compare aggregation modes, local-only and centralised training per lab, on one lab per language or several labs per language"
)]
struct Cli {
    /// Comma-separated language codes.
    #[arg(long, value_delimiter = ',', default_value = "lo,km,th,vi,my,id")]
    languages: Vec<String>,
    /// tiny or small (byte-level presets from a seed), auto or smollm2 (the cached SmolLM2),
    /// gemma3 (the cached Gemma 3 270m; see scripts/fetch-model.sh), or the path of a GGUF
    /// file or Hugging Face directory.
    #[arg(long, default_value = "small")]
    model: String,
    /// one-per-language, or per-country (a ministry, a university and a hospital per
    /// language with 3 : 2 : 1 shards of its text).
    #[arg(long, default_value = "one-per-language")]
    layout: String,
    /// Rounds (default 8 on a preset, 3 on a pretrained model).
    #[arg(long)]
    rounds: Option<u64>,
    /// Local steps per round, comma-separated; one run of every arm each (default 1,5,20
    /// on a preset, 4 on a pretrained model).
    #[arg(long, value_delimiter = ',')]
    local_steps: Option<Vec<usize>>,
    /// Arms to run (comma-separated): ffa_lora, fedsvd, fedit, fedsa_lora, group_b,
    /// local_only, centralised_language, centralised.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ffa_lora,fedsvd,fedit,fedsa_lora,group_b,local_only,centralised_language,centralised"
    )]
    arms: Vec<String>,
    /// Windows per batch (default 8 on a preset, 2 on a pretrained model).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per window (default 64 on a preset, 128 on a pretrained model).
    #[arg(long)]
    seq_len: Option<usize>,
    /// AdamW learning rate (default 5e-3 on a preset, 2e-3 on a pretrained Llama-family
    /// model, 5e-4 on Gemma 3).
    #[arg(long)]
    learning_rate: Option<f64>,
    /// Score every lab after every round (default on a preset) or only after the last
    /// (default on a pretrained model, where scoring costs minutes): every-round or last.
    #[arg(long)]
    eval: Option<String>,
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
        "tiny" => ExperimentModel::Preset(ModelSize::Tiny),
        "small" => ExperimentModel::Preset(ModelSize::Small),
        "smollm2" | "gemma3" => {
            ExperimentModel::Checkpoint(mekong_examples::pilot::cached_model(&cli.model)?)
        }
        "auto" => {
            let path = fedclient::checkpoint::default_model_path();
            if !path.exists() {
                return Err(anyhow!(
                    "--model auto: {} is missing; `bash scripts/fetch-model.sh` caches SmolLM2-135M-Instruct",
                    path.display()
                ));
            }
            ExperimentModel::Checkpoint(path)
        }
        path => {
            let path = PathBuf::from(path);
            if !path.exists() {
                return Err(anyhow!(
                    "--model {}: no such file or directory (give tiny, small, auto, smollm2, gemma3, a .gguf file or a Hugging Face model directory)",
                    path.display()
                ));
            }
            ExperimentModel::Checkpoint(path)
        }
    };
    let pretrained = matches!(model, ExperimentModel::Checkpoint(_));
    let layout = Layout::parse(&cli.layout).ok_or_else(|| {
        anyhow!(
            "--layout must be one-per-language or per-country, got {:?}",
            cli.layout
        )
    })?;
    let arms = cli
        .arms
        .iter()
        .map(|a| Arm::parse(a).ok_or_else(|| anyhow!("--arms: unknown arm {a:?}")))
        .collect::<Result<Vec<_>>>()?;
    let local_steps = cli
        .local_steps
        .unwrap_or_else(|| if pretrained { vec![4] } else { vec![1, 5, 20] });
    if local_steps.is_empty() || local_steps.contains(&0) {
        return Err(anyhow!("--local-steps: every value must be at least 1"));
    }
    let eval_every_round = match cli.eval.as_deref() {
        None => !pretrained,
        Some("every-round") => true,
        Some("last") => false,
        Some(other) => {
            return Err(anyhow!("--eval must be every-round or last, got {other:?}"));
        }
    };
    let device: DeviceChoice = cli.device.parse().map_err(|e| anyhow!("--device: {e}"))?;
    let selected = select_device(device).context("selecting the device")?;
    let learning_rate = cli.learning_rate.unwrap_or(match &model {
        ExperimentModel::Checkpoint(path) => mekong_examples::pilot::pretrained_learning_rate(path),
        ExperimentModel::Preset(_) => 5e-3,
    });
    let options = ExperimentOptions {
        languages: cli.languages,
        model,
        layout,
        rounds: cli.rounds.unwrap_or(if pretrained { 3 } else { 8 }),
        local_steps,
        batch_size: cli.batch_size.unwrap_or(if pretrained { 2 } else { 8 }),
        seq_len: cli.seq_len.unwrap_or(if pretrained { 128 } else { 64 }),
        learning_rate,
        eval_every_round,
        arms,
        seed: cli.seed,
        out_dir: cli.out.clone(),
        ..ExperimentOptions::default()
    };
    println!(
        "strategy experiment: {:?} · layout {} · {} languages · {} rounds · local steps {:?} · batch {} × {} · device {}",
        options.model,
        options.layout.name(),
        options.languages.len(),
        options.rounds,
        options.local_steps,
        options.batch_size,
        options.seq_len,
        selected.label
    );
    let started = std::time::Instant::now();
    let results = experiment::run(&options, &selected.device, |run| {
        let last = run.rounds.last().expect("round 0 at least");
        println!(
            "  {:<21} {:>2} local steps: mean held-out loss {:.3} -> {:.3} ({:.0} s)",
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
    print!("{}", experiment::report::tables(&results));
    println!(
        "\nwrote {}/strategies.{{json,png}} and strategies-tables.md in {:.0} s",
        cli.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
