"""A candidate merge as three genes, one per stage of its mergekit recipe.

interp (`genome/interp.py`) → crossover (`genome/crossover.py`) → structure (`genome/structure.py`); each
gene's file holds its registry of methods (`genome/methods.py`).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from evoforge.genome.base import Gene
from evoforge.genome.crossover import CrossoverGene
from evoforge.genome.interp import InterpGene
from evoforge.genome.structure import StructureGene

if TYPE_CHECKING:
    from evoforge.genome.base import GenomeSpace


class Genome(Gene):
    interp: InterpGene
    crossover: CrossoverGene
    structure: StructureGene

    @property
    def label(self) -> str:
        """The seed-style name of its method triple, e.g. `linear-ties-frankenmerge`."""
        return f"{self.interp.method}-{self.crossover.method}-{self.structure.method}"

    @property
    def hash(self) -> str:
        """Stable content hash: equal genomes (and so equal recipes) share it across runs and machines."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def check(self, space: GenomeSpace) -> None:
        """Raise ValueError where a gene does not fit `space` (shapes, sources, layers, depth)."""
        for gene in (self.interp, self.crossover, self.structure):
            gene.check(space)
