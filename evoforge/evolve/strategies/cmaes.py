"""CMA-ES (pycma) over the continuous genes of the best seed (`continuous.Box`), warm-started there.

Round 0 evaluates the seeds; the fittest becomes the incumbent whose methods and layer path every later
candidate keeps, and the search starts at its genes with step σ0 = `search.sigma0` (default 0.2: a fifth
of each coordinate's range, so the first round stays in the seed's neighbourhood yet reaches half-way to a
bound in 2.5σ) inside the bounds [0, 1]^d (pycma's BoundTransform keeps every sample inside). Each round
asks `population_size` (default 8) points and tells their fitness, negated (pycma minimises; a failed
candidate counts 0). The `CMAEvolutionStrategy` (pickled, base64) and the numpy RNG state pycma samples from
are the strategy's checkpoint state: pycma draws from numpy's global RNG, which is swapped in for each call
and out again (`SeededES`), so a resumed run samples exactly what the uninterrupted one did. Both are saved
as they were before the round's ask, and loading asks again: pycma files asked points under Python's
per-process salted `hash`, so a pickle of the strategy after an ask cannot be told in another process.
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

Point = list[float]


def _dump(obj: Any) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode("ascii")


def _load(text: str) -> Any:
    return pickle.loads(base64.b64decode(text))


def _randn(*shape: int) -> np.ndarray:
    """pycma's sampler, by reference (a bound method of numpy's global RNG would pickle a copy of it)."""
    return np.random.standard_normal(shape)


class SeededES:
    """A pycma ES in [0, 1]^d that samples from its own numpy RNG state, leaving numpy's global one as it was.

    Fitness is maximised (told negated; a failed candidate counts 0)."""

    def __init__(self, es: cma.CMAEvolutionStrategy, numpy_state: tuple) -> None:
        self.es, self.numpy_state = es, numpy_state

    @classmethod
    def start(cls, box: Box, cfg: EvolutionConfig, seed: int) -> SeededES:
        """At the incumbent, step `search.sigma0`, `population_size` points a round, sampling from a numpy
        RNG seeded with `seed`. (pycma's own `seed` option is ignored with a custom `randn`: it sampled from
        whatever numpy's global state was, the same for every run seed once lm-eval had seeded it.)"""
        options = {
            "popsize": cfg.population_size,
            "bounds": [0.0, 1.0],
            "randn": _randn,
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        out = cls.__new__(cls)
        out.numpy_state = np.random.RandomState(seed).get_state()
        with out._numpy():
            out.es = cma.CMAEvolutionStrategy(box.encode(box.incumbent), cfg.search.sigma0, options)
        return out

    @contextmanager
    def _numpy(self) -> Iterator[None]:
        outer = np.random.get_state()
        np.random.set_state(self.numpy_state)
        try:
            yield
        finally:
            self.numpy_state = np.random.get_state()
            np.random.set_state(outer)

    def ask(self) -> list[Point]:
        with self._numpy():
            points = self.es.ask()
        return [[float(v) for v in x] for x in points]

    def tell(
        self, points: Sequence[Point], fitness: Sequence[float | None], check_points: bool | None
    ) -> None:
        """`check_points=True`: pycma clips each step that is long for the current distribution (points asked
        before an earlier tell); None: only points it did not ask."""
        with self._numpy():
            self.es.tell(
                [np.array(x) for x in points], [-(f or 0.0) for f in fitness], check_points=check_points
            )

    def dumps(self) -> tuple[str, str]:
        return _dump(self.es), _dump(self.numpy_state)

    @classmethod
    def loads(cls, es: str, numpy_state: str) -> SeededES:
        return cls(_load(es), _load(numpy_state))


def proposals(box: Box, points: Sequence[Point]) -> list[Proposal]:
    """CMA-ES points as genomes of the incumbent's space, the incumbent their parent."""
    return [Proposal(genome=box.decode(x), operator="cmaes", parents=[box.incumbent.hash]) for x in points]


@register
class CMAES:
    name: ClassVar[str] = "cmaes"

    def __init__(self, cfg: EvolutionConfig, space: GenomeSpace, rng: random.Random) -> None:
        self.cfg, self.space, self.rng = cfg, space, rng
        self.box: Box | None = None
        self.es: SeededES | None = None
        self.asked: list[Point] = []
        self.before_ask: tuple[str | None, str | None] = (None, None)
        """The pickled strategy and numpy state before the last ask: what a checkpoint holds."""

    def ask(self) -> list[Proposal]:
        if self.box is None or self.es is None:
            return seed_proposals(self.cfg, self.space)
        self.before_ask = self.es.dumps()
        self.asked = self.es.ask()
        return proposals(self.box, self.asked)

    def tell(self, results: Sequence[Result]) -> None:
        if self.es is None:
            self.box = Box(ranked(results)[0][0].genome)
            self.es = SeededES.start(self.box, self.cfg, self.rng.randrange(1, 2**31))
            return
        self.es.tell(self.asked, [f for _, f in results], check_points=None)
        self.asked = []

    def state_dict(self) -> dict:
        """Before round 1's ask (the ES was just made): the ES as it is; later: as it was before the ask."""
        es, numpy_state = self.before_ask if self.asked else self.es.dumps() if self.es else (None, None)
        return {
            "incumbent": self.box.incumbent.model_dump(mode="json") if self.box else None,
            "es": es,
            "numpy": numpy_state,
            "asked": self.asked,
        }

    def load_state_dict(self, state: dict) -> None:
        inc = state["incumbent"]
        self.box = Box(Genome.model_validate(inc)) if inc is not None else None
        self.es = SeededES.loads(state["es"], state["numpy"]) if state["es"] is not None else None
        self.asked = []
        if state["asked"]:
            assert self.es is not None
            self.before_ask = (state["es"], state["numpy"])
            self.asked = self.es.ask()  # the same points, filed under this process's hashes
            if self.asked != state["asked"]:
                raise ValueError("cmaes: the checkpoint's strategy does not ask its recorded points again")
