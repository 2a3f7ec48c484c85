//! `fedclient`: take part in a Mekong federation from a lab.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::ValueEnum;
use clap::{Parser, Subcommand};
use fedclient::data::{ByteTokenizer, HfTokenizer, LocalCorpus};
use fedclient::device::{DeviceChoice, select_device};
use fedclient::identity::IdentitySeed;
use fedclient::local_train;
use fedclient::participant::{self, ParticipantOptions, RunEnd};
use fedclient::progress::{JoinDisplay, TrainBar};
use fedcore::{LoraSpec, TargetModule, TrainingSpec};
use mekong_proto::policy::SharedMetric;
use mekong_proto::tls::ParticipantKit;

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
    /// Join a federation and train every round until it finishes (or this lab's policy
    /// says stop).
    Join {
        /// This lab's participant.toml (or the directory holding it): the kit `fedaggregator
        /// provision` made from this lab's `fedclient enroll` request, unpacked into the
        /// enrollment directory beside the lab's own client.key and identity.key: the
        /// aggregator's address, this lab's name, language, certificate and keys; its `[policy]` (min_peers, max_rounds, max_epsilon, share_metrics,
        /// plan_sha256) and `[local]` (data, model, heldout, device) sections supply the
        /// rest. Connections are then mutual TLS. The options below override the file.
        #[arg(long, visible_alias = "kit")]
        config: Option<PathBuf>,
        /// Aggregator address without TLS, e.g. http://127.0.0.1:50051 (only for a
        /// federation that explicitly runs without TLS; use --config otherwise).
        #[arg(long, required_unless_present = "config")]
        aggregator: Option<String>,
        /// This lab's stable name (letters, digits, '-', '_', '.') [default: the config's].
        #[arg(long, required_unless_present = "config")]
        name: Option<String>,
        /// Language label of the local data [default: the config's].
        #[arg(long, required_unless_present = "config")]
        language: Option<String>,
        /// Local UTF-8 text file, one paragraph per line. It never leaves this machine.
        /// [default: the config's `local.data`]
        #[arg(long)]
        data: Option<PathBuf>,
        /// Base model, when the plan pins a pretrained one: a GGUF file or a Hugging Face
        /// directory (the data is then tokenized with its tokenizer). Without it the plan's
        /// seeded byte-level model is used. [default: the config's `local.model`]
        #[arg(long)]
        model: Option<PathBuf>,
        /// Fraction of paragraphs held out for evaluation [default: the config's
        /// `local.heldout`, else 0.1].
        #[arg(long)]
        heldout: Option<f64>,
        /// Compute device: auto picks wgpu when a GPU is present, else the CPU [default: the
        /// config's `local.device`, else auto].
        #[arg(long, value_enum)]
        device: Option<DeviceChoice>,
        /// Seconds to keep retrying an unreachable aggregator.
        #[arg(long, default_value_t = 120)]
        patience: u64,
        /// This lab's identity file (from `fedclient enroll` or `keygen`) [default: the
        /// config's]; needed for secure aggregation.
        #[arg(long)]
        identity: Option<PathBuf>,
        /// The plan fingerprint the labs agreed on (`fedaggregator check-config` prints it);
        /// any other plan is refused [default: the config's `policy.plan_sha256`].
        #[arg(long)]
        plan_sha256: Option<String>,
        /// Without a pinned plan fingerprint, follow whatever plan the aggregator sends,
        /// including one without secure aggregation. Unsafe: a cheating center could then
        /// read this lab's update. Without this flag an unpinned lab refuses to join.
        #[arg(long)]
        trust_aggregator_plan: bool,
        /// Where this lab keeps its durable state, such as the record of what it unmasked
        /// (so that a restarted lab never unmasks an update twice) [default: `state/`
        /// beside the config file].
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Fewest peers this lab accepts in a secure-aggregation round, at least 3
        /// [default: the config's `policy.min_peers`, else 3].
        #[arg(long)]
        min_peers: Option<usize>,
        /// Most rounds this lab takes part in before it leaves [default: the config's
        /// `policy.max_rounds`, else every round].
        #[arg(long)]
        max_rounds: Option<u64>,
        /// Most ε (at the plan's δ) this lab's data may spend; the lab refuses a plan
        /// without `[privacy]` and leaves before a round that could exceed it [default: the
        /// config's `policy.max_epsilon`, else no limit].
        #[arg(long)]
        max_epsilon: Option<f64>,
        /// Aggregate metrics this lab reports for the aggregator's status page and
        /// /metrics (comma-separated; `heldout_loss`, `round_timing`, or `none`) [default: the config's
        /// `policy.share_metrics`, else none].
        #[arg(long, value_delimiter = ',')]
        share_metrics: Option<Vec<String>>,
    },
    /// Fine-tune LoRA on this lab's data alone (no federation) and write a PEFT adapter.
    Train {
        /// Base model: a GGUF file or a Hugging Face directory (default: the SmolLM2 that
        /// scripts/fetch-model.sh caches).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Training data as LANG=PATH (a .txt or .jsonl file, or a directory of them);
        /// repeat for each language. Evaluation is reported per language.
        #[arg(long = "data", required = true)]
        data: Vec<String>,
        /// Fraction of each language's data held out for evaluation.
        #[arg(long, default_value_t = 0.1)]
        heldout: f64,
        /// Optimizer steps.
        #[arg(long, default_value_t = 100)]
        steps: usize,
        /// Packed rows per micro-batch.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Tokens per row.
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Micro-batches per optimizer step.
        #[arg(long, default_value_t = 1)]
        grad_accumulation: usize,
        /// Peak learning rate (linear warm-up over the first 10% of steps, then cosine).
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// LoRA rank.
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// LoRA alpha.
        #[arg(long, default_value_t = 16.0)]
        alpha: f32,
        /// LoRA dropout.
        #[arg(long, default_value_t = 0.0)]
        dropout: f32,
        /// Adapted projections.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        )]
        targets: Vec<String>,
        /// Seed of A (FFA-LoRA) and of the row order.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Compute device: auto picks wgpu when a GPU is present, else the CPU.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Where to write the adapter (PEFT format).
        #[arg(long)]
        out: PathBuf,
    },
    /// Enroll this lab: create its identity key and TLS key (both stay here, 0600) and the
    /// public request to send the center for `fedaggregator provision --request`. Never
    /// overwrites a file.
    Enroll {
        /// This lab's participant name (letters, digits, '-', '_', '.').
        #[arg(long)]
        name: String,
        /// Language label of the lab's data.
        #[arg(long)]
        language: String,
        /// The enrollment directory (created 0700 if missing); later, install the kit the
        /// center sends back into it (`fedclient install-kit`).
        #[arg(long)]
        out: PathBuf,
    },
    /// Install the kit the center sent back (participant.toml, ca.pem, client.pem) into this
    /// lab's enrollment directory, after checking that its certificate is the federation
    /// CA's, names this lab and is for this lab's own TLS key. Writes nothing if a check
    /// fails, and never overwrites.
    InstallKit {
        /// The kit's directory, as received from the center.
        #[arg(long)]
        kit: PathBuf,
        /// The lab's enrollment directory (where `enroll` wrote its keys).
        #[arg(long)]
        into: PathBuf,
    },
    /// Create a long-term identity key alone and print the public key for the roster: for a
    /// federation that runs without TLS (`tls.enabled = false`), which has no certificates
    /// to request. With TLS (the default) use `enroll`, which makes this key too.
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
            config,
            aggregator,
            name,
            language,
            data,
            model,
            heldout,
            device,
            patience,
            identity,
            plan_sha256,
            trust_aggregator_plan,
            state_dir,
            min_peers,
            max_rounds,
            max_epsilon,
            share_metrics,
        } => {
            let state_dir = state_dir.or_else(|| {
                config.as_ref().map(|p| {
                    let dir = if p.is_dir() {
                        p.as_path()
                    } else {
                        p.parent().unwrap_or(std::path::Path::new("."))
                    };
                    dir.join("state")
                })
            });
            let kit = config
                .map(|p| {
                    ParticipantKit::load(&p)
                        .with_context(|| format!("loading the participant config {}", p.display()))
                })
                .transpose()?;
            // The file's [policy], then the command line's overrides, checked as one.
            let mut policy = kit.as_ref().map(|k| k.policy.clone()).unwrap_or_default();
            if let Some(names) = share_metrics {
                policy.share_metrics = names
                    .iter()
                    .filter(|n| n.as_str() != "none")
                    .map(|n| n.parse::<SharedMetric>())
                    .collect::<Result<_, _>>()
                    .context("--share-metrics")?;
            }
            if let Some(n) = min_peers {
                policy.min_peers = n;
            }
            if max_rounds.is_some() {
                policy.max_rounds = max_rounds;
            }
            if max_epsilon.is_some() {
                policy.max_epsilon = max_epsilon;
            }
            if plan_sha256.is_some() {
                policy.plan_sha256 = plan_sha256;
            }
            policy
                .validate()
                .context("this lab's policy (participant.toml [policy] and the options)")?;
            if !policy.share_metrics.is_empty() {
                tracing::info!(share = ?policy.share_metrics.iter().map(|m| m.name()).collect::<Vec<_>>(), "this lab's policy shares aggregate metrics with the aggregator");
            }
            let local = kit.as_ref().and_then(|k| k.local.clone());
            let data = data
                .or_else(|| local.as_ref().map(|l| l.data.clone()))
                .context(
                    "no local data: pass --data or set `data` under [local] in participant.toml",
                )?;
            let model = model.or_else(|| local.as_ref().and_then(|l| l.model.clone()));
            let heldout = heldout
                .or_else(|| local.as_ref().map(|l| l.heldout))
                .unwrap_or(0.1);
            let device = match (device, &local) {
                (Some(d), _) => d,
                (None, Some(l)) => {
                    <DeviceChoice as ValueEnum>::from_str(&l.device, true).map_err(|_| {
                        anyhow::anyhow!(
                            "participant.toml: local.device = {:?}: expected auto, cpu or wgpu",
                            l.device
                        )
                    })?
                }
                (None, None) => DeviceChoice::Auto,
            };
            let name = name
                .or_else(|| kit.as_ref().map(|k| k.name.clone()))
                .context("--name is required without --config")?;
            if let Some(k) = &kit
                && k.name != name
            {
                anyhow::bail!(
                    "--name {name:?} differs from the config's participant {:?}: the aggregator knows this lab by its certificate",
                    k.name
                );
            }
            let language = language
                .or_else(|| kit.as_ref().map(|k| k.language.clone()))
                .context("--language is required without --config")?;
            let base = model
                .map(|p| {
                    fedclient::checkpoint::open(&p)
                        .with_context(|| format!("opening the base model {}", p.display()))
                })
                .transpose()?;
            let corpus = match &base {
                None => LocalCorpus::from_file(&data, &language, heldout, &ByteTokenizer),
                Some(checkpoint) => {
                    let files = checkpoint.tokenizer.clone().with_context(|| {
                        format!(
                            "the base model {} has no tokenizer",
                            checkpoint.path.display()
                        )
                    })?;
                    let tokenizer =
                        HfTokenizer::new(files).context("loading the base model's tokenizer")?;
                    LocalCorpus::from_file(&data, &language, heldout, &tokenizer)
                }
            }
            .with_context(|| format!("loading local data from {}", data.display()))?;
            let mut kit = kit;
            if let Some(k) = &mut kit {
                if let Some(p) = &identity {
                    k.identity = p.clone();
                }
                // The lab's own keys never come in the kit: a kit unpacked elsewhere than the
                // enrollment directory is told so, naming the file.
                k.check_lab_keys()
                    .context("this lab's participant.toml names keys that are not there")?;
            }
            let identity = identity
                .or_else(|| kit.as_ref().map(|k| k.identity.clone()))
                .map(|p| {
                    IdentitySeed::load(&p)
                        .with_context(|| format!("loading the identity from {}", p.display()))
                })
                .transpose()?
                .map(Arc::new);
            let selected = select_device(device).context("selecting the compute device")?;
            tracing::info!(device = %selected.label, train_tokens = corpus.train_samples(), "local data loaded");
            let options = ParticipantOptions {
                aggregator_url: aggregator.unwrap_or_default(),
                kit: kit.map(Arc::new),
                name,
                language,
                scoring: participant::Scoring::BOTH,
                connect_patience: Duration::from_secs(patience),
                identity,
                base: base.map(Arc::new),
                trust_aggregator_plan,
                state_dir,
                ..ParticipantOptions::new("", "", "")
            }
            .with_policy(&policy);
            leave_on_ctrl_c(options.leave.clone());
            let report = participant::run(
                options,
                corpus,
                selected.device,
                Arc::new(JoinDisplay::default()),
            )
            .await
            .context("taking part in the federation")?;
            match report.ended {
                RunEnd::Finished { rounds_completed } => println!(
                    "the federation finished after {rounds_completed} rounds; this lab trained {}",
                    report.rounds.len()
                ),
                RunEnd::MaxRounds { max_rounds } => println!(
                    "left after {} rounds, as this lab's policy says (max_rounds = {max_rounds}); the federation goes on",
                    report.rounds.len()
                ),
                RunEnd::LeftOnRequest => println!(
                    "left after {} rounds, as asked (Ctrl-C); the federation goes on without this lab",
                    report.rounds.len()
                ),
                RunEnd::PrivacyBudget { max_epsilon, spent } => println!(
                    "left after {} rounds with ε = {spent:.3} spent: another round could exceed this lab's budget (max_epsilon = {max_epsilon}); the federation goes on",
                    report.rounds.len()
                ),
            }
            if let Some(spent) = report.epsilon_spent {
                println!(
                    "privacy: this lab's data has spent ε = {spent:.3} (δ = {:e}) in this federation",
                    report.plan.privacy.delta
                );
            }
            if let (Some(before), Some(after)) = (&report.initial_eval, &report.final_eval) {
                println!(
                    "held-out loss {:.4} -> {:.4} (bits/char {:.3} -> {:.3}) with the last global adapter",
                    before.loss, after.loss, before.bits_per_char, after.bits_per_char
                );
            }
            Ok(())
        }
        Command::Train {
            model,
            data,
            heldout,
            steps,
            batch_size,
            seq_len,
            grad_accumulation,
            lr,
            rank,
            alpha,
            dropout,
            targets,
            seed,
            device,
            out,
        } => {
            let model_path = model.unwrap_or_else(fedclient::checkpoint::default_model_path);
            if !model_path.exists() {
                anyhow::bail!(
                    "no base model at {}: run `bash scripts/fetch-model.sh` or pass --model PATH",
                    model_path.display()
                );
            }
            let checkpoint = fedclient::checkpoint::open(&model_path)
                .with_context(|| format!("opening the base model {}", model_path.display()))?;
            let data = data
                .iter()
                .map(|d| {
                    let (language, path) = d.split_once('=').with_context(|| {
                        format!("--data {d:?}: expected LANG=PATH, e.g. lo=data/lo.txt")
                    })?;
                    Ok(local_train::LanguageData {
                        language: language.to_string(),
                        paths: vec![PathBuf::from(path)],
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let target_modules = targets
                .iter()
                .map(|t| {
                    TargetModule::from_peft_name(t).with_context(|| {
                        format!("--targets: unknown module {t:?} (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let lora = LoraSpec {
                rank,
                alpha,
                target_modules,
                a_seed: seed,
                dropout,
            };
            let spec = TrainingSpec {
                grad_accumulation,
                seed,
                ..local_train::default_spec(steps, batch_size, seq_len, lr)
            };
            spec.validate(&checkpoint.spec)
                .context("training settings")?;
            let (_, datasets) = local_train::load_datasets(&checkpoint, &data, heldout)
                .context("loading the training data")?;
            let selected = select_device(device).context("selecting the compute device")?;
            println!(
                "{} on {} · {} steps × {} rows × {} tokens",
                checkpoint.spec.name,
                selected.label,
                steps,
                batch_size * grad_accumulation,
                seq_len
            );
            let mut bar = TrainBar::new(steps, "");
            let (model, run) = local_train::fine_tune(
                &checkpoint,
                &datasets,
                &lora,
                &spec,
                &selected.device,
                &mut bar,
            )
            .context("fine-tuning")?;
            bar.finish();
            println!("{} packed rows", run.train_rows);
            for eval in &run.evaluations {
                let (b, a) = &eval.examples;
                println!(
                    "{}: held-out loss {:.4} -> {:.4}, perplexity {:.2} -> {:.2} ({} scored tokens)",
                    eval.language, b.loss, a.loss, b.perplexity, a.perplexity, a.targets
                );
                if let Some((b, a)) = &eval.text {
                    println!(
                        "{}: held-out plain text bits/char {:.3} -> {:.3}",
                        eval.language, b.bits_per_char, a.bits_per_char
                    );
                }
            }
            fedcore::peft::write_dir(&out, &model.export_adapter())
                .with_context(|| format!("writing the adapter to {}", out.display()))?;
            println!("adapter (PEFT) written to {}", out.display());
            Ok(())
        }
        Command::Enroll {
            name,
            language,
            out,
        } => {
            let made = fedclient::enroll::enroll(&fedclient::enroll::EnrollOptions {
                name: name.clone(),
                language,
                out,
            })
            .context("enrolling this lab")?;
            println!("enrolled {name} in {}", made.dir.display());
            println!(
                "  send to the center (public, and the only file that leaves this lab): {}",
                made.request.display()
            );
            println!(
                "  keep private (0600, never sent anywhere): {} and {}",
                made.identity.display(),
                made.tls_key.display()
            );
            println!(
                "  identity public key: {} (read it to the center over another channel, so it can tell your request from a forged one)",
                made.identity_public_key
            );
            println!(
                "  then install the kit the center sends back: `fedclient install-kit --kit KIT_DIR --into {}`, and run `fedclient join --config {}`",
                made.dir.display(),
                made.dir.join(mekong_proto::tls::KIT_FILE).display()
            );
            Ok(())
        }
        Command::InstallKit { kit, into } => {
            let installed = fedclient::enroll::install_kit(&kit, &into).with_context(|| {
                format!(
                    "installing the kit {} into {}",
                    kit.display(),
                    into.display()
                )
            })?;
            let policy = mekong_proto::tls::ParticipantKit::load(&installed)
                .with_context(|| format!("reading {}", installed.display()))?
                .policy;
            println!("kit installed: {}", installed.display());
            match policy.plan_sha256 {
                Some(pin) => println!(
                    "  it pins the plan {pin}: compare it with the other labs over a channel the center does not control before you join"
                ),
                None => println!(
                    "  it pins no plan: set policy.plan_sha256 to the fingerprint the labs agreed on, or `join` refuses"
                ),
            }
            println!("  then: fedclient join --config {}", installed.display());
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

/// The first Ctrl-C asks the participant runtime to leave the federation at the first
/// moment it can without breaking a round (and to tell the aggregator, so no round waits
/// for this lab); a second one quits at once, as a killed process would.
fn leave_on_ctrl_c(leave: participant::LeaveRequest) {
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!(
            "leaving the federation once this lab's part in the round under way is done \
             (Ctrl-C again to quit at once)"
        );
        leave.request();
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("quitting now; the aggregator will count this lab as dropped");
            std::process::exit(130);
        }
    });
}
