//! `fedclient`: take part in a Mekong federation from a lab.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::device::{DeviceChoice, select_device};
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, ParticipantOptions, Quiet};

#[derive(Parser)]
#[command(
    name = "fedclient",
    version,
    about = "Mekong participant: fine-tune LoRA locally, share only the update"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a federation and train every round until it finishes.
    Join {
        /// Aggregator address, e.g. http://127.0.0.1:50051.
        #[arg(long)]
        aggregator: String,
        /// This lab's stable name (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// Language label of the local data.
        #[arg(long)]
        language: String,
        /// Local UTF-8 text file, one paragraph per line. It never leaves this machine.
        #[arg(long)]
        data: PathBuf,
        /// Fraction of paragraphs held out for evaluation.
        #[arg(long, default_value_t = 0.1)]
        heldout: f64,
        /// Compute device: auto picks wgpu when a GPU is present, else the CPU.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Seconds to keep retrying an unreachable aggregator.
        #[arg(long, default_value_t = 120)]
        patience: u64,
        /// This lab's identity file (from `fedclient keygen`); needed for secure aggregation.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The plan fingerprint the labs agreed on (`fedaggregator check-config` prints it);
        /// any other plan is refused.
        #[arg(long)]
        plan_sha256: Option<String>,
        /// Fewest peers this lab accepts in a secure-aggregation round (at least 3).
        #[arg(long, default_value_t = 3)]
        min_peers: usize,
    },
    /// Create this lab's long-term identity key and print the public key for the roster.
    Keygen {
        /// Where to write the secret key (readable by its owner only; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The lab's participant name, to print a ready-made roster entry.
        #[arg(long)]
        name: Option<String>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wgpu_hal=off,wgpu_core=off".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Join {
            aggregator,
            name,
            language,
            data,
            heldout,
            device,
            patience,
            identity,
            plan_sha256,
            min_peers,
        } => {
            let identity = identity
                .map(|p| {
                    IdentitySeed::load(&p)
                        .with_context(|| format!("loading the identity from {}", p.display()))
                })
                .transpose()?
                .map(Arc::new);
            let corpus = LocalCorpus::from_file(&data, &language, heldout, &ByteTokenizer)
                .with_context(|| format!("loading local data from {}", data.display()))?;
            let selected = select_device(device).context("selecting the compute device")?;
            tracing::info!(device = %selected.label, train_tokens = corpus.train_samples(), "local data loaded");
            let options = ParticipantOptions {
                aggregator_url: aggregator,
                name,
                language,
                evaluate: true,
                connect_patience: Duration::from_secs(patience),
                identity,
                plan_sha256,
                min_peers,
                base: None,
            };
            let report = participant::run(options, corpus, selected.device, Arc::new(Quiet))
                .await
                .context("taking part in the federation")?;
            println!("{} rounds trained", report.rounds.len());
            if let (Some(before), Some(after)) = (&report.initial_eval, &report.final_eval) {
                println!(
                    "held-out loss {:.4} -> {:.4} (bits/char {:.3} -> {:.3}) with the final global adapter",
                    before.loss, after.loss, before.bits_per_char, after.bits_per_char
                );
            }
            Ok(())
        }
        Command::Keygen { out, name } => {
            let identity = IdentitySeed::generate(&out)
                .with_context(|| format!("creating an identity at {}", out.display()))?;
            println!("identity written to {} (keep it secret)", out.display());
            println!("public key: {}", identity.public_key_hex());
            println!("roster entry for the aggregator's configuration:");
            println!("[[plan.roster]]");
            println!(
                "name = {:?}",
                name.as_deref().unwrap_or("<this lab's name>")
            );
            println!("public_key = \"{}\"", identity.public_key_hex());
            Ok(())
        }
    }
}
