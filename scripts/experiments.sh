#!/usr/bin/env bash
# Regenerates the layout experiments of docs/experiments/federation-layouts.md (issue #17)
# on the real pretrained bases, SmolLM2-135M-Instruct and Gemma 3 270m (fetched by
# scripts/fetch-model.sh, which this runs first): one directory
# docs/experiments/<model>-<layout>/ of strategies.{json,png} and strategies-tables.md per
# model and layout. On two CPU cores about 35-45 minutes per layout on SmolLM2, about three
# times that on Gemma 3 (its 262,144-token head).
#
#   bash scripts/experiments.sh                 # both models, both layouts
#   MODELS=gemma3 LAYOUTS=per-country bash scripts/experiments.sh
#   ARMS=group_b,local_only,centralised_language ...   # fewer arms (per-country only)
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS="${MODELS:-smollm2 gemma3}"
for model in $MODELS; do bash scripts/fetch-model.sh "$model" >/dev/null; done
LAYOUTS="${LAYOUTS:-per-country one-per-language}"
cargo build --release -p mekong-examples --bin strategy-experiment
bin="${CARGO_TARGET_DIR:-target}/release/strategy-experiment"

for model in $MODELS; do
for layout in $LAYOUTS; do
  case "$layout" in
    # Three languages of three labs each: nine labs, every arm on the same batches.
    per-country)
      languages=lo,th,vi
      arms="${ARMS:-group_b,fedsa_lora,ffa_lora,local_only,centralised_language}" ;;
    # One lab per language: group_b would be FedSA-LoRA with the server holding B, so the
    # single global modes, FedSA-LoRA and the centralised model on every language.
    one-per-language)
      languages=lo,th,vi
      arms=fedsa_lora,ffa_lora,fedit,local_only,centralised ;;
    *) echo "unknown layout $layout" >&2; exit 2 ;;
  esac
  out="docs/experiments/$model-$layout"
  echo "== $model, $layout -> $out"
  "$bin" --model "$model" --layout "$layout" --languages "$languages" --arms "$arms" \
    --rounds 3 --local-steps 4 --out "$out"
done
done
