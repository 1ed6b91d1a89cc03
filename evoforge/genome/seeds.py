"""The seeds: one genome per method triple (2³ = 8 with the registered methods), from the run's operators.

Each gene builds its own seed (`interp.seed`, `crossover.seed`, `structure.seed`); how each operator key maps
onto gene values and mergekit parameters is documented on `evoforge.config.MergeOperators`.
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence

from evoforge.config import MergeOperators
from evoforge.genome import crossover, interp, structure
from evoforge.genome.base import GenomeSpace
from evoforge.genome.genes import Genome


def _triples() -> list[tuple[str, str, str]]:
    """Every registered method triple, in registration order."""
    return list(
        itertools.product(interp.METHODS.names(), crossover.METHODS.names(), structure.METHODS.names())
    )


SEED_LABELS = tuple("-".join(t) for t in _triples())
"""The seed labels of the methods registered with evoforge itself (`linear-ties-frankenmerge` first)."""


def seed_genomes(
    space: GenomeSpace, ops: MergeOperators, model_weights: Sequence[float], run_seed: int
) -> dict[str, Genome]:
    """label → genome for every method triple, in registration order."""
    seeds = {}
    for interp_m, cross_m, struct_m in _triples():
        label = f"{interp_m}-{cross_m}-{struct_m}"
        seeds[label] = Genome(
            interp=interp.seed(interp_m, space, ops, model_weights),
            crossover=crossover.seed(
                cross_m, space, ops, model_weights, zlib.crc32(f"{run_seed}:{label}".encode()) % 2**31
            ),
            structure=structure.seed(struct_m, space, ops),
        )
    return seeds
