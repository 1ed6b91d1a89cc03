"""The search-strategy seam: what a strategy is asked for, what it is told, and the registry by name.

A strategy proposes genomes and learns their fitness in rounds, in the ask/tell style of pycma: the runner
(`evolve.loop.Evolution`) asks, renders and evaluates the proposals (a genome seen before costs nothing: its
fitness comes from the cache), tells the strategy each proposal's fitness (None for a failed candidate),
and checkpoints the strategy's `state_dict()` with the run's RNG, so a resumed run asks for exactly what the
uninterrupted run would have. A new strategy is one file in this folder: a class with the methods of
`SearchStrategy`, decorated with `@register`, imported in `strategies/__init__.py`.

A strategy whose next round does not depend on the current round's results (random search after round 0,
ga-async and cmaes-async after round 1) says so with `asks_ahead`: the runner then asks for the next round
while the current one is still being scored, so workers that are done take its candidates instead of
waiting for the round's slowest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from evoforge.evolve.records import Operator
from evoforge.genome import Genome, GenomeSpace, seed_genomes

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig


class Proposal(BaseModel):
    """A genome to evaluate, how it was made, and the genome hashes it was made from."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    genome: Genome
    operator: Operator
    parents: list[str] = []


Result = tuple[Proposal, float | None]
"""A proposal and its fitness; None when its merge or evaluation failed."""


class SearchStrategy(Protocol):
    """Built as `Strategy(cfg, space, rng)`; `rng` is the run's RNG (checkpointed by the runner), the only
    source of Python-level randomness a strategy may use. Optionally also `asks_ahead() -> bool`: True when
    the next `ask` may come before the current round's `tell` (it would not change what `ask` returns);
    a strategy without it is never asked ahead."""

    name: ClassVar[str]

    def ask(self) -> list[Proposal]:
        """The next round's proposals (the first round: the seeds)."""
        ...

    def tell(self, results: Sequence[Result]) -> None:
        """The fitness of the last round's proposals, in the order they were asked."""
        ...

    def state_dict(self) -> dict:
        """Everything besides the run RNG that the next `ask` depends on, as JSON-able data."""
        ...

    def load_state_dict(self, state: dict) -> None: ...


STRATEGIES: dict[str, type[SearchStrategy]] = {}


def register(cls: type[SearchStrategy]) -> type[SearchStrategy]:
    """Add a strategy under its `name`; a second strategy of the same name is a programming error."""
    if cls.name in STRATEGIES:
        raise ValueError(f"search strategy {cls.name!r} is registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def asks_ahead(strategy: SearchStrategy) -> bool:
    """Whether the runner may ask for the next round before telling this one (see the module's docstring)."""
    method = getattr(strategy, "asks_ahead", None)
    return bool(method and method())


def make(cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> SearchStrategy:
    return STRATEGIES[cfg.search.strategy](cfg, space, rng)


def seed_proposals(cfg: EvolutionConfig, space: GenomeSpace) -> list[Proposal]:
    """Round 0 of every strategy: one seed per method triple."""
    seeds = seed_genomes(space, cfg.merge_operators, [m.weight for m in cfg.base_models], cfg.seed)
    return [Proposal(genome=g, operator="seed") for g in seeds.values()]


def ranked(results: Sequence[Result]) -> list[tuple[Proposal, float]]:
    """Distinct genomes as plain proposals (the runner tells its members), fittest first (a failure counts 0;
    on ties the earlier proposal first)."""
    seen: set[str] = set()
    out = []
    for proposal, fitness in results:
        if proposal.genome.hash not in seen:
            seen.add(proposal.genome.hash)
            plain = Proposal(genome=proposal.genome, operator=proposal.operator, parents=proposal.parents)
            out.append((plain, fitness if fitness is not None else 0.0))
    return sorted(out, key=lambda pf: -pf[1])
