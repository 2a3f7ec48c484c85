//! LoRA fine-tuning throughput and peak memory on a real base model.
//!
//! ```text
//! cargo bench -p fedclient --bench lora_finetune -- [--model PATH] [--device cpu|wgpu]
//!     [--seq 256] [--batch 4] [--steps 8] [--warmup 2] [--rank 8]
//! ```
//!
//! With `--features ndarray`, `--device ndarray` runs the same workload on burn's ndarray
//! backend, to compare the two CPU backends burn 0.22 offers.
//!
//! The workload matches bench/pytorch_lora_bench.py: SmolLM2-135M-Instruct (default: the
//! file scripts/fetch-model.sh caches), LoRA rank 8 / alpha 16 on all seven projections,
//! AdamW, random windows of UDHR English text. Mekong trains B only (FFA-LoRA, A frozen), so
//! compare with the PyTorch script's `--ffa`. Prints one JSON line: tokens/s over the timed
//! steps, seconds per step, and the process's peak resident memory (VmHWM).

use std::path::PathBuf;
use std::time::Instant;

use fedclient::checkpoint;
use fedclient::device::{DeviceChoice, select_device};
use fedclient::model::LoraLlama;
use fedclient::train::{RandomWindows, train};
use fedcore::{LoraSpec, TargetModule, TrainingSpec};

/// The device to run on: one the product can choose, or (bench only) ndarray.
#[derive(Clone, Copy)]
enum BenchDevice {
    Product(DeviceChoice),
    #[cfg(feature = "ndarray")]
    Ndarray,
}

struct Args {
    model: PathBuf,
    device: BenchDevice,
    seq: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    rank: usize,
}

fn parse() -> Args {
    let mut args = Args {
        model: fedclient::checkpoint::default_model_path(),
        device: BenchDevice::Product(DeviceChoice::Cpu),
        seq: 256,
        batch: 4,
        steps: 8,
        warmup: 2,
        rank: 8,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => args.model = PathBuf::from(value()),
            "--device" => {
                args.device = match value().as_str() {
                    "cpu" => BenchDevice::Product(DeviceChoice::Cpu),
                    "wgpu" => BenchDevice::Product(DeviceChoice::Wgpu),
                    #[cfg(feature = "ndarray")]
                    "ndarray" => BenchDevice::Ndarray,
                    other => {
                        panic!("--device cpu|wgpu (ndarray with --features ndarray), got {other}")
                    }
                }
            }
            "--seq" => args.seq = value().parse().expect("--seq N"),
            "--batch" => args.batch = value().parse().expect("--batch N"),
            "--steps" => args.steps = value().parse().expect("--steps N"),
            "--warmup" => args.warmup = value().parse().expect("--warmup N"),
            "--rank" => args.rank = value().parse().expect("--rank N"),
            // cargo bench passes --bench; ignore it and other harness flags.
            _ => {}
        }
    }
    args
}

/// Peak resident set size of this process in MiB (Linux), from /proc/self/status.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() {
    let args = parse();
    if !args.model.exists() {
        eprintln!(
            "no model at {}: run scripts/fetch-model.sh or pass --model PATH",
            args.model.display()
        );
        std::process::exit(2);
    }
    let (device, label) = match args.device {
        BenchDevice::Product(choice) => {
            let selected = select_device(choice).expect("device");
            (selected.device, selected.label)
        }
        // Deprecated by burn in favour of flex: measured here to show why it is not used.
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        BenchDevice::Ndarray => (burn::tensor::Device::ndarray(), "cpu (ndarray)".to_string()),
    };
    let load = Instant::now();
    let ckpt = checkpoint::open(&args.model).expect("opening the checkpoint");
    let tokenizer = ckpt
        .tokenizer
        .as_ref()
        .expect("the checkpoint has a tokenizer");
    let text = include_str!("../../data/udhr/en.txt");
    let tokens: Vec<u32> = tokenizer
        .tokenizer
        .encode(text, false)
        .expect("tokenizing")
        .get_ids()
        .to_vec();
    let lora = LoraSpec {
        rank: args.rank,
        alpha: 2.0 * args.rank as f32,
        target_modules: TargetModule::ALL.to_vec(),
        a_seed: 1,
        dropout: 0.0,
    };
    let mut model = LoraLlama::from_checkpoint(&ckpt, &lora, &device).expect("model");
    let load_s = load.elapsed().as_secs_f64();
    let spec = |steps| TrainingSpec {
        local_steps: steps,
        batch_size: args.batch,
        seq_len: args.seq,
        learning_rate: 1e-4,
        ..TrainingSpec::default()
    };
    if args.warmup > 0 {
        let mut source =
            RandomWindows::new(&tokens, args.batch, args.seq, model.window_prefix(), 1)
                .expect("windows");
        model = train(model, &spec(args.warmup), &mut source, &device, &mut ())
            .expect("warm-up")
            .0;
    }
    let mut source = RandomWindows::new(&tokens, args.batch, args.seq, model.window_prefix(), 2)
        .expect("windows");
    let start = Instant::now();
    let (_, reports) =
        train(model, &spec(args.steps), &mut source, &device, &mut ()).expect("training");
    let elapsed = start.elapsed().as_secs_f64();
    let tokens_done: usize = reports.iter().map(|r| r.tokens).sum();
    println!(
        "{{\"impl\": \"mekong (burn 0.22)\", \"device\": {:?}, \"seq\": {}, \"batch\": {}, \"steps\": {}, \"trainable_params\": {}, \"tokens_per_s\": {:.1}, \"s_per_step\": {:.3}, \"peak_rss_mib\": {:.1}, \"load_s\": {:.2}, \"last_loss\": {:.4}}}",
        label,
        args.seq,
        args.batch,
        args.steps,
        ckpt.spec
            .lora_modules(&lora.target_modules)
            .iter()
            .map(|m| m.out_features * lora.rank)
            .sum::<usize>(),
        tokens_done as f64 / elapsed,
        elapsed / args.steps as f64,
        peak_rss_mib().unwrap_or(f64::NAN),
        load_s,
        reports.last().map_or(f64::NAN, |r| r.loss),
    );
}
