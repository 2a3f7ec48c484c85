//! `fedaggregator`: run a Mekong federation's aggregator.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedaggregator::AggregatorConfig;
use fedaggregator::provision::{self, ProvisionOptions};
use mekong_proto::policy::{SharedMetric, UnknownMetric};

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
    /// Create a federation's CA, the aggregator's certificate and one kit per lab from the
    /// labs' enrollment requests (`fedclient enroll`): each request is checked, its CSR's
    /// key certified under the lab's name, its identity key put in the roster. Kits hold
    /// only public files (participant.toml pinning the plan's fingerprint, ca.pem,
    /// client.pem); the center never holds a lab's key. Never overwrites a file.
    Provision {
        /// Directory to write into (created 0700 if missing).
        #[arg(long)]
        out: PathBuf,
        /// Federation name.
        #[arg(long)]
        federation: String,
        /// `host:port` the participants dial; the host goes into the server certificate.
        #[arg(long)]
        aggregator_address: String,
        /// Another DNS name or IP address for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// A lab's enrollment request, the file `fedclient enroll` wrote (repeatable; roster
        /// order: these first, then those of --requests).
        #[arg(long = "request", required_unless_present = "requests_dir")]
        requests: Vec<PathBuf>,
        /// A directory of enrollment requests: its `*.toml` files, by file name.
        #[arg(long = "requests")]
        requests_dir: Option<PathBuf>,
        /// The plan: a TOML file with the [plan] sections of aggregator.toml (model, lora,
        /// training, rounds, secure_aggregation, strategy; no roster, which comes from the
        /// requests). The kits pin its fingerprint. Default: the example plan of
        /// `init-config`, its cohort cut to the roster.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Validity of the server and participant certificates, in days.
        #[arg(long, default_value_t = 365)]
        validity_days: u32,
        /// Validity of the CA and of its revocation lists, in days.
        #[arg(long, default_value_t = 3650)]
        ca_validity_days: u32,
        /// An aggregate metric the kits' participant.toml lets each lab report to the
        /// status page (repeatable; `heldout_loss`, `round_timing`). Default: none. Each lab's own copy of
        /// participant.toml is its policy and it may remove the line.
        #[arg(long = "share-metrics", value_parser = parse_metric)]
        share_metrics: Vec<SharedMetric>,
    },
    /// Print where a running aggregator stands, from its admin port's /api/status.
    Status {
        /// The admin port, `http://HOST:PORT` (the [admin] listen address).
        #[arg(long, conflicts_with = "config")]
        admin: Option<String>,
        /// Read the admin address from this configuration's [admin] section instead.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the JSON status instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a participant's certificates: rewrites the revocation list of a provisioned
    /// directory; a running aggregator re-reads it and refuses the participant's new
    /// connections.
    Revoke {
        /// The directory `provision` wrote.
        #[arg(long)]
        dir: PathBuf,
        /// The participant to revoke.
        #[arg(long)]
        participant: String,
    },
    /// Pause the federation at the next round boundary: the round in progress finishes,
    /// then no new round opens until `resume`. Written into the configuration's state
    /// database; a running aggregator applies it within a second, a stopped one at start.
    Pause(ControlArgs),
    /// Lift a pause: the next round opens now.
    Resume(ControlArgs),
    /// End the run early: when the round in progress closes (at once if none is open),
    /// the run is finished and its current global adapter is the final one.
    Stop(ControlArgs),
}

#[derive(clap::Args)]
struct ControlArgs {
    /// The aggregator's configuration (it names the state database).
    #[arg(long, short)]
    config: PathBuf,
    /// How long to wait for a running aggregator to apply the request, in seconds.
    #[arg(long, default_value_t = 5)]
    wait_s: u64,
}

