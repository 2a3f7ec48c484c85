#!/usr/bin/env bash
# Puts "judging" text in the labs' languages into a local cache and prints its directory.
#
#   scripts/fetch-judging-text.sh       # -> ~/.cache/mekong/judging/{lang}.txt, manifest.json
#   MEKONG_JUDGING_DIR=/data/judging scripts/fetch-judging-text.sh
#
# Why: training uses only the UDHR (data/udhr/), so a model's score on the UDHR says how well
# it learnt its training text, not how well it models the language. This fetches independent
# text that no lab trains on, to judge models by.
#
# What: localisation text from Debian packages (needs a Debian or Ubuntu machine with apt,
# dpkg-deb and python3; `apt-get update` must have run):
#   libreoffice  libreoffice-help-{lang}: LibreOffice's help pages, manual prose
#                (about 1-2 M characters a language; Debian has them for km, vi, id).
#   firefox      firefox-esr-l10n-{lang}: Firefox's user-interface messages and sentences
#                (0.2-0.5 M characters; th, my, km, vi, id, ms, tl).
# for the labs' languages lo vi th km my id ms tl; a package Debian does not have is listed in
# the manifest as missing (there is nothing at all for lo). libreoffice-help-en-us is fetched
# too, only to recognise English: help paragraphs that were never translated, and untranslated
# labels in the Latin-script languages (both are dropped).
#
# Output, in ${MEKONG_JUDGING_DIR:-$HOME/.cache/mekong/judging}:
#   {lang}.{source}.txt  one package's text (source: libreoffice or firefox), always written
#                        per source, so a score can be reported per kind of text;
#   {lang}.txt           all the language's text: its libreoffice lines, then its firefox lines
#                        not already there. Use this one unless the kind of text matters.
#   manifest.json        for each language and source: Debian package, exact version, SHA-256
#                        of the .deb, licence, line and character counts, SHA-256 of each text
#                        file, how many units each filter dropped; and the missing packages.
#   debs/                the .deb files themselves, kept so a rebuild needs no network.
# The text is UTF-8, NFC, one paragraph or message a line, markup and placeholders removed,
# exact duplicate lines removed, only lines with at least 3 letters of the language's script
# (and, for vi/id/ms/tl, not English), no line of the training text. Khmer help separates
# words with U+200B; that is removed, as the training text has none. The extraction is
# scripts/extract_judging_text.py; see it for the details.
#
# Licence: the text in these packages is under the Mozilla Public License 2.0 (MPL-2.0; see
# usr/share/doc/<package>/copyright in each .deb; LibreOffice's adds that some files carry
# Apache-2.0 material from OpenOffice.org). It is fetched into a cache at set-up and never
# committed to the repository.
#
# The packages are whatever version Debian offers now (Debian replaces them with security
# updates), so two labs only judge on the same text when their manifests agree: compare the
# sha256 of {lang}.txt, or copy one lab's directory to the others.
#
# Idempotent: when manifest.json already records the versions apt offers now, was written by
# the same extractor and every text file still has its recorded SHA-256, nothing is done.
# Otherwise the text is rebuilt (from debs/ where the right .deb is there) and replaces the old
# files. Delete manifest.json to force a rebuild.
set -euo pipefail

LANGS=(lo vi th km my id ms tl)
SOURCES=(libreoffice firefox)
ENGLISH_REFERENCE=libreoffice-help-en-us

OUT_DIR="${MEKONG_JUDGING_DIR:-$HOME/.cache/mekong/judging}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EXTRACTOR="$REPO/scripts/extract_judging_text.py"
TRAINING_DIR="$REPO/data/udhr"

for tool in apt-cache apt-get dpkg-deb python3; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "fetch-judging-text: needs \`$tool\` (a Debian or Ubuntu machine with python3)" >&2
        exit 1
    fi
done

package_of() { # source lang
    case "$1" in
        libreoffice) echo "libreoffice-help-$2" ;;
        firefox) echo "firefox-esr-l10n-$2" ;;
    esac
}

# "package version" for each package apt would fetch now (one apt-cache call for all); a
# package apt does not know, or only as a virtual package, is left out.
candidate_versions() {
    apt-cache policy "$@" 2>/dev/null | awk '
        /^[^ ].*:$/ { pkg = substr($0, 1, length($0) - 1) }
        /^ *Candidate:/ && $2 != "(none)" { print pkg, $2 }'
}

