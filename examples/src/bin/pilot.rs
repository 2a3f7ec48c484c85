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
use mekong_examples::pilot::{PilotModel, PilotOptions};

#[derive(Parser)]
#[command(
    name = "pilot",
    version,
    about = "Mekong pilot federation over the UDHR in South-East Asian languages"
)]
struct Args {
    /// Base model: `auto` (SmolLM2-135M-Instruct when scripts/fetch-model.sh has cached it,
    /// else `small`), a byte-level preset trained from a seed (`tiny`, `small`, `base`), or a
    /// GGUF file / Hugging Face directory.
    #[arg(long, default_value = "auto")]
    model: String,
    /// Federated rounds [default: 5, or 3 for a pretrained model].
    #[arg(long)]
    rounds: Option<u64>,
    /// Local optimizer steps per round [default: 30, or 4 for a pretrained model].
    #[arg(long)]
    steps: Option<usize>,
    /// Compute device: auto picks wgpu when a GPU is present, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Comma-separated language codes (lo, km, th, vi, my, id, ms, tl, en).
    #[arg(long, value_delimiter = ',', default_value = "lo,km,th,vi,my,id")]
    languages: Vec<String>,
    /// Sequences per batch [default: 8, or 2 for a pretrained model].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (bytes for the presets) [default: 64, or 128 for a pretrained model].
    #[arg(long)]
    seq_len: Option<usize>,
    /// AdamW learning rate [default: 5e-3, or 2e-3 for a pretrained model].
    #[arg(long)]
    lr: Option<f64>,
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
    /// Port of the aggregator's status page and /metrics on 127.0.0.1 [default: a free
    /// port, printed at start].
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
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
    let (model, note) = PilotModel::parse(&a.model)?;
    println!("{note}");
    let defaults = PilotOptions::for_model(model);
    let options = PilotOptions {
        languages: a.languages,
        rounds: a.rounds.unwrap_or(defaults.rounds),
        steps: a.steps.unwrap_or(defaults.steps),
        device: a.device,
        batch_size: a.batch_size.unwrap_or(defaults.batch_size),
        seq_len: a.seq_len.unwrap_or(defaults.seq_len),
        learning_rate: a.lr.unwrap_or(defaults.learning_rate),
        lora_rank: a.rank,
        out_dir: a.out,
        local_baseline: !a.no_local_baseline,
        secure: !a.insecure_plaintext,
        admin_port: a.admin_port,
        ..defaults
    };
    let report = mekong_examples::pilot::run(options).await?;
    print!("{}", mekong_examples::table::render(&report));
    Ok(())
}
