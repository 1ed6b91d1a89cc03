#!/usr/bin/env bash
# Search runs side by side on one GPU (strategies × run seeds), each followed by the held-out per-item
# scores of its best (bench/search_proof.py); the seeds of each run seed once (runs of one run seed share
# their 8 seeds), as soon as its first run has finished round 0.
#   bench/search_proof.sh RUN_FILE OUT_DIR [GENERATIONS=16] [RUN_SEEDS="42 7"] [STRATEGIES="ga cmaes random"]
# The base models are scored once, by the first run, before its round 0 (baselines.json, heldout_items.json),
# unless OUT_DIR holds a run that scored them already (an earlier start); the other runs start from a copy
# of them (a run folder holding only these is a new run that reuses them), and `search_proof.py summarize`
# reads them from the first run.
# Memory (measured before the teacher-forced likelihood path, which keeps logits only at the answers): at
# batch 128 each process held ~20 GB (mostly logits), so four fit one H200 and six did not; at batch 64 six
# runs and the scoring jobs fit.
# 16 generations = round 0's 8 seeds + 15 rounds of 8 new candidates = 128 evaluations a run (15: 120).
# Each run keeps only its latest best-model folder (a 135 M float32 model is 0.54 GB; six runs × 16 new
# bests would not fit the machine's disk). Progress: OUT_DIR/*.log; OUT_DIR/DONE when all is done.
# HELDOUT_ARGS: extra arguments to `search_proof.py heldout` (e.g. --limit 5 for a smoke test).
# RUNS: the runs by name, STRATEGY-SEED, instead of every strategy × run seed (e.g. "ga-42 cmaes-42 ga-7").
# Started again on an OUT_DIR that holds earlier progress (e.g. brought back from a machine that went away),
# it goes on from there: a run with a config.yaml is resumed from its latest checkpoint (the runs are
# deterministic, so the result is the uninterrupted run's), a run with its held-out scores is left as it
# is, and base models and seeds already scored are not scored again.
set -u
run_file=${1:?run file}; out=${2:?output folder}; gens=${3:-16}; run_seeds=${4:-42 7}
strats=${5:-ga cmaes random}
mkdir -p "$out"
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
heldout() { python3 bench/search_proof.py heldout "$run_file" "$@" ${HELDOUT_ARGS:-}; }
search() {  # search NAME STRATEGY SEED: the run (or the rest of it), then its best's held-out scores
  [ -s "$out/$1.heldout.json" ] && return
  local resume=(); [ -e "$out/$1/config.yaml" ] && resume=(--resume "$out/$1")
  rm -f "$out/$1.ended"
  python3 -m evoforge run "$run_file" --strategy "$2" --seed "$3" --gens "$gens" \
    --wandb disabled --output-dir "$out/$1" "${resume[@]}" >>"$out/$1.log" 2>&1
  touch "$out/$1.ended"
  heldout "$out/$1" --only best --out "$out/$1.heldout.json" >"$out/$1.heldout.log" 2>&1
}
new_run() {  # new_run FROM NAME: a new run NAME starts from FROM's base-model scores (none of its own yet)
  [ -e "$out/$2/config.yaml" ] && return
  mkdir -p "$out/$2"
  cp "$out/$1/baselines.json" "$out/$2/"
  python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); d["candidates"] = {}; print(json.dumps(d))' \
    "$out/$1/heldout_items.json" >"$out/$2/heldout_items.json"
}
names=(); for seed in $run_seeds; do for strategy in $strats; do names+=("$strategy-$seed"); done; done
[ -n "${RUNS:-}" ] && read -r -a names <<<"$RUNS"
first=${names[0]}
# OUT_DIR may hold other runs already (an earlier start): the first run reuses their base-model scores
donor=$(ls -d "$out"/*/baselines.json 2>/dev/null | grep -v "^$out/$first/" | head -n 1 || true)
[ -n "$donor" ] && [ ! -s "$out/$first/baselines.json" ] && new_run "$(basename "$(dirname "$donor")")" "$first"
search "$first" "${first%-*}" "${first##*-}" &
until [ -s "$out/$first/baselines.json" ] || [ -e "$out/$first.ended" ]; do sleep 5; done
[ -s "$out/$first/baselines.json" ] || { echo "error: $first stopped before scoring the base models" >&2; exit 1; }
for name in "${names[@]:1}"; do
  new_run "$first" "$name"
  search "$name" "${name%-*}" "${name##*-}" &
done
for seed in $(printf '%s\n' "${names[@]##*-}" | awk '!seen[$0]++'); do
  lead=$out/$(printf '%s\n' "${names[@]}" | grep -m1 -- "-$seed\$")
  [ -s "$out/seeds-$seed.heldout.json" ] && continue
  (  # the seeds, once round 0 of this run seed's first run is recorded
    until [ -s "$lead/generations.jsonl" ] || [ -e "$lead.ended" ]; do sleep 10; done
    heldout "$lead" --only seeds --out "$out/seeds-$seed.heldout.json" >"$out/seeds-$seed.heldout.log" 2>&1
  ) &
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do
  for run in "$out"/*/; do  # all but the newest best-model folder of each run
    ls -d "$run"gen_*_best_model 2>/dev/null | sort -V | head -n -1 | xargs -r rm -rf
  done
  sleep 20
done
echo "all done" >"$out/DONE"
