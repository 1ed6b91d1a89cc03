"""Genome: three genes (interp, crossover, structure), each with its registry of methods, the seeds, mutation
and genome-space merging."""

from evoforge.genome.base import GenomeSpace
from evoforge.genome.crossover import CrossoverGene
from evoforge.genome.genes import Genome
from evoforge.genome.interp import InterpGene
from evoforge.genome.seeds import SEED_LABELS, seed_genomes
from evoforge.genome.structure import Step, StructureGene
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
