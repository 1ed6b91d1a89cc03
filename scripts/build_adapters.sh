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
# interrupted run picks up where it stopped; PYTHON is the interpreter (default python3).
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
    # r=4 on every linear layer of 28 blocks: 4.6 M parameters, 9.2 MB in bf16
    common=(--r 4 --alpha 8 --lr 2e-4 --batch-size 32 --replay-weight 0.5 --replay-batch-size 8 --seed 0)
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
for entry in "${plan[@]}"; do
  read -r name steps tasks <<< "$entry"
  [[ $names == "  " || $names == *" $name "* ]] || continue
  if [[ ${SKIP_TRAINED:-} == 1 && -s $out/$name/training.json ]]; then echo "$name: already trained in $out/$name"; continue; fi
  src=(); for t in $tasks; do src+=(--jsonl "$data/$t.jsonl"); done
  "$py" "$here/train_adapters.py" "$ancestor" "$name" "${src[@]}" --steps "$steps" --out "$out/$name" \
    "${common[@]}" "${extra[@]}"
done
