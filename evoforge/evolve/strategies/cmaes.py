"""CMA-ES (pycma) over the continuous genes of the best seed (`continuous.Box`), warm-started there.

Round 0 evaluates the seeds; the fittest becomes the incumbent whose methods and layer path every later
candidate keeps, and the search starts at its genes with step σ0 = `search.sigma0` (default 0.2: a fifth
of each coordinate's range, so the first round stays in the seed's neighbourhood yet reaches half-way to a
bound in 2.5σ) inside the bounds [0, 1]^d (pycma's BoundTransform keeps every sample inside). Each round
asks `population_size` (default 8) points and tells their fitness, negated (pycma minimises; a failed
candidate counts 0). The `CMAEvolutionStrategy` (pickled, base64) and the numpy RNG state pycma samples from
are the strategy's checkpoint state: pycma draws from numpy's global RNG, which is swapped in for each call
and out again, so a resumed run samples exactly what the uninterrupted one did. Both are saved as they were
before the round's ask, and loading asks again: pycma files asked points under Python's per-process salted
`hash`, so a pickle of the strategy after an ask cannot be told in another process.
"""

from __future__ import annotations

import base64
import pickle
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar

import cma
import numpy as np

from evoforge.evolve.strategies.base import Proposal, Result, ranked, register, seed_proposals
from evoforge.evolve.strategies.continuous import Box
from evoforge.genome import Genome, GenomeSpace

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig


def _dump(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


def _load(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


def _randn(*shape: int) -> np.ndarray:
    """pycma's sampler, by reference (a bound method of numpy's global RNG would pickle a copy of it)."""
    return np.random.standard_normal(shape)


@register
class CMAES:
    name: ClassVar[str] = "cmaes"

    def __init__(self, cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> None:
        self.cfg, self.space, self.rng = cfg, space, rng
        self.box: Box | None = None
        self.es: cma.CMAEvolutionStrategy | None = None
        self.numpy_state: tuple | None = None
        self.asked: list[list[float]] = []
        self.before_ask: tuple[str | None, str | None] = (None, None)
        """The pickled strategy and numpy state before the last ask: what a checkpoint holds."""

    @contextmanager
    def _numpy(self) -> Iterator[None]:
        """Run pycma on this strategy's numpy RNG state, leaving the global one as it was."""
        outer = np.random.get_state()
        if self.numpy_state is not None:
            np.random.set_state(self.numpy_state)
        try:
            yield
        finally:
            self.numpy_state = np.random.get_state()
            np.random.set_state(outer)

    def ask(self) -> list[Proposal]:
        if self.box is None or self.es is None:
            return seed_proposals(self.cfg, self.space)
        self.before_ask = (_dump(self.es), _dump(self.numpy_state))
        self._ask()
        parent = [self.box.incumbent.hash]
        return [Proposal(genome=self.box.decode(x), operator="cmaes", parents=parent) for x in self.asked]

    def _ask(self) -> None:
        assert self.es is not None
        with self._numpy():
            points = self.es.ask()
        self.asked = [[float(v) for v in x] for x in points]

    def tell(self, results: Sequence[Result]) -> None:
        if self.es is None:
            self.box = Box(ranked(results)[0][0].genome)
            options = {
                "popsize": self.cfg.population_size,
                "bounds": [0.0, 1.0],
                "seed": self.rng.randrange(1, 2**31),
                "randn": _randn,
                "verbose": -9,
                "verb_log": 0,
                "verb_disp": 0,
            }
            with self._numpy():
                self.es = cma.CMAEvolutionStrategy(
                    self.box.encode(self.box.incumbent), self.cfg.search.sigma0, options
                )
            return
        with self._numpy():
            self.es.tell([np.array(x) for x in self.asked], [-(f or 0.0) for _, f in results])
        self.asked = []

    def state_dict(self) -> dict:
        """Before round 1's ask (the ES was just made): the ES as it is; later: as it was before the ask."""
        es, numpy_state = (
            self.before_ask
            if self.asked
            else (
                _dump(self.es) if self.es is not None else None,
                _dump(self.numpy_state) if self.numpy_state is not None else None,
            )
        )
        return {
            "incumbent": self.box.incumbent.model_dump(mode="json") if self.box else None,
            "es": es,
            "numpy": numpy_state,
            "asked": self.asked,
        }

    def load_state_dict(self, state: dict) -> None:
        inc = state["incumbent"]
        self.box = Box(Genome.model_validate(inc)) if inc is not None else None
        self.es = _load(state["es"]) if state["es"] is not None else None
        self.numpy_state = _load(state["numpy"]) if state["numpy"] is not None else None
        self.asked = []
        if state["asked"]:
            self.before_ask = (state["es"], state["numpy"])
            self._ask()  # the same points, filed under this process's hashes
            if self.asked != state["asked"]:
                raise ValueError("cmaes: the checkpoint's strategy does not ask its recorded points again")
