#!/usr/bin/env bash
# Regenerates the layout experiments of docs/experiments/federation-layouts.md (issue #17)
# on the real pretrained base, SmolLM2-135M-Instruct (fetched by scripts/fetch-model.sh,
# which this runs first): one directory of strategies.{json,png} and strategies-tables.md
# per layout. About 35 minutes per layout on two CPU cores.
#
#   bash scripts/experiments.sh                 # both layouts
#   LAYOUTS=per-country bash scripts/experiments.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/fetch-model.sh
LAYOUTS="${LAYOUTS:-per-country one-per-language}"
cargo build --release -p mekong-examples --bin strategy-experiment
bin="${CARGO_TARGET_DIR:-target}/release/strategy-experiment"

for layout in $LAYOUTS; do
  case "$layout" in
    # Three languages of three labs each: nine labs, every arm on the same batches.
    per-country)
      languages=lo,th,vi
      arms=group_b,fedsa_lora,ffa_lora,local_only,centralised_language ;;
    # One lab per language: group_b would be FedSA-LoRA with the server holding B, so the
    # single global modes, FedSA-LoRA and the centralised model on every language.
    one-per-language)
      languages=lo,th,vi
      arms=fedsa_lora,ffa_lora,fedit,local_only,centralised ;;
    *) echo "unknown layout $layout" >&2; exit 2 ;;
  esac
  out="docs/experiments/smollm2-$layout"
  echo "== $layout -> $out"
  "$bin" --model auto --layout "$layout" --languages "$languages" --arms "$arms" \
    --rounds 3 --local-steps 4 --out "$out"
done