fn parse_metric(name: &str) -> Result<SharedMetric, String> {
    name.parse().map_err(|e: UnknownMetric| e.to_string())
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
                "note: replace each [[plan.roster]] public_key with the lab's identity public key (from its `fedclient enroll` request, or use the aggregator.toml `fedaggregator provision` writes); `serve` refuses the placeholders"
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
            match c.tls.files() {
                Some(files) => {
                    mekong_proto::tls::server_config(&files)?;
                    println!(
                        "transport: mutual TLS, participants certified by {}{}",
                        files.ca.display(),
                        files.crl.as_ref().map_or(String::new(), |p| format!(
                            ", revocations in {}",
                            p.display()
                        ))
                    );
                }
                None => println!(
                    "transport: PLAINTEXT (tls.enabled = false) — anyone who reaches the port can join under any roster name"
                ),
            }
            if c.plan.secure_aggregation.enabled {
                let sa = &c.plan.secure_aggregation;
                let n = c.plan.roster.len();
                println!(
                    "secure aggregation: on, {n} labs on the roster, threshold {}, {}-bit quantisation clipped at ±{}",
                    sa.threshold_for(n),
                    sa.bits,
                    sa.clip
                );
                println!(
                    "  tolerates {} colluding lab(s) (secure_aggregation.max_colluding) and {} dropout(s) per {}; each lab refuses a threshold below {}",
                    sa.max_colluding,
                    sa.dropout_tolerance(n),
                    match sa.neighbourhood(n) {
                        fedcore::secagg::protocol::Neighbourhood::Complete => "round".to_string(),
                        fedcore::secagg::protocol::Neighbourhood::Harary { degree } =>
                            format!("neighbourhood of {}", degree + 1),
                    },
                    sa.collusion_bound(n)
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
            let database = c.database_path();
            println!(
                "state: {} ({}); keeps {}",
                database.display(),
                if database.exists() {
                    "exists: `serve` resumes the run it holds, if it is this plan's"
                } else {
                    "new: `serve` starts a new run"
                },
                match c.state.adapter_history {
                    0 => "every round's adapter".to_string(),
                    n => format!("the last {n} rounds' adapters"),
                }
            );
            Ok(())
        }
        Command::Serve { config } => serve(config).await,
        Command::Status {
            admin,
            config,
            json,
        } => status(admin, config, json).await,
        Command::Provision {
            out,
            federation,
            aggregator_address,
            sans,
            mut requests,
            requests_dir,
            plan,
            validity_days,
            ca_validity_days,
            share_metrics,
        } => {
            if let Some(dir) = &requests_dir {
                let found = provision::requests_in(dir)?;
                if found.is_empty() {
                    anyhow::bail!("{}: no *.toml enrollment requests in it", dir.display());
                }
                requests.extend(found);
            }
            let plan = plan
                .map(|p| provision::read_plan_file(&p, &federation))
                .transpose()?;
            let done = provision::provision(&ProvisionOptions {
                out,
                federation,
                aggregator_address,
                extra_sans: sans,
                requests,
                plan,
                validity_days,
                ca_validity_days,
                share_metrics,
            })?;
            println!(
                "provisioned {} participants in {} (no lab's private key was made or read here)",
                done.roster.len(),
                done.dir.display()
            );
            for ((entry, language), kit) in done.roster.iter().zip(&done.languages).zip(&done.kits)
            {
                println!(
                    "  {} ({language}): identity key {} — check it with the lab over another channel; kit {}",
                    entry.name,
                    entry.public_key,
                    kit.display()
                );
            }
            println!(
                "  send each lab its kit directory (public: participant.toml, ca.pem, client.pem); it installs it beside its keys with `fedclient install-kit --kit KIT --into ENROLLMENT_DIR`"
            );
            println!(
                "  keep {} private: whoever holds it can admit anyone (`revoke` needs it)",
                done.dir.join("ca.key").display()
            );
            println!("  configuration: {}", done.config.display());
            println!(
                "  plan sha256 pinned in every kit: {} (change the plan and every lab must pin the new one, which `check-config` prints)",
                done.plan_sha256
            );
            if let Some(problem) = done.config_problem {
                eprintln!(
                    "WARNING: {} does not validate: {problem}\nWARNING: the kits pin the fingerprint of the plan as written; fix the plan, then `fedaggregator check-config -c {}` prints its new fingerprint, which every lab must pin in participant.toml ([policy] plan_sha256)",
                    done.config.display(),
                    done.config.display()
                );
            }
            Ok(())
        }
        Command::Pause(args) => control(args, fedcore::round::Command::Pause),
        Command::Resume(args) => control(args, fedcore::round::Command::Resume),
        Command::Stop(args) => control(args, fedcore::round::Command::Stop),
        Command::Revoke { dir, participant } => {
            let serials = provision::revoke(&dir, &participant)?;
            println!(
                "revoked {participant}: {} certificate(s) ({}); {} rewritten — a running aggregator refuses its new connections within seconds",
                serials.len(),
                serials.join(", "),
                dir.join("crl.pem").display()
            );
            Ok(())
        }
    }
}

