#!/usr/bin/env bash
# `evoforge run` whose records are copied to a second folder every 15 s (MIRROR_EVERY) while it runs, and once
# at its end, so a device queue's poll brings back each generation as it lands (the run folder itself holds
# GBs of models) and a run cut off by the machine's release still leaves every finished generation's record.
# With them goes the latest checkpoint (older ones removed from the mirror), copied before the records so
# these are never older than it: on a fresh machine `evoforge run --resume MIRROR_DIR` continues the run and
# keeps the finished generations' rows as measured (without a checkpoint it would replay them from the cache).
#   bench/run_mirrored.sh MIRROR_DIR evoforge-run-arguments...     (e.g. RUN_FILE --output-dir DIR --gens 3)
set -uo pipefail
mirror=${1:?mirror folder}
shift
run_dir=
for ((i = 1; i <= $#; i++)); do [ "${!i}" = --output-dir ] && { j=$((i + 1)); run_dir=${!j}; }; done
[ -n "$run_dir" ] || { echo "error: run_mirrored.sh needs --output-dir" >&2; exit 2; }
mkdir -p "$mirror"
copy() {
  local latest
  latest=$(find "$run_dir/checkpoints" -name 'evolution_checkpoint_gen_*.json' 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$latest" ]; then
    mkdir -p "$mirror/checkpoints"
    cp "$latest" "$mirror/checkpoints/.partial" && mv "$mirror/checkpoints/.partial" "$mirror/checkpoints/${latest##*/}"
    find "$mirror/checkpoints" -name 'evolution_checkpoint_gen_*.json' ! -name "${latest##*/}" -delete
  fi
  cp "$run_dir"/*.jsonl "$run_dir"/*.json "$run_dir"/config.yaml "$mirror/" 2>/dev/null || true
}
python3 -m evoforge run "$@" &
pid=$!
trap 'kill -INT $pid 2>/dev/null' INT TERM
while kill -0 "$pid" 2>/dev/null; do copy; sleep "${MIRROR_EVERY:-15}"; done
wait "$pid"
rc=$?
copy
exit "$rc"
