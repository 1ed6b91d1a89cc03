"""Random search, the control: the seeds, then `population_size` uniform points a round of the space cmaes
searches (`continuous.Box` around the best seed), drawn from the run RNG. After round 0 no result changes
what it asks next, so the runner asks ahead (`asks_ahead`)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from evoforge.evolve.strategies.base import Proposal, Result, ranked, register, seed_proposals
from evoforge.evolve.strategies.continuous import Box
from evoforge.genome import Genome, GenomeSpace

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig


@register
class RandomSearch:
    name: ClassVar[str] = "random"

    def __init__(self, cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> None:
        self.cfg, self.space, self.rng = cfg, space, rng
        self.box: Box | None = None

    def ask(self) -> list[Proposal]:
        if self.box is None:
            return seed_proposals(self.cfg, self.space)
        parent = [self.box.incumbent.hash]
        return [
            Proposal(
                genome=self.box.decode([self.rng.random() for _ in range(self.box.dim)]),
                operator="random",
                parents=parent,
            )
            for _ in range(self.cfg.population_size)
        ]

    def asks_ahead(self) -> bool:
        """Once the box is fixed (told round 0), `tell` is a no-op: the next round is known already."""
        return self.box is not None

    def tell(self, results: Sequence[Result]) -> None:
        if self.box is None:
            self.box = Box(ranked(results)[0][0].genome)

    def state_dict(self) -> dict:
        return {"incumbent": self.box.incumbent.model_dump(mode="json") if self.box else None}

    def load_state_dict(self, state: dict) -> None:
        inc = state["incumbent"]
        self.box = Box(Genome.model_validate(inc)) if inc is not None else None
