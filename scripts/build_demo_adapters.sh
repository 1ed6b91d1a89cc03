#!/usr/bin/env bash
# Train the demo's three LoRA specialists of SmolLM2-135M-Instruct (any CUDA machine; ~1-2 min each).
#   scripts/build_demo_adapters.sh ANCESTOR_DIR OUT_DIR [JSONL_DIR] [NAME ...]   (default: all three)
# Training items come from scripts/build_tasks.py (disjoint from every task's validation and test split),
# written to JSONL_DIR/<task>.jsonl first unless JSONL_DIR already holds them (a machine without the data
# sources gets the files made elsewhere). Small rank, a low learning rate and replay of general text (KL to
# the ancestor) keep the deltas small outside each skill, so that the specialists stay mergeable.
set -euo pipefail
ancestor=$1; out=$2; data=${3:-$(mktemp -d)}; shift $(( $# < 3 ? $# : 3 ))
names=" ${*:-math multilingual code} "
here=$(cd "$(dirname "$0")" && pwd)
# items per task: the number and code pools are finite (a few hundred prompts outside the splits)
for spec in math_arith:3000 math_gsm:3000 multilingual_numbers:450 multilingual_terms:1200 code_simple:250; do
  task=${spec%%:*}
  [ -s "$data/$task.jsonl" ] || python "$here/build_tasks.py" --train "$task" -n "${spec##*:}" --seed 7 > "$data/$task.jsonl"
done
common=(--r 8 --alpha 16 --lr 3e-4 --batch-size 32 --replay-weight 0.5 --replay-batch-size 8 --seed 0)
train() { local name=$1 steps=$2; shift 2
  [[ $names == *" $name "* ]] || return 0
  local src=(); for t in "$@"; do src+=(--jsonl "$data/$t.jsonl"); done
  python "$here/train_adapters.py" "$ancestor" "$name" "${src[@]}" --steps "$steps" --out "$out/$name" "${common[@]}"
}
train math 300 math_arith math_gsm
train multilingual 300 multilingual_numbers multilingual_terms
train code 120 code_simple
