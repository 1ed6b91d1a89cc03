"""The continuous search space of cmaes and random: an incumbent's continuous genes as a point of [0, 1]^d.

Coordinates, per layer group (G columns of a mergekit gradient; G = 1 is global):
- interp: the weight of each non-anchor model in [0, 1]; the anchor gets 1 − their sum (they are scaled to
  sum 1, anchor 0, when they sum above 1), so every point is a valid interpolation (slerp t with 2 models);
- crossover: each model's task-vector weight in [0, 2] — with `normalize: true` only ratios and the λ
  factor matter, and [0, 2] holds the seeds (1/n) with room to let one model dominate;
- crossover density in [0.05, 1] where the method takes one (below 0.05 TIES/DARE keep too few entries to
  carry a task; 1 keeps all);
- λ in [0.5, 2]: the merged task vector's scale; above 1 is the extrapolation Sakana's evolved merges used
  (weights summing to ~2), below 0.5 the task vectors all but vanish. One real 1.5 B LoRA vector alone peaks
  on its domain at scale 1 and is below its ancestor by 3 (recipes/qwen2-1.5b/README.md): 2 is room for a
  normalised merge, not for one vector.
Methods, structure and the crossover's random seed stay the incumbent's. Each coordinate is scaled to its
range, so one step size means the same fraction of every range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from evoforge.genome import CrossoverGene, Genome, InterpGene
from evoforge.genome.base import simplex
from evoforge.genome.crossover import METHODS as CROSSOVER_METHODS

INTERP_RANGE = (0.0, 1.0)
WEIGHT_RANGE = (0.0, 2.0)
DENSITY_RANGE = (0.05, 1.0)
LAMBDA_RANGE = (0.5, 2.0)


def _unit(v: float, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return min(max((v - lo) / (hi - lo), 0.0), 1.0)


def _value(u: float, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return lo + min(max(float(u), 0.0), 1.0) * (hi - lo)


@dataclass(frozen=True)
class Box:
    """The unit cube around one incumbent genome: `encode` a genome of its methods, `decode` a point."""

    incumbent: Genome

    @property
    def has_density(self) -> bool:
        return "density" in CROSSOVER_METHODS[self.incumbent.crossover.method].params

    def ranges(self) -> list[tuple[float, float]]:
        inc = self.incumbent
        n, g = len(inc.crossover.weights), len(inc.crossover.weights[0])
        return (
            [INTERP_RANGE] * ((n - 1) * g)
            + [WEIGHT_RANGE] * (n * g)
            + [DENSITY_RANGE] * (n * g if self.has_density else 0)
            + [LAMBDA_RANGE]
        )

    @property
    def dim(self) -> int:
        return len(self.ranges())

    def encode(self, genome: Genome) -> list[float]:
        values = [v for row in genome.interp.weights[1:] for v in row]
        values += [v for row in genome.crossover.weights for v in row]
        if self.has_density:
            values += [v for row in genome.crossover.density for v in row]
        values.append(genome.crossover.lambda_)
        return [_unit(v, r) for v, r in zip(values, self.ranges())]

    def decode(self, point: Sequence[float]) -> Genome:
        inc = self.incumbent
        values = iter([_value(u, r) for u, r in zip(point, self.ranges())])
        n, g = len(inc.crossover.weights), len(inc.crossover.weights[0])

        def matrix(rows: int) -> list[list[float]]:
            return [[next(values) for _ in range(g)] for _ in range(rows)]

        others = matrix(n - 1)
        anchor = [max(1.0 - sum(row[j] for row in others), 0.0) for j in range(g)]
        weights = matrix(n)
        density = matrix(n) if self.has_density else inc.crossover.density
        return Genome(
            interp=InterpGene(method=inc.interp.method, weights=simplex([anchor, *others])),
            crossover=CrossoverGene(
                method=inc.crossover.method,
                weights=weights,
                density=density,
                lambda_=next(values),
                seed=inc.crossover.seed,
            ),
            structure=inc.structure,
        )
