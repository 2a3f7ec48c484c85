//! `fedaggregator`: run a Mekong federation's aggregator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedaggregator::AggregatorConfig;

#[derive(Parser)]
#[command(
    name = "fedaggregator",
    version,
    about = "Mekong aggregator: runs federated LoRA rounds over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a federation until its last round closes and participants have the final adapter.
    Serve {
        /// Configuration file (see `fedaggregator init-config`).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print a complete example configuration to standard output.
    InitConfig,
    /// Check a configuration file and print what it would run.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
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
        Command::InitConfig => {
            print!("{}", AggregatorConfig::example().to_toml());
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = AggregatorConfig::load(&config)?;
            let modules = c.plan.lora_modules();
            let params: usize = modules
                .iter()
                .map(|m| m.out_features * c.plan.lora.rank)
                .sum();
            println!(
                "{}: OK — federation {:?}, {} participants, {} rounds, {} adapted modules, {} trainable (B) parameters per update",
                config.display(),
                c.plan.federation,
                c.plan.rounds.participants,
                c.plan.rounds.rounds,
                modules.len(),
                params
            );
            Ok(())
        }
        Command::Serve { config } => serve(config).await,
    }
}

async fn serve(path: PathBuf) -> Result<()> {
    let config = AggregatorConfig::load(&path)?;
    let server = fedaggregator::start(&config)
        .await
        .with_context(|| format!("starting the aggregator from {}", path.display()))?;
    tokio::select! {
        _ = server.finished() => {
            server.drain(Duration::from_millis(config.server.linger_after_finish_ms)).await;
            println!("final adapter: {}", server.store().final_dir().display());
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("interrupted; stopping");
        }
    }
    server.shutdown().await?;
    Ok(())
}
