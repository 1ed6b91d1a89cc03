#!/usr/bin/env bash
# Stage a demo trio's wheels for a GPU machine without network that takes one ≤ 64 MiB transfer per call.
#   scripts/stage_trio_parts.sh TRIO [DEST]        (DEST default .parts/TRIO, inside the repo, git-ignored)
#   scripts/stage_trio_parts.sh FOLDER [DEST]      any folder's files the same way (e.g. the ray wheel and the
#                                                  wheels it needs): DEST default .parts/<folder's name>
# Each call sends the repo's working tree too, so the wheels are tarred in order and split into pieces that
# fill what the tree leaves of 64 MiB (less 1 MiB): DEST/01/, DEST/02/, ... each holds one piece and
# SHA256SUMS of all of them. Missing wheels are downloaded first (evoforge.trios.download_wheels, pip).
# Then, per folder, one device call that carries it (the line printed for it), and on the device
#   scripts/device_build_trio.sh /tmp/keep/TRIO-parts /tmp/keep/TRIO-build $OUT    (recipes/qwen2-1.5b/README.md)
# PIECE_MB overrides the piece size; PYTHON the interpreter with evoforge (default .venv/bin/python, python3).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 TRIO|FOLDER [DEST]" >&2; exit 2; }
trio=$1
files=
if [ -d "$trio" ]; then files=$(cd "$trio" && pwd); trio=$(basename "$files"); fi
root=$(cd "$(dirname "$0")/.." && pwd)
dest=${2:-.parts/$trio}
py=${PYTHON:-$root/.venv/bin/python}; [ -x "$py" ] || py=python3
cd "$root"
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
"$py" -c 'import evoforge.trios' 2>/dev/null || {
  echo "error: $py cannot import evoforge and its dependencies: set PYTHON to the project's venv python" >&2; exit 1; }
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
case $dest/ in
  "$root"/*) rel=${dest#"$root"/} ;;
  *) echo "error: DEST $dest is outside the repo $root: a device call carries only paths inside it" >&2; exit 2 ;;
esac
exclude=$(git rev-parse --path-format=absolute --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx "/${rel%%/*}/" "$exclude" 2>/dev/null || echo "/${rel%%/*}/" >> "$exclude"
git check-ignore -q "$rel" || { echo "error: $rel is not git-ignored: every call would send it" >&2; exit 1; }

if [ -n "$files" ]; then  # a folder: its files, in name order
  mapfile -t wheels < <(find "$files" -maxdepth 1 -type f | sort)
  [ ${#wheels[@]} -gt 0 ] || { echo "error: $files holds no file to stage" >&2; exit 2; }
else
  # The trio's wheels, in order (downloading the missing ones); a DemoError is one line.
  mapfile -t wheels < <("$py" -c '
import sys
from evoforge.demo import default_cache_dir
from evoforge.trios import DemoError, download_wheels, get_trio
try:
    print(*download_wheels(get_trio(sys.argv[1]), default_cache_dir()), sep="\n")
except DemoError as exc:
    sys.exit(f"error: {exc}")
' "$trio")
fi
[ ${#wheels[@]} -gt 0 ] || exit 1

# What every call sends anyway: tracked and untracked-not-ignored files (and shared/, where there is one);
# a tracked file deleted from the working tree is not counted (stat fails on it) and does not travel (checked
# on the device on 2026-12-06: the adapters moved out arrived as empty folders).
tree=$({ git ls-files -z -co --exclude-standard | xargs -0 -r stat -c %s -- 2>/dev/null || true; } |
  awk '{s+=$1} END {print s+0}')
[ -d shared ] && tree=$(( tree + $(du -sb shared | cut -f1) ))
limit=$(( 64 << 20 ))
if [ -n "${PIECE_MB:-}" ]; then piece=$(( PIECE_MB << 20 )); else piece=$(( (limit - tree - (1 << 20)) >> 20 << 20 )); fi
if (( piece < 4 << 20 || piece + tree > limit )); then
  echo "error: the working tree sends $(( tree >> 20 )) MiB per call, leaving no room for a $(( piece >> 20 ))" \
    "MiB piece under 64 MiB; commit less or set PIECE_MB" >&2
  exit 1
fi

rm -rf "$dest"/[0-9][0-9] "$dest/.split"
mkdir "$dest/.split"
tar -cf - -C "$(dirname "${wheels[0]}")" "${wheels[@]##*/}" | split -b "$piece" -d -a 2 --numeric-suffixes=1 - "$dest/.split/wheels.tar."
(cd "$dest/.split" && sha256sum wheels.tar.* > SHA256SUMS)
pieces=("$dest"/.split/wheels.tar.*)
for p in "${pieces[@]}"; do
  nn=${p##*.}
  mkdir "$dest/$nn"
  mv "$p" "$dest/$nn/"
  cp "$dest/.split/SHA256SUMS" "$dest/$nn/"
done
rm -rf "$dest/.split"

keep=/tmp/keep/$trio-parts
echo "${#wheels[@]} wheel(s) of $trio in ${#pieces[@]} pieces of at most $(( piece >> 20 )) MiB" \
  "(the tree sends $(( tree >> 20 )) MiB per call); one device call each, carry = the folder:"
for p in "${pieces[@]}"; do
  nn=${p##*.}
  echo "  $rel/$nn    mkdir -p $keep && cp $rel/$nn/* $keep/ && cd $keep && sha256sum -c --ignore-missing SHA256SUMS"
done
