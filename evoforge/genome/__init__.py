"""Genome: three genes (interp, crossover, structure), the 8 seeds, mutation and genome-space merging."""

from evoforge.genome.genes import CrossoverGene, Genome, GenomeSpace, InterpGene, Step, StructureGene
from evoforge.genome.seeds import SEED_LABELS, seed_genomes
from evoforge.genome.variation import mutate, recombine

__all__ = [
    "SEED_LABELS",
    "CrossoverGene",
    "Genome",
    "GenomeSpace",
    "InterpGene",
    "Step",
    "StructureGene",
    "mutate",
    "recombine",
    "seed_genomes",
]
