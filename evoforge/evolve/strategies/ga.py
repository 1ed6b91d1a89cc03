"""The seed document's genetic algorithm (the default strategy), with elitism.

Round 0 evaluates the 8 seeds. Every later round holds the previous round's 2 best genomes unchanged
(operator `elite`: their fitness is cached, so they cost no evaluation), 3 mutants of each, and one child per
triple of the next 6 by rank, shuffled (genome-space recombination): 8 new evaluations a round with the
default `population_size` 8 (in general `population_size` new genomes: ⌊(size − 2)/3⌋ children, the rest
mutants). `mutation_rate` sets the mutants' distance from their parent (`genome.mutate`). Each elite's mutants
come in threes: two keep its layer plan (continuous genes and method flips only), the third may also edit the
plan (rate × depth edits on average). On the demo a plan edit cost 12-15 % of the parent's fitness while the
others kept 99 % (recipes/demo/SEARCH.md), so the structure is explored by one mutant in three, not by all.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import cycle, islice
from typing import TYPE_CHECKING, ClassVar

from evoforge.evolve.strategies.base import Proposal, Result, ranked, register, seed_proposals
from evoforge.genome import GenomeSpace, mutate, recombine

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig

ELITE = 2
"""Genomes carried unchanged into the next round; each also parents 3 mutants."""
LAYER_MUTANT_EVERY = 3
"""Of an elite's mutants, every third may edit the layer plan; the others keep it."""


def parent_weights(fitness: Sequence[float], pressure: float) -> list[float]:
    """How much each parent's continuous genes count in a child: `selection_pressure` 0 = plain mean of the
    parents, 1 = fitness-proportional mean, in between a mix of the two."""
    total = sum(max(f, 0.0) for f in fitness)
    share = [max(f, 0.0) / total if total > 0 else 1.0 / len(fitness) for f in fitness]
    return [(1.0 - pressure) / len(fitness) + pressure * s for s in share]


def next_round(
    ranks: Sequence[tuple[Proposal, float]],
    cfg: EvolutionConfig,
    space: GenomeSpace,
    rng: random.Random,
    known: set[str],
) -> list[Proposal]:
    """The elites, their mutants, then the children of the next 3·children by rank (best first in `ranks`).
    Mutants avoid genomes seen before (`known` hashes, updated)."""
    size = cfg.population_size
    n_children = (size - ELITE) // 3
    n_mutants = size - n_children
    elites = [p for p, _ in ranks[:ELITE]]
    out = [Proposal(genome=p.genome, operator="elite", parents=[p.genome.hash]) for p in elites]
    for k in range(n_mutants):
        parent = elites[k % len(elites)] if k < ELITE * (n_mutants // ELITE) else elites[0]
        keep_layers = (k // ELITE) % LAYER_MUTANT_EVERY != LAYER_MUTANT_EVERY - 1
        for _ in range(8):
            child = mutate(parent.genome, space, rng, cfg.mutation_rate, keep_layers=keep_layers)
            if child.hash not in known:
                break
        known.add(child.hash)
        out.append(Proposal(genome=child, operator="mutation", parents=[parent.genome.hash]))
    # Too few distinct genomes (few seeds, a large population_size): the best fill in, as often as needed.
    pool = list(islice(cycle([*ranks[ELITE:], *ranks]), 3 * n_children))
    rng.shuffle(pool)
    for t in range(n_children):
        triple = pool[3 * t : 3 * t + 3]
        weights = parent_weights([f for _, f in triple], cfg.selection_pressure)
        child = recombine([p.genome for p, _ in triple], weights, space, rng)
        known.add(child.hash)
        out.append(
            Proposal(genome=child, operator="recombination", parents=[p.genome.hash for p, _ in triple])
        )
    return out


@register
class GeneticAlgorithm:
    name: ClassVar[str] = "ga"

    def __init__(self, cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> None:
        self.cfg, self.space, self.rng = cfg, space, rng
        self.ranks: list[tuple[Proposal, float]] | None = None
        self.seen: list[str] = []

    def ask(self) -> list[Proposal]:
        if self.ranks is None:
            out = seed_proposals(self.cfg, self.space)
        else:
            known = set(self.seen)
            out = next_round(self.ranks, self.cfg, self.space, self.rng, known)
        self.seen += [p.genome.hash for p in out if p.genome.hash not in self.seen]
        return out

    def tell(self, results: Sequence[Result]) -> None:
        self.ranks = ranked(results)

    def state_dict(self) -> dict:
        ranks = None if self.ranks is None else [[p.model_dump(mode="json"), f] for p, f in self.ranks]
        return {"ranks": ranks, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        raw = state["ranks"]
        self.ranks = None if raw is None else [(Proposal.model_validate(p), f) for p, f in raw]
        self.seen = list(state["seen"])
