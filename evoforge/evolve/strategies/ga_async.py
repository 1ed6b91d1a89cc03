"""The GA asked one round ahead (`ga-async`): for several workers (Ray), none waiting for a round's slowest.

`ga` breeds round r from round r − 1's results, so round r cannot start before round r − 1 has finished:
with several workers, each round ends with all but one idle. `ga-async` breeds round r (r ≥ 2) from the
results of rounds 0 … r − 2, ranked together; the runner then asks for round r as soon as round r − 1 is
handed out (`asks_ahead`), and a worker done with r − 1 starts on r at once. Round 1 is bred from round 0,
the seeds, as `ga` breeds it. Otherwise the rules are `ga`'s (`ga.next_round`): the 2 best genomes (of all
rounds it may see) ride along cached, 3 mutants of each, children of the next 6 by rank.

What ask returns depends only on the rounds it may see, never on whether the latest round has been told: a
run gives the same records on one worker as on many, and resumes to the uninterrupted run. The price is
selection one round late; not measured yet against `ga` on a real search (recipes/demo/SEARCH.md).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from evoforge.evolve.strategies.base import Proposal, Result, ranked, register, seed_proposals
from evoforge.evolve.strategies.ga import next_round
from evoforge.genome import GenomeSpace

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig


@register
class AsynchronousGeneticAlgorithm:
    name: ClassVar[str] = "ga-async"

    def __init__(self, cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> None:
        self.cfg, self.space, self.rng = cfg, space, rng
        self.told: list[list[tuple[Proposal, float]]] = []
        """Each round's results as `ranked` gives them, in the order the rounds were told."""
        self.asked = 0
        self.seen: list[str] = []

    def ask(self) -> list[Proposal]:
        if self.asked == 0:
            out = seed_proposals(self.cfg, self.space)
        else:
            visible = max(1, self.asked - 1)  # round r sees rounds 0 … r − 2 (round 1: round 0)
            if len(self.told) < visible:
                raise RuntimeError(f"ga-async: round {self.asked} asked before round {visible - 1} was told")
            ranks = ranked([result for results in self.told[:visible] for result in results])
            out = next_round(ranks, self.cfg, self.space, self.rng, set(self.seen))
        self.asked += 1
        self.seen += [p.genome.hash for p in out if p.genome.hash not in self.seen]
        return out

    def asks_ahead(self) -> bool:
        """Round 2 on: the next round sees only rounds told before the current one was asked."""
        return self.asked >= 2

    def tell(self, results: Sequence[Result]) -> None:
        self.told.append(ranked(results))

    def state_dict(self) -> dict:
        told = [[[p.model_dump(mode="json"), f] for p, f in results] for results in self.told]
        return {"told": told, "asked": self.asked, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.told = [[(Proposal.model_validate(p), f) for p, f in results] for results in state["told"]]
        self.asked = int(state["asked"])
        self.seen = list(state["seen"])
