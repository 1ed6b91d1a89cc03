#!/usr/bin/env bash
# Search runs side by side on one GPU (ga, cmaes, random × the run seeds given), each followed by the
# held-out per-item scores of its best and its seeds (bench/search_proof.py); the base models once.
#   bench/search_proof.sh RUN_FILE OUT_DIR [GENERATIONS=16] [RUN_SEEDS="42 7"] [STRATEGIES="ga cmaes random"]
# Four runs at a time fit one H200 at batch 128 (each process holds ~20 GB, mostly logits); six did not.
# The base models are scored once per OUT_DIR (kept in base.json).
# 16 generations = round 0's 8 seeds + 15 rounds of 8 new candidates = 128 evaluations a run. Each run keeps
# only its latest best-model folder (a 135 M float32 model is 0.54 GB; six runs × 16 new bests would not fit
# the machine's disk). Progress: OUT_DIR/*.log.
set -u
run_file=${1:?run file}; out=${2:?output folder}; gens=${3:-16}; run_seeds=${4:-42 7}
strats=${5:-ga cmaes random}
mkdir -p "$out"
export OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
[ -s "$out/base.json" ] ||
  python3 bench/search_proof.py heldout "$run_file" --base-models --out "$out/base.json" >"$out/base.log" 2>&1 &
for strategy in $strats; do
  for seed in $run_seeds; do
    name=$strategy-$seed
    (
      python3 -m evoforge run "$run_file" --strategy "$strategy" --seed "$seed" --gens "$gens" \
        --wandb disabled --output-dir "$out/$name" >"$out/$name.log" 2>&1
      python3 bench/search_proof.py heldout "$run_file" "$out/$name" --out "$out/$name.heldout.json" \
        >"$out/$name.heldout.log" 2>&1
    ) &
  done
done
while [ "$(jobs -rp | wc -l)" -gt 0 ]; do
  for run in "$out"/*/; do  # all but the newest best-model folder of each run
    ls -d "$run"gen_*_best_model 2>/dev/null | sort -V | head -n -1 | xargs -r rm -rf
  done
  sleep 20
done
echo "all done" >"$out/DONE"
