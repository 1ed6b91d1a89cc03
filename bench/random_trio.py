"""A run file over bench/merge_bench.py's random family, for what takes a run file (`evoforge run`,
bench/ray_share.sh) on a GPU machine where the real 1.5 B trio is not built: no GGUF to stage.

    python bench/random_trio.py --scale qwen2-1.5b --work /tmp/bench --out /tmp/bench/random.yaml

The family (an ancestor and three children with noise on every tensor; Qwen2-1.5B-shaped bf16 models built on
the GPU in seconds, or a tiny one on the CPU) is built into WORK/models unless it is there already, as
merge_bench builds it. The run file is recipes/qwen2-1.5b.yaml with the family's folders for its models and
`evaluation.limit` items per task. Random weights do not stop generating: with `fitness_metric: accuracy` every
candidate decodes the whole budget, so figures from it are upper bounds of a real model's; the likelihood
fitness (the run file's) decodes nothing but the held-out passes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from merge_bench_family import NAMES, TINY, build_family

from evoforge.quiet import quiet_libraries

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "recipes" / "qwen2-1.5b.yaml"


def run_file(family: dict[str, Path], limit: int, device: str, dtype: str) -> dict:
    """recipes/qwen2-1.5b.yaml with the family's models (alpha, beta, gamma keep the template's domains)."""
    config = yaml.safe_load(TEMPLATE.read_text())
    config["name"] = "random-trio"
    config["base_models"] = [
        {
            "name": name,
            "path": str(family[name]),
            "domain_specialty": template["domain_specialty"],
            "ancestry": "random: the ancestor plus Gaussian noise on every tensor (bench/merge_bench_family.py)",
        }
        for name, template in zip(NAMES, config["base_models"], strict=True)
    ]
    config["ancestor"] = {"name": "ancestor", "path": str(family["ancestor"])}
    config["evaluation"]["limit"] = limit
    config["device"] = device
    config["dtype"] = dtype
    return config


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=(*TINY, "qwen2-1.5b"), default="qwen2-1.5b")
    parser.add_argument("--work", type=Path, required=True, help="the family goes to WORK/models")
    parser.add_argument("--out", type=Path, required=True, help="the run file to write")
    parser.add_argument("--limit", type=int, default=23, help="items per task (23 × 9 tasks = 207)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder (default: byte level)")
    args = parser.parse_args()
    dtype = "float32" if args.scale in TINY else "bfloat16"
    with quiet_libraries():
        family = build_family(args.work / "models", args.scale, torch.device(args.device), args.tokenizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(yaml.safe_dump(run_file(family, args.limit, args.device, dtype), sort_keys=False))
    print(args.out)


if __name__ == "__main__":
    main()
