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
            eprintln!(
                "note: replace each [[plan.roster]] public_key with the key the lab prints from `fedclient keygen`; `serve` refuses the placeholders"
            );
            Ok(())
        }
        Command::CheckConfig { config } => {
            let c = load(&config)?;
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
            if c.plan.secure_aggregation.enabled {
                println!(
                    "secure aggregation: on, {} labs on the roster, threshold {}, {}-bit quantisation clipped at ±{}",
                    c.plan.roster.len(),
                    c.plan.secure_aggregation.threshold_for(c.plan.roster.len()),
                    c.plan.secure_aggregation.bits,
                    c.plan.secure_aggregation.clip
                );
            } else {
                println!(
                    "secure aggregation: OFF — the aggregator will see every lab's update in plaintext"
                );
            }
            println!(
                "plan sha256: {} (labs pin it with `fedclient join --plan-sha256`)",
                c.plan.fingerprint()
            );
            Ok(())
        }
        Command::Serve { config } => serve(config).await,
    }
}

/// Loads a configuration and refuses the example's placeholder identities.
fn load(path: &std::path::Path) -> Result<AggregatorConfig> {
    let config = AggregatorConfig::load(path)?;
    let placeholders = config.placeholder_keys();
    if !placeholders.is_empty() {
        anyhow::bail!(
            "{}: roster entries {placeholders:?} still carry the example's placeholder public keys, whose secrets anyone can derive; replace them with each lab's `fedclient keygen` output",
            path.display()
        );
    }
    Ok(config)
}

async fn serve(path: PathBuf) -> Result<()> {
    let config = load(&path)?;
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
