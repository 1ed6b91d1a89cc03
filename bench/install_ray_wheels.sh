#!/usr/bin/env bash
# The GPU machine's half of bench/ray_share.sh's ray wheels (its header says how they are staged): check the
# pieces' sha256, unpack them and install the wheels into SITE, then print ray's version. The first job of
# both device queues (bench/queues/*.txt) that use Ray.
#   bench/install_ray_wheels.sh [PARTS=/tmp/keep/.raywhl-parts] [SITE=/tmp/keep/site]
set -euo pipefail
parts=${1:-/tmp/keep/.raywhl-parts}; site=${2:-/tmp/keep/site}
cd "$parts"
sha256sum -c --quiet SHA256SUMS
cat wheels.tar.* | tar -xf -
python3 -m pip install -q --no-index --no-deps --target "$site" ./*.whl
python3 -c 'import ray; print(ray.__version__)'