# A field of the package's record in apt's lists, e.g. SHA256 or Filename.
apt_field() { # package version field
    apt-cache show "$1=$2" 2>/dev/null | awk -v f="$3:" '$1 == f { print $2; exit }'
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

work="$(mktemp -d "${TMPDIR:-/tmp}/mekong-judging.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# 1. Which packages exist, in which version: lang, source, package, version.
rows=()
for lang in "${LANGS[@]}"; do
    for source in "${SOURCES[@]}"; do
        rows+=("$lang $source $(package_of "$source" "$lang")")
    done
done
rows+=("en english $ENGLISH_REFERENCE")
declare -A version=()
packages=()
for row in "${rows[@]}"; do packages+=("${row##* }"); done
while read -r pkg ver; do
    version[$pkg]="$ver"
done < <(candidate_versions "${packages[@]}")
plan="$work/plan.tsv"
: >"$plan"
found=0
for row in "${rows[@]}"; do
    read -r lang source pkg <<<"$row"
    ver="${version[$pkg]:-}"
    printf '%s\t%s\t%s\t%s\n' "$lang" "$source" "$pkg" "$ver" >>"$plan"
    if [[ -n "$ver" && "$source" != english ]]; then
        found=$((found + 1))
    fi
done
if [[ "$found" == 0 ]]; then
    echo "fetch-judging-text: apt knows none of the packages; run \`apt-get update\` (Debian bookworm has them)" >&2
    exit 1
fi

if [[ -f "$OUT_DIR/manifest.json" ]] && python3 "$EXTRACTOR" is-current "$OUT_DIR/manifest.json" "$plan"; then
    echo "fetch-judging-text: $OUT_DIR is up to date" >&2
    echo "$OUT_DIR"
    exit 0
fi

# 2. Fetch (or reuse) and unpack each package; the full plan gains sha256 and directory.
mkdir -p "$OUT_DIR/debs"
full_plan="$work/full-plan.tsv"
: >"$full_plan"
kept_debs=()
while IFS=$'\t' read -r lang source pkg ver; do
    if [[ -z "$ver" ]]; then
        echo "fetch-judging-text: Debian has no package $pkg; skipping it" >&2
        printf '%s\t%s\t%s\t\t\t\n' "$lang" "$source" "$pkg" >>"$full_plan"
        continue
    fi
    want_sha="$(apt_field "$pkg" "$ver" SHA256)"
    deb_name="$(basename "$(apt_field "$pkg" "$ver" Filename)")"
    if [[ -z "$want_sha" || -z "$deb_name" || "$deb_name" == . ]]; then
        echo "fetch-judging-text: apt has no SHA256/Filename for $pkg=$ver" >&2
        exit 1
    fi
    deb="$OUT_DIR/debs/$deb_name"
    if [[ ! -f "$deb" || "$(sha256_of "$deb")" != "$want_sha" ]]; then
        echo "fetch-judging-text: downloading $pkg=$ver" >&2
        rm -rf "$work/dl" && mkdir -p "$work/dl"
        # apt-get download warns that the _apt user cannot write here; the download is fine.
        (cd "$work/dl" && apt-get download -q "$pkg=$ver" 2>&1 | grep -v -e '^W: Download is performed unsandboxed' >&2 || true)
        got="$(find "$work/dl" -maxdepth 1 -name "${pkg}_*.deb" | head -n 1)"
        if [[ -z "$got" ]]; then
            echo "fetch-judging-text: apt-get download $pkg=$ver fetched nothing" >&2
            exit 1
        fi
        have_sha="$(sha256_of "$got")"
        if [[ "$have_sha" != "$want_sha" ]]; then
            echo "fetch-judging-text: $pkg=$ver has SHA-256 $have_sha, apt's lists say $want_sha" >&2
            exit 1
        fi
        mv -f "$got" "$deb.partial.$$"
        mv -f "$deb.partial.$$" "$deb"
    fi
    kept_debs+=("$deb_name")
    unpacked="$work/unpacked/$pkg"
    mkdir -p "$unpacked"
    dpkg-deb -x "$deb" "$unpacked"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$lang" "$source" "$pkg" "$ver" "$want_sha" "$unpacked" >>"$full_plan"
done <"$plan"

# 3. Extract into a staging directory, then replace the old text files with the new ones.
staging="$work/out"
python3 "$EXTRACTOR" build "$full_plan" "$staging" --exclude-dir "$TRAINING_DIR"
rm -f "$OUT_DIR/manifest.json"
for lang in "${LANGS[@]}"; do
    rm -f "$OUT_DIR/$lang.txt"
    for source in "${SOURCES[@]}"; do rm -f "$OUT_DIR/$lang.$source.txt"; done
done
for f in "$staging"/*.txt; do
    mv -f "$f" "$OUT_DIR/"
done
mv -f "$staging/manifest.json" "$OUT_DIR/manifest.json"

# .deb files of versions no longer offered are of no further use.
for f in "$OUT_DIR"/debs/*.deb; do
    [[ -e "$f" ]] || continue
    keep=0
    for k in "${kept_debs[@]}"; do
        [[ "$(basename "$f")" == "$k" ]] && keep=1
    done
    [[ "$keep" == 1 ]] || rm -f "$f"
done

echo "$OUT_DIR"
