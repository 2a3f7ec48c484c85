#!/usr/bin/env bash
# Mekong against PyTorch + PEFT on the same LoRA fine-tuning workload, back to back on this
# machine, and the ratio (issue #18). Not run in CI: it installs torch from PyPI.
#
#   bash bench/cpu-vs-pytorch.sh [--steps N] [--warmup N] [--seq N] [--batch N]
#
# Needs SmolLM2 in the model cache (bash scripts/fetch-model.sh). The PyTorch side runs in
# a virtual environment under ~/.cache/mekong/bench-venv (made on first use: torch CPU
# wheel, transformers, peft, gguf). Both sides train B only (FFA-LoRA: Mekong's default
# for this bench, PEFT with lora_A frozen), LoRA rank 8 on all seven projections, AdamW.
# Prints each side's JSON line and one summary line; writes nothing else.
set -euo pipefail

cd "$(dirname "$0")/.."
steps=8
warmup=2
seq=256
batch=4
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    *) echo "unknown argument: $1 (expected --steps, --warmup, --seq, --batch)" >&2; exit 2 ;;
  esac
done

cache="${MEKONG_CACHE:-$HOME/.cache/mekong}"
model="$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$model" ]; then
  echo "no SmolLM2 at $model: run bash scripts/fetch-model.sh first" >&2
  exit 1
fi

venv="$cache/bench-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
  echo "== making $venv (torch CPU, transformers, peft, gguf)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu torch 2>/dev/null \
    || "$venv/bin/pip" install --quiet torch
  "$venv/bin/pip" install --quiet transformers peft gguf
fi

common=(--seq "$seq" --batch "$batch" --steps "$steps" --warmup "$warmup")

echo "== Mekong (cargo bench -p fedclient --bench lora_finetune)" >&2
mekong=$(cargo bench --quiet -p fedclient --bench lora_finetune -- --device cpu --model "$model" "${common[@]}" | grep '^{' | tail -n 1)
echo "$mekong"

echo "== PyTorch + PEFT (bench/pytorch_lora_bench.py --ffa)" >&2
pytorch=$("$venv/bin/python" bench/pytorch_lora_bench.py --gguf "$model" --ffa "${common[@]}" 2>/dev/null | grep '^{' | tail -n 1)
echo "$pytorch"

python3 - "$mekong" "$pytorch" <<'EOF'
import json, sys
m, p = (json.loads(a) for a in sys.argv[1:3])
print(
    f"Mekong {m['tokens_per_s']:.1f} tokens/s, peak {m['peak_rss_mib'] / 1024:.2f} GiB; "
    f"PyTorch + PEFT {p['tokens_per_s']:.1f} tokens/s, peak {p['peak_rss_mib'] / 1024:.2f} GiB; "
    f"ratio {m['tokens_per_s'] / p['tokens_per_s']:.2f}x ({m['device']}, {m['steps']} timed steps of {m['batch']} x {m['seq']})"
)
EOF
