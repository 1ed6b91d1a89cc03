#!/usr/bin/env bash
# Issue "Scale-out on Ray", item 6: does a second evaluator actor on the same GPU pay (one actor merging while
# the other decodes)? Runs RUN_FILE for GENS generations with the Ray executor, 1 actor holding the whole card,
# then 2 actors holding half each (gpus_per_actor 0.5), same run seed; prints each generation's wall time.
#   bench/ray_share.sh RUN_FILE OUT_DIR [GENS=2]      e.g. recipes/qwen2-1.5b.yaml on one H200
# Without the real trio built there: RUN_FILE from bench/random_trio.py (random Qwen2-1.5B-shaped models).
# Generation 0 includes the actors' start (base models loaded once per actor); later generations are the
# steady state. The two runs must take the same path (same candidates, parents, recipes, best): checked at the
# end, with whether the scores agree bit for bit.
# On a GPU machine without network (the device; its image lacks ray and some of what ray needs), the ray
# wheel and its needs (~78 MB, cp312) travel in pieces, as the trio does (recipes/qwen2-1.5b/README.md):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .raywhl ray==2.60.0 msgpack protobuf \
#     jsonschema jsonschema-specifications referencing rpds-py attrs requests certifi charset-normalizer \
#     urllib3 filelock                                         # here; then scripts/stage_trio_parts.sh .raywhl
# prints one device call per piece (5 beside the 46 MiB tree of 2026-12-06; .raywhl/ is git-ignored), and on
# the device, once (a job of both bench/queues/*.txt): bench/install_ray_wheels.sh
set -euo pipefail
run_file=${1:?run file}; out=${2:?output folder}; gens=${3:-2}
py=${PYTHON:-python3}
mkdir -p "$out"
for actors in 1 2; do
  cfg=$out/actors-$actors.yaml
  grep -v -E '^(executor|ray):' "$run_file" > "$cfg"
  printf 'executor: ray\nray: {actors: %d, gpus_per_actor: %s}\n' "$actors" "$([ "$actors" = 1 ] && echo 1.0 || echo 0.5)" >> "$cfg"
  [ "$(grep -c '^device: cpu' "$cfg")" = 0 ] || sed -i 's/gpus_per_actor: [0-9.]*/cpus_per_actor: 1/' "$cfg"
  rm -rf "$out/actors-$actors"
  start=$(date +%s)
  "$py" -m evoforge run "$cfg" --gens "$gens" --wandb disabled --output-dir "$out/actors-$actors" \
    > "$out/actors-$actors.log" 2>&1
  echo "actors $actors: $(( $(date +%s) - start )) s in all" | tee -a "$out/summary.txt"
done
"$py" "$(dirname "$0")/compare_runs.py" "$out/actors-1" "$out/actors-2" | tee -a "$out/summary.txt"
