"""How much of its parent's fitness does a GA mutant keep, per mutation rate? (issue "Search that beats its
seeds": the median mutant should keep ≥ 95 %.)

    python bench/mutant_strength.py recipes/demo.yaml --rates 0.03 0.15 --mutants 12 --limit 20 --device cpu
    python bench/mutant_strength.py recipes/demo.yaml --rates 0.15 --mutants 12 --limit 10 --device cpu --ga

Mutants (`genome.mutate`) of the run file's round-0 seed `--parent` (default: the demo's best seed by held-out
accuracy, slerp-ties-frankenmerge) are scored on the fitness split by the run file's fitness metric, first
`--limit` items per task; the parent is scored the same way once. Reported per rate: the median and quartiles of
mutant / parent fitness, for mutants whose layer plan changed and for those whose did not. Every draw comes
from one `random.Random(--seed)` per rate, so a rerun scores the same mutants. `--ga` makes them as the GA
does: two of every three keep the parent's layer plan (`keep_layers`), the third may edit it.

`--dfs-edit OP ...` (a `dfs` parent) asks which data-flow edit costs what: per OP (`structure.DFS_EDITS`),
`--mutants` copies of the parent with exactly that one edit of the path and nothing else changed.

    python bench/mutant_strength.py recipes/demo.yaml --parent slerp-ties-dfs --dfs-edit scale source repeat \
        drop shift --mutants 6 --limit 10 --device cpu
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fitness_metrics import Candidate, load, log

from evoforge.config import load_config
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.genome import Genome, GenomeSpace, StructureGene, mutate, seed_genomes
from evoforge.genome.structure import DFS_EDITS, edit_dfs
from evoforge.quiet import quiet_libraries
from evoforge.recipe import render


def _candidate(genome: Genome, space: GenomeSpace) -> Candidate:
    recipe = render(genome, space, title="bench/mutant_strength.py")
    return Candidate(label=genome.label, kind="mutant", recipe=recipe, seed=genome.crossover.seed)


def _quartiles(values: list[float]) -> str:
    if len(values) < 2:
        return f"n={len(values)}" + (f", {values[0]:.3f}" if values else "")
    q1, q2, q3 = statistics.quantiles(values, n=4)
    return f"n={len(values)}, median {q2:.3f} [{q1:.3f}, {q3:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_file", type=Path)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.03, 0.15])
    parser.add_argument("--mutants", type=int, default=12, help="mutants per rate")
    parser.add_argument("--parent", default="slerp-ties-frankenmerge", help="a seed label")
    parser.add_argument("--limit", type=int, help="first N items per task (default: all)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ga", action="store_true", help="every third mutant may edit the layer plan")
    parser.add_argument("--dfs-edit", nargs="+", choices=DFS_EDITS, help="one edit of each kind per mutant")
    args = parser.parse_args()
    cfg = load_config(args.run_file, **({"device": args.device} if args.device else {}))
    space = GenomeSpace.from_config(cfg)
    seeds = seed_genomes(space, cfg.merge_operators, [m.weight for m in cfg.base_models], cfg.seed)
    parent = seeds[args.parent]
    with quiet_libraries(), tempfile.TemporaryDirectory() as scratch:
        evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), Path(scratch) / "work")

        def fitness(genome: Genome) -> float:
            load(evaluator, _candidate(genome, space), Path(scratch))
            return evaluator.scorer.score(limit=args.limit).fitness

        base = fitness(parent)
        log(f"parent {parent.label}: {base:.4f}")
        if args.dfs_edit:
            one_edit(parent, space, args, fitness, base)
            return
        print("| rate | layer plan changed | layer plan kept | all |\n|---|---|---|---|")
        for rate in args.rates:
            rng = random.Random(args.seed)
            changed, kept = [], []
            for i in range(args.mutants):
                child = mutate(parent, space, rng, rate, keep_layers=args.ga and i % 3 != 2)
                ratio = fitness(child) / base
                (changed if child.structure != parent.structure else kept).append(ratio)
                log(f"rate {rate} mutant {i + 1}/{args.mutants}: {ratio:.3f}")
            print(f"| {rate} | {_quartiles(changed)} | {_quartiles(kept)} | {_quartiles(changed + kept)} |")


def one_edit(parent: Genome, space: GenomeSpace, args: argparse.Namespace, fitness, base: float) -> None:
    """Per edit kind: `--mutants` copies of a dfs parent with that one path edit (at the first rate)."""
    if parent.structure.method != "dfs":
        sys.exit(f"--dfs-edit needs a dfs parent, {parent.label} is {parent.structure.method}")
    print("| edit | mutant / parent |\n|---|---|")
    for op in args.dfs_edit:
        rng, ratios = random.Random(args.seed), []
        for i in range(args.mutants):
            path = edit_dfs(list(parent.structure.path), space, rng, args.rates[0], op)
            child = parent.model_copy(update={"structure": StructureGene(method="dfs", path=tuple(path))})
            ratios.append(fitness(child) / base)
            log(f"{op} mutant {i + 1}/{args.mutants}: {ratios[-1]:.3f}")
        print(f"| {op} | {_quartiles(ratios)}: {', '.join(f'{r:.3f}' for r in ratios)} |", flush=True)


if __name__ == "__main__":
    main()
