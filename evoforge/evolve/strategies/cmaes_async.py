"""CMA-ES asked one round ahead (`cmaes-async`): for several workers (Ray), none waiting for a round's slowest.

`cmaes` samples round r from the distribution told round r − 1, so with several workers each round ends with
all but one idle. `cmaes-async` samples round r (r ≥ 2) from the distribution told rounds 1 … r − 2: the
runner asks for round r as soon as round r − 1 is handed out (`asks_ahead`). Round 1 is sampled at the best
seed as `cmaes` samples it (same σ0, bounds and population; `cmaes.SeededES`). Each round is told to pycma
one round late, after the next round was sampled from the distribution before it: its points are one update
old, so they are told with `check_points=True` (pycma clips a step that is long for the current distribution,
as it does for points it did not sample), the usual guard of delayed-update CMA-ES.

What ask returns depends only on the seed and the rounds it may see, never on whether the latest round has
been told: a round told early waits, untold to pycma, until the ask that may see it. The checkpoint is
therefore data, not a pickle: the incumbent, the sampler's seed and the told fitness; loading replays the asks and
tells in their fixed order (milliseconds) and checks that it asks the recorded last round again.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from evoforge.evolve.strategies.base import Proposal, Result, ranked, register, seed_proposals
from evoforge.evolve.strategies.cmaes import Point, SeededES, proposals
from evoforge.evolve.strategies.continuous import Box
from evoforge.genome import Genome, GenomeSpace

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig


@register
class AsynchronousCMAES:
    name: ClassVar[str] = "cmaes-async"

    def __init__(self, cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> None:
        self.cfg, self.space, self.rng = cfg, space, rng
        self.box: Box | None = None
        self.seed: int | None = None
        """The sampler's seed (`SeededES.start`), drawn from the run's RNG when round 0 is told."""
        self.asked = 0
        self.fitness: list[list[float | None]] = []
        """Rounds 1, 2, …'s fitness as told, in the order their points were asked."""
        self.es: SeededES | None = None
        self.points: list[list[Point]] = []
        """Rounds 1, 2, …'s points (rebuilt on load)."""
        self.applied = 0
        """How many of those rounds pycma has been told."""

    def ask(self) -> list[Proposal]:
        if self.asked == 0:
            self.asked = 1
            return seed_proposals(self.cfg, self.space)
        if self.box is None:
            raise RuntimeError("cmaes-async: round 1 asked before round 0 was told")
        visible = self.asked - 2  # round r sees rounds 1 … r − 2
        if len(self.fitness) < visible:
            raise RuntimeError(f"cmaes-async: round {self.asked} asked before round {visible} was told")
        self._sample(visible)
        self.asked += 1
        return proposals(self.box, self.points[-1])

    def _sample(self, visible: int) -> None:
        """Tell pycma rounds up to `visible` (1-based), then ask the next round's points."""
        assert self.box is not None and self.seed is not None
        if self.es is None:
            self.es = SeededES.start(self.box, self.cfg, self.seed)
        while self.applied < visible:
            self.es.tell(self.points[self.applied], self.fitness[self.applied], check_points=True)
            self.applied += 1
        self.points.append(self.es.ask())

    def asks_ahead(self) -> bool:
        """Round 2 on: the next round sees only rounds told before the current one was asked."""
        return self.asked >= 2

    def tell(self, results: Sequence[Result]) -> None:
        if self.box is None:
            self.box = Box(ranked(results)[0][0].genome)
            self.seed = self.rng.randrange(1, 2**31)
        else:
            self.fitness.append([f for _, f in results])

    def state_dict(self) -> dict:
        return {
            "incumbent": self.box.incumbent.model_dump(mode="json") if self.box else None,
            "seed": self.seed,
            "asked": self.asked,
            "fitness": self.fitness,
            "last_points": self.points[-1] if self.points else [],
        }

    def load_state_dict(self, state: dict) -> None:
        inc = state["incumbent"]
        self.box = Box(Genome.model_validate(inc)) if inc is not None else None
        self.seed, self.fitness = state["seed"], [list(f) for f in state["fitness"]]
        self.es, self.points, self.applied, self.asked = None, [], 0, min(int(state["asked"]), 1)
        while self.asked < int(state["asked"]):  # the asks of rounds 1 … asked − 1, each with what it saw
            self._sample(max(0, self.asked - 2))
            self.asked += 1
        if (self.points[-1] if self.points else []) != state["last_points"]:
            raise ValueError("cmaes-async: the checkpoint's strategy does not ask its recorded points again")