/// Loads a configuration and refuses the example's placeholder identities.
fn load(path: &std::path::Path) -> Result<AggregatorConfig> {
    let config = AggregatorConfig::load(path)?;
    let placeholders = config.placeholder_keys();
    if !placeholders.is_empty() {
        anyhow::bail!(
            "{}: roster entries {placeholders:?} still carry the example's placeholder public keys, whose secrets anyone can derive; replace them with each lab's identity public key (its `fedclient enroll` request; `fedaggregator provision` fills them in)",
            path.display()
        );
    }
    Ok(config)
}

/// `fedaggregator status`: the summary (or JSON) from a running aggregator's admin port.
async fn status(admin: Option<String>, config: Option<PathBuf>, json: bool) -> Result<()> {
    let base = match (admin, config) {
        (Some(url), _) => url,
        (None, Some(path)) => {
            let c = AggregatorConfig::load(&path)?;
            let admin = c.admin.with_context(|| {
                format!(
                    "{} has no [admin] section: the aggregator serves no admin port",
                    path.display()
                )
            })?;
            format!("http://{}", admin.listen)
        }
        (None, None) => {
            anyhow::bail!("say where the admin port is: --admin http://HOST:PORT or --config FILE")
        }
    };
    let report = fedaggregator::admin::client::fetch_status(&base).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.summary());
    }
    Ok(())
}

/// `fedaggregator pause|resume|stop`: a request through the state database (see
/// `fedaggregator::control`), then its outcome; a refusal is an error (exit status 1).
fn control(args: ControlArgs, command: fedcore::round::Command) -> Result<()> {
    use fedaggregator::control::{self, Outcome};
    let config = AggregatorConfig::load(&args.config)?;
    let database = config.database_path();
    println!(
        "asking the aggregator to {} (request written to {})",
        command.name(),
        database.display()
    );
    let sent = control::send(&database, command, Duration::from_secs(args.wait_s))
        .with_context(|| format!("sending `{}`", command.name()))?;
    match sent.done {
        Some((Outcome::Applied, message)) => {
            println!("{message}");
            Ok(())
        }
        Some((Outcome::Refused, reason)) => {
            anyhow::bail!("the aggregator refused `{}`: {reason}", command.name())
        }
        None => {
            println!(
                "request {} is pending: no running aggregator applied it within {} s; it is applied when `fedaggregator serve` next starts with this configuration",
                sent.id, args.wait_s
            );
            Ok(())
        }
    }
}

async fn serve(path: PathBuf) -> Result<()> {
    let config = load(&path)?;
    let server = fedaggregator::start(&config)
        .await
        .with_context(|| format!("starting the aggregator from {}", path.display()))?;
    if let Some(admin) = server.admin_addr() {
        println!("status page: http://{admin}/ (metrics at /metrics)");
    }
    let failed = tokio::select! {
        _ = server.finished() => {
            server.drain(Duration::from_millis(config.server.linger_after_finish_ms)).await;
            println!("final adapter: {}", server.store().final_dir().display());
            false
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::warn!("interrupted; stopping (the run resumes from its database on the next start)");
            false
        }
        _ = server.failed() => true,
    };
    server.shutdown().await?;
    if failed {
        anyhow::bail!(
            "the aggregator could not save its state (see the log above); restart it to resume from {}",
            config.database_path().display()
        );
    }
    Ok(())
}
