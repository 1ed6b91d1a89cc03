#!/usr/bin/env bash
# The GPU machine's half of a trio's build (recipes/qwen2-1.5b/README.md, "Getting it onto a GPU machine").
#   scripts/device_build_trio.sh WHEELS_DIR OUT_DIR [EXPORT_DIR]
# WHEELS_DIR: the trio's wheels, or the pieces scripts/stage_trio_parts.sh made (SHA256SUMS, wheels.tar.NN),
# checked and unpacked into WHEELS_DIR/wheels first. Steps: (a) `evoforge demo prepare` builds the ancestor,
# (b) scripts/build_adapters.sh trains the LoRA adapters into OUT_DIR/adapters, (c) prepare again builds the
# specialists from them. Each step's wall time goes to OUT_DIR/build.log. Finished steps are skipped (prepare
# is idempotent; a trained adapter is kept), so a call cut off by its time limit is simply repeated.
# EXPORT_DIR (e.g. $OUT): build.log and adapter-NAME.tar per adapter, few files for the trip back.
# TRIO (default qwen2-1.5b), TRAIN_ARGS (to train_adapters.py), PYTHON (default python3). Where evoforge's
# dependencies are missing, the wheels in .whl/ (../shared/tools/device-wheels.sh) go to SITE (/tmp/keep/site).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 WHEELS_DIR OUT_DIR [EXPORT_DIR]" >&2; exit 2; }
trio=${TRIO:-qwen2-1.5b}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$2" ${3:+"$3"}
wheels=$(cd "$1" && pwd); out=$(cd "$2" && pwd); export_dir=${3:+$(cd "$3" && pwd)}
py=${PYTHON:-python3}; site=${SITE:-/tmp/keep/site}
log=$out/build.log
cd "$root"
committed_dir=$root/recipes/$(case $trio in smollm2) echo demo ;; *) echo "$trio" ;; esac)/adapters
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH} PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

current=setup
started=$(date +%s)
say() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
finish() {
  local rc=$?
  if (( rc != 0 )); then say "FAILED in step '$current' (exit $rc) after $(( $(date +%s) - started )) s; output above and in $log"; fi
  if [ -n "$export_dir" ]; then
    cp "$log" "$export_dir/build.log"
    local a name
    for a in "$out"/adapters/*/training.json; do
      [ -e "$a" ] || continue
      name=$(basename "$(dirname "$a")")
      [ -e "$committed_dir/$name/training.json" ] && continue  # already in the repo
      tar -cf "$export_dir/adapter-$name.tar" -C "$out/adapters" "$name"
    done
  fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 143' TERM
step() {  # step NAME COMMAND...: run it, its output into the log, and log its wall time
  current=$1; shift
  local t0; t0=$(date +%s)
  say "step $current: $*"
  "$@" 2>&1 | tee -a "$log" | tee "$out/$current.out"
  say "step $current done in $(( $(date +%s) - t0 )) s"
}

deps() {  # evoforge's needs, from .whl/ where the image lacks them; every import the build and calibration make
  local need='import pydantic, mergekit, lm_eval, gguf, peft, typer, rich, transformers, evoforge.evolve.candidates'
  if ! "$py" -c "$need" 2>/dev/null && [ ! -e "$site/.installed" ]; then
    [ -d "$root/.whl" ] || { echo "error: $py lacks evoforge's dependencies and there is no .whl/ to install (carry .whl)"; return 1; }
    rm -rf "$site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl
    touch "$site/.installed"
  fi
  PYTHONPATH=$PYTHONPATH:$site "$py" -c "$need, pydoc_data.topics, torch
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| transformers',
      transformers.__version__, '| peft', peft.__version__, '| cuda:', torch.cuda.is_available()
      and torch.cuda.get_device_name())"
}
step deps deps
[ -e "$site/.installed" ] && export PYTHONPATH=$PYTHONPATH:$site
export SKIP_TRAINED=1 PYTHON=$py

unpack() {  # every piece present and intact, then the tar they make
  (cd "$wheels" && sha256sum -c --quiet SHA256SUMS) || {
    echo "error: $wheels: pieces missing or damaged (above); copy them again"; return 1; }
  rm -rf "$wheels/wheels.tmp" && mkdir "$wheels/wheels.tmp"
  cat "$wheels"/wheels.tar.* | tar -xf - -C "$wheels/wheels.tmp"
  mv "$wheels/wheels.tmp" "$wheels/wheels"
  ls -l "$wheels/wheels"
}
if [ -f "$wheels/SHA256SUMS" ]; then
  [ -d "$wheels/wheels" ] || step unpack unpack
  wheels=$wheels/wheels
fi

prepare() { "$py" -m evoforge demo prepare --trio "$trio" --wheels "$wheels" --adapters "$1"; }
step ancestor prepare "$out/no-adapters"   # no such folder: the ancestor alone
ancestor=$(awk -F'\t' '$1 == "ancestor" {print $2}' "$out/ancestor.out")
[ -d "$ancestor" ] || { say "no ancestor folder in prepare's output"; exit 1; }
committed() {  # the adapters already in the repo are used as they are, not trained again
  mkdir -p "$out/adapters"
  for a in "$committed_dir"/*/training.json; do
    [ -e "$a" ] || continue
    local name; name=$(basename "$(dirname "$a")")
    [ -e "$out/adapters/$name/training.json" ] || cp -r "$(dirname "$a")" "$out/adapters/"
    echo "$name: committed in $committed_dir, not trained again"
  done
}
step committed committed
step adapters scripts/build_adapters.sh "$trio" "$ancestor" "$out/adapters"
step specialists prepare "$out/adapters"
current=done
say "all steps done in $(( $(date +%s) - started )) s; adapters in $out/adapters"
