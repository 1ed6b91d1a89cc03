#!/usr/bin/env bash
# Train a demo trio's LoRA specialists on its ancestor (any CUDA machine; bf16 base, fp32 adapter).
#   scripts/build_adapters.sh TRIO ANCESTOR_DIR [OUT_DIR] [NAME ...]     (default: every specialist of TRIO)
#     smollm2      SmolLM2-135M-Instruct: math, multilingual, code     (~1-2 min each on an H100)
#     qwen2-1.5b   Qwen2.5-Coder-1.5B-Instruct: math, multilingual, structured   (recipes/qwen2-1.5b/README.md)
# ANCESTOR_DIR is what `evoforge demo prepare --trio TRIO` printed; OUT_DIR defaults to recipes/<recipes>/adapters.
# Training items are the committed recipes/training/<task>.jsonl, one file per task for both trios
# (scripts/build_tasks.py --train, disjoint from every task's validation and test split), made here first
# where missing (that needs the data sources: a machine without them gets the committed files). Small rank, a low learning rate and replay of
# general text (KL to the ancestor) keep the deltas small outside each skill, so that the specialists stay
# mergeable. TRAIN_ARGS (extra train_adapters.py options, e.g. "--steps 2 --device cpu") override the defaults;
# SKIP_TRAINED=1 keeps each adapter that OUT_DIR already holds whole (its training.json, written last), so an
# interrupted run picks up where it stopped; JOBS=N trains up to N adapters at once on the one card (each to
# OUT_DIR/train-NAME.log; a 1.5 B adapter peaks at ~12 GiB); RETRY_ARGS (e.g. "--dtype float32") trains a
# failed adapter once more with them (a run that went non-finite); PYTHON is the interpreter (default python3).
set -euo pipefail
py=${PYTHON:-python3}
trio=$1; ancestor=$2; here=$(cd "$(dirname "$0")" && pwd); root=$(dirname "$here")
case $trio in
  smollm2)
    recipes=demo
    items=(math_arith:3000 math_gsm:3000 multilingual_numbers:450 multilingual_terms:1200 code_simple:250)
    common=(--r 8 --alpha 16 --lr 3e-4 --batch-size 32 --replay-weight 0.5 --replay-batch-size 8 --seed 0)
    plan=("math 300 math_arith math_gsm" "multilingual 300 multilingual_numbers multilingual_terms"
          "code 120 code_simple") ;;
  qwen2-1.5b)
    recipes=qwen2-1.5b
    items=(math_arith:3000 math_gsm:3000 multilingual_numbers:450 multilingual_terms:1200
           structured_lookup:1500 structured_json:1500)
    # r=4 on every linear layer of 28 blocks: 4.6 M parameters, 9.2 MB in bf16. Eager attention: with SDPA the
    # structured adapter's gradients went NaN at step 10 on an H100 (math, committed, was trained with SDPA)
    common=(--r 4 --alpha 8 --lr 2e-4 --batch-size 32 --replay-weight 0.5 --replay-batch-size 8 --seed 0
            --attention eager)
    plan=("math 300 math_arith math_gsm" "multilingual 300 multilingual_numbers multilingual_terms"
          "structured 200 structured_lookup structured_json") ;;
  *) echo "error: unknown trio '$trio' (smollm2 or qwen2-1.5b)" >&2; exit 2 ;;
esac
shift 2
out=${1:-$root/recipes/$recipes/adapters}; shift $(( $# > 0 ? 1 : 0 ))
names=" ${*:-} "
data=$root/recipes/training
mkdir -p "$data"
for spec in "${items[@]}"; do   # items per task: the number and code pools are finite outside the splits
  task=${spec%%:*}
  [ -s "$data/$task.jsonl" ] || "$py" "$here/build_tasks.py" --train "$task" -n "${spec##*:}" --seed 7 > "$data/$task.jsonl"
done
read -r -a extra <<< "${TRAIN_ARGS:-}"
read -r -a retry <<< "${RETRY_ARGS:-}"
train_one() {  # train_one ARGS...: train, and where it fails and RETRY_ARGS is set, once more with them
  "$@" && return
  local rc=$?
  (( ${#retry[@]} )) || return "$rc"
  echo "failed (exit $rc); once more with ${retry[*]}"
  "$@" "${retry[@]}"
}
jobs_max=${JOBS:-1}
[[ $jobs_max =~ ^[1-9][0-9]*$ ]] || { echo "error: JOBS=$jobs_max is not a positive number" >&2; exit 2; }
pids=(); running=()
for entry in "${plan[@]}"; do
  read -r name steps tasks <<< "$entry"
  [[ $names == "  " || $names == *" $name "* ]] || continue
  if [[ ${SKIP_TRAINED:-} == 1 && -s $out/$name/training.json ]]; then echo "$name: already trained in $out/$name"; continue; fi
  src=(); for t in $tasks; do src+=(--jsonl "$data/$t.jsonl"); done
  train=("$py" "$here/train_adapters.py" "$ancestor" "$name" "${src[@]}" --steps "$steps" --out "$out/$name"
         "${common[@]}" "${extra[@]}")
  if (( jobs_max == 1 )); then train_one "${train[@]}"; continue; fi
  # JOBS > 1: up to that many trainings share the card (a 1.5 B adapter peaks at ~12 GiB), each into its log
  while (( $(jobs -rp | wc -l) >= jobs_max )); do sleep 1; done
  mkdir -p "$out"
  train_one "${train[@]}" > "$out/train-$name.log" 2>&1 &
  pids+=($!); running+=("$name")
  echo "$name: training in the background (log $out/train-$name.log)"
done
failed=()
for i in "${!pids[@]}"; do
  wait "${pids[i]}" || failed+=("${running[i]}")
  echo "--- ${running[i]} ($out/train-${running[i]}.log)"; tail -n 3 "$out/train-${running[i]}.log"
done
(( ${#failed[@]} == 0 )) || { echo "error: training failed: ${failed[*]} (logs above)" >&2; exit 1; }
