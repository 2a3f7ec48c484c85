//! `pilot`: run a federation of national-language labs on this machine.
//!
//! One aggregator on loopback and, by default, three labs per language (a ministry, a
//! university and a hospital, each with its own shard of the UDHR text and its own keys), a
//! few rounds with secure aggregation, then a table of held-out loss per lab: before, with
//! the model the lab ends up using, alone with the same budget, and with its language's
//! text pooled in one place.

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::Parser;
use fedclient::device::DeviceChoice;
use fedcore::AggregationMode;
use fedcore::privacy::{PrivacyMode, PrivacySpec, RecordDpSpec};
use mekong_examples::canary::Canary;
use mekong_examples::layout::Layout;
use mekong_examples::pilot::{PilotModel, PilotOptions};

#[derive(Parser)]
#[command(
    name = "pilot",
    version,
    about = "Mekong pilot federation over the UDHR in South-East Asian languages"
)]
struct Args {
    /// Base model: `auto` (SmolLM2-135M-Instruct when scripts/fetch-model.sh has cached it,
    /// else `small`), a byte-level preset trained from a seed (`tiny`, `small`, `base`), a
    /// cached pretrained model (`smollm2`, `gemma3`: `bash scripts/fetch-model.sh gemma3`),
    /// or a GGUF file / Hugging Face directory.
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
    /// Comma-separated language codes (lo, km, th, vi, my, id, ms, tl, en) [default:
    /// lo,km,th,vi,my,id, or lo,km,th for a pretrained model].
    #[arg(long, value_delimiter = ',')]
    languages: Option<Vec<String>>,
    /// Who the labs are: `per-country` (a ministry, a university and a hospital per
    /// language, each with a 3 : 2 : 1 shard of its text) or `one-per-language`.
    #[arg(long, default_value = "per-country")]
    layout: String,
    /// Aggregation mode: `auto` (group_b when every language has three labs, else
    /// fedsa_lora), or ffa_lora, fedsvd, fedit, hetlora, fedsa_lora, rolora, fedex_lora, group_b.
    #[arg(long, default_value = "auto")]
    strategy: String,
    /// Sequences per batch [default: 8, or 2 for a pretrained model].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Tokens per sequence (bytes for the presets) [default: 64, or 128 for a pretrained model].
    #[arg(long)]
    seq_len: Option<usize>,
    /// AdamW learning rate [default: 5e-3, or 2e-3 for a pretrained model, 5e-4 for Gemma 3].
    #[arg(long)]
    lr: Option<f64>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    rank: usize,
    /// Output directory for the aggregator's adapters.
    #[arg(long, default_value = "runs/pilot")]
    out: PathBuf,
    /// Skip the baselines (local-only and centralised).
    #[arg(long)]
    no_local_baseline: bool,
    /// Turn secure aggregation off: the aggregator sees every lab's update in plaintext.
    #[arg(long)]
    insecure_plaintext: bool,
    /// Port of the aggregator's status page and /metrics on 127.0.0.1 [default: a free
    /// port, printed at start].
    #[arg(long, default_value_t = 0)]
    admin_port: u16,
    /// Every lab shares its held-out loss before and after each round, so the status page
    /// draws loss curves (two held-out evaluations per lab and round).
    #[arg(long)]
    share_losses: bool,
    /// Differential privacy on every sum: each lab adds its share of discrete Gaussian
    /// noise before masking, this many times the L2 clip in all (`[plan.privacy] mode =
    /// "distributed"`; docs/privacy.md). Picks fedsa_lora under `--strategy auto`.
    #[arg(long)]
    dp_noise: Option<f64>,
    /// With --dp-noise: each lab's update is scaled to at most this L2 norm.
    #[arg(long, default_value_t = PrivacySpec::default().l2_clip)]
    dp_clip: f64,
    /// Record-level DP-SGD in every lab (`[plan.privacy.record]`): per-record gradients
    /// clipped to --dp-sgd-clip, Gaussian noise of this many times the clip.
    #[arg(long)]
    dp_sgd_noise: Option<f64>,
    /// With --dp-sgd-noise: each record's gradient is scaled to at most this L2 norm.
    #[arg(long, default_value_t = 1.0)]
    dp_sgd_clip: f64,
    /// A memorisation test: plant a canary sentence with a random six-digit secret in this
    /// lab's training text (e.g. lab-lo-ministry) and report its exposure under the models
    /// after the run.
    #[arg(long)]
    canary_lab: Option<String>,
    /// With --canary-lab: how many times the canary is repeated in the lab's text.
    #[arg(long, default_value_t = 20)]
    canary_repeats: usize,
    /// With --dp-noise or --dp-sgd-noise: the δ of the (ε, δ) guarantee.
    #[arg(long, default_value_t = PrivacySpec::default().delta)]
    dp_delta: f64,
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
    let layout = Layout::parse(&a.layout).ok_or_else(|| {
        anyhow!(
            "--layout must be per-country or one-per-language, got {:?}",
            a.layout
        )
    })?;
    let strategy = match a.strategy.as_str() {
        "auto" => None,
        name => Some(
            AggregationMode::ALL
                .into_iter()
                .find(|m| m.name() == name)
                .ok_or_else(|| anyhow!("--strategy: unknown mode {name:?}"))?,
        ),
    };
    let options = PilotOptions {
        languages: a.languages.unwrap_or(defaults.languages.clone()),
        layout,
        strategy,
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
        share_losses: a.share_losses,
        privacy: PrivacySpec {
            mode: if a.dp_noise.is_some() {
                PrivacyMode::Distributed
            } else {
                PrivacyMode::Off
            },
            noise_multiplier: a
                .dp_noise
                .unwrap_or(PrivacySpec::default().noise_multiplier),
            l2_clip: a.dp_clip,
            delta: a.dp_delta,
            record: a.dp_sgd_noise.map(|noise_multiplier| RecordDpSpec {
                noise_multiplier,
                max_grad_norm: a.dp_sgd_clip,
            }),
        },
        canary: a
            .canary_lab
            .as_deref()
            .map(|lab| Canary::new(lab, a.canary_repeats, 0x00ca_4a12)),
        ..defaults
    };
    let report = mekong_examples::pilot::run(options).await?;
    print!("{}", mekong_examples::table::render(&report));
    Ok(())
}
