"""Support for the memory-merge tests (and test_batched_merge.py): the candidate genomes they merge on
the memory path and on the disk path — seeds, mutants and a DARE genome with a deep DFS path."""

from __future__ import annotations

import random

from evoforge.config import MergeOperators
from evoforge.genome import Genome, GenomeSpace, Step, StructureGene, mutate, seed_genomes


def deep_dfs(seed: Genome) -> Genome:
    """A DARE genome whose DFS path is 9 layers deep (6 in the base models), repeats layers, mixes all
    sources and scales o_proj/down_proj."""
    path = (
        Step(source="crossover", layer=0),
        Step(source="interp", layer=1, scale=1.3),
        Step(source="alpha", layer=1, scale=0.7),
        Step(source="crossover", layer=2),
        Step(source="crossover", layer=2, scale=0.8),
        Step(source="beta", layer=3),
        Step(source="crossover", layer=4, scale=1.1),
        Step(source="gamma", layer=5),
        Step(source="crossover", layer=5, scale=0.9),
    )
    crossover = seed.crossover.model_copy(update={"method": "dare"})
    return Genome(interp=seed.interp, crossover=crossover, structure=StructureGene(method="dfs", path=path))


def candidates(space: GenomeSpace, with_seeds: bool, mutants: int) -> dict[str, Genome]:
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    rng = random.Random(11)
    out = dict(seeds) if with_seeds else {}
    for i in range(mutants):
        out[f"mutant{i}"] = mutate(rng.choice(list(seeds.values())), space, rng, 0.4)
    out["deep-dfs"] = deep_dfs(seeds["slerp-dare-dfs"])
    return out
