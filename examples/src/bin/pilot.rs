//! `pilot`: run a federation of national-language labs on this machine.
//!
//! One aggregator on loopback, one participant per language (each with only its own UDHR
//! text, 10% held out, its own identity key), a few rounds of FFA-LoRA with secure
//! aggregation, then a table of held-out loss per language: before, federated, and
//! local-only with the same budget.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use fedclient::device::DeviceChoice;
use mekong_examples::pilot::{ModelSize, PilotOptions};

#[derive(Parser)]
#[command(
    name = "pilot",
    version,
    about = "Mekong pilot federation over the UDHR in South-East Asian languages"
)]
struct Args {
    /// Federated rounds.
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Local optimizer steps per round.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Model size preset.
    #[arg(long, value_enum, default_value_t = ModelSize::Small)]
    model: ModelSize,
    /// Compute device: auto picks wgpu when a GPU is present, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Comma-separated language codes (lo, km, th, vi, my, id, ms, tl, en).
    #[arg(long, value_delimiter = ',', default_value = "lo,km,th,vi,my,id")]
    languages: Vec<String>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens (bytes) per sequence.
    #[arg(long, default_value_t = 64)]
    seq_len: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 5e-3)]
    lr: f64,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Output directory for the aggregator's adapters.
    #[arg(long, default_value = "runs/pilot")]
    out: PathBuf,
    /// Skip the local-only baseline.
    #[arg(long)]
    no_local_baseline: bool,
    /// Turn secure aggregation off: the aggregator sees every lab's update in plaintext.
    #[arg(long)]
    insecure_plaintext: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,wgpu_hal=off,wgpu_core=off".into()),
        )
        .init();
    let a = Args::parse();
    let options = PilotOptions {
        languages: a.languages,
        rounds: a.rounds,
        steps: a.steps,
        model: a.model,
        device: a.device,
        batch_size: a.batch_size,
        seq_len: a.seq_len,
        learning_rate: a.lr,
        lora_rank: a.rank,
        out_dir: a.out,
        local_baseline: !a.no_local_baseline,
        secure: !a.insecure_plaintext,
        ..PilotOptions::default()
    };
    let report = mekong_examples::pilot::run(options).await?;
    print!("{}", mekong_examples::table::render(&report));
    Ok(())
}
