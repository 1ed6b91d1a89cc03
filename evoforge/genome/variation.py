"""Variation operators: mutation of one genome and the genome-space merge of three, gene by gene.

Both are pure functions of their inputs and a `random.Random`: the run's single RNG makes the whole
evolution reproducible, and its state is what a checkpoint saves, so the genes draw from it in a fixed order
(interp, crossover, structure). Children are always valid in their space.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from evoforge.genome import crossover, interp, structure
from evoforge.genome.base import GenomeSpace
from evoforge.genome.genes import Genome


def _mutate_once(
    genome: Genome, space: GenomeSpace, rng: random.Random, rate: float, keep_layers: bool
) -> Genome:
    return Genome(
        interp=interp.mutate(genome.interp, rng, rate),
        crossover=crossover.mutate(genome.crossover, rng, rate),
        structure=genome.structure if keep_layers else structure.mutate(genome.structure, space, rng, rate),
    )


def mutate(
    genome: Genome, space: GenomeSpace, rng: random.Random, rate: float, *, keep_layers: bool = False
) -> Genome:
    """A mutant that differs from its parent; `rate` (the run's mutation_rate) sets how far: the σ of the
    Gaussian noise on every continuous parameter is `rate`, each gene's method flips with probability
    rate/4 (`methods.FLIP_SHARE`), and each layer-path step is edited with probability `rate`
    (`structure.edit_count`: rate × depth edits on average, possibly none). `keep_layers` leaves the whole
    structure gene as it is: a layer-plan edit costs a small model ~12 % of its fitness whatever the rate
    (recipes/demo/SEARCH.md), so the GA makes most of its mutants this way."""
    for _ in range(32):
        child = _mutate_once(genome, space, rng, rate, keep_layers)
        if child.hash != genome.hash:
            return child
    return child


def recombine(
    parents: Sequence[Genome], weights: Sequence[float], space: GenomeSpace, rng: random.Random
) -> Genome:
    """Merge genomes in genome space: continuous genes → weighted mean (weights ∝ the given parent weights,
    e.g. fitness), methods → majority vote, layer path → the fittest parent's, one-point-crossed with the
    second fittest's. Every recipe stays self-contained over the base models."""
    total = sum(max(w, 0.0) for w in weights)
    w = [max(x, 0.0) / total for x in weights] if total > 0 else [1.0 / len(parents)] * len(parents)
    order = sorted(range(len(parents)), key=lambda k: -w[k])
    return Genome(
        interp=interp.blend([p.interp for p in parents], w, order),
        crossover=crossover.blend([p.crossover for p in parents], w, order),
        structure=structure.blend([p.structure for p in parents], order, space, rng),
    )
