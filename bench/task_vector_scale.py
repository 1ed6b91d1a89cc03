"""How far along one specialist's task vector the fitness keeps rising: ancestor + λ·(specialist − ancestor),
scored per domain for a few λ (0 = the ancestor, 1 = the specialist, > 1 = extrapolation).

Why: the crossover gene's `lambda` and per-model weights may go past 1 (`genome/crossover.py`: LAMBDA_RANGE,
WEIGHT_RANGE), as Sakana's evolved weights did (they summed to ~2); this measures what extrapolating a real
task vector does to its own domain and to the others.

    python bench/task_vector_scale.py ANCESTOR SPECIALIST --lambdas 0 0.5 1 1.5 2 3 --limit 20 --device cpu

The merged weights are ancestor + λ·τ in float32, tensor by tensor (mergekit's `task_arithmetic` of one model
with weight λ and no normalisation), written into one resident model; every λ is scored on the same items of
the fitness split by the run files' metric (likelihood, teacher-forced). Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from merge_bench_latency import load_folder

from evoforge.config import EvaluationConfig
from evoforge.evaluate.scorer import Scorer
from evoforge.quiet import quiet_libraries


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("ancestor", type=Path)
    parser.add_argument("specialist", type=Path)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--limit", type=int, default=20, help="items per task of the fitness split")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", help="the scored model's dtype")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    evaluation = EvaluationConfig(fitness_metric="likelihood", limit=args.limit, batch_size=args.batch_size)
    with quiet_libraries():
        scorer = Scorer.from_pretrained(args.ancestor, args.device, args.dtype, evaluation=evaluation)
        # as stored (bf16 stays bf16: both fit beside the scored model)
        base, tuned = (load_folder(f, torch.device("cpu")) for f in (args.ancestor, args.specialist))
        if base.keys() != tuned.keys() or any(base[k].shape != tuned[k].shape for k in base):
            raise SystemExit(f"error: {args.specialist}: not the ancestor's tensors (names or shapes differ)")
        rows = []
        for lam in args.lambdas:
            sink = scorer.open_weights()
            for name, weight in base.items():
                delta = tuned[name].float() - weight.float()
                sink.write(name, weight.float() + lam * delta)
            sink.close()
            result = scorer.score()
            rows.append((lam, result))
            print(f"λ {lam}: fitness {result.fitness:.4f} ({result.wall_s:.0f} s)", flush=True)
    domains = sorted(rows[0][1].domains)
    print(
        f"\n{args.specialist.name} over {args.ancestor.name}, {rows[0][1].n_items} items of the fitness split, "
        "likelihood\n"
    )
    print("| λ | " + " | ".join(domains) + " | fitness |\n|---" + "|---" * (len(domains) + 1) + "|")
    for lam, result in rows:
        cells = " | ".join(f"{result.domains[d]:.4f}" for d in domains)
        print(f"| {lam:g} | {cells} | {result.fitness:.4f} |")


if __name__ == "__main__":
    main()
