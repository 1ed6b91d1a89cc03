"""What every gene shares: the 6-decimal grid, the interp simplex, matrix noise, and the space genomes live in.

Continuous parameters are held per base model and per layer group (G points of a mergekit gradient over depth;
G = 1 is global) and rounded to 6 decimals, so that a genome, its YAML and the YAML parsed back are exactly
equal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from evoforge.config import EvolutionConfig
from evoforge.models import read_model_config

if TYPE_CHECKING:
    from evoforge.genome.genes import Genome

DECIMALS = 6
STAGE_SOURCES = ("crossover", "interp")
"""Layer sources that are stages of the recipe itself; every other source is a base model name."""


def q(x: float) -> float:
    """Round to the genome's grid (6 decimals); -0.0 becomes 0.0 so hashes are stable."""
    return round(float(x), DECIMALS) + 0.0


def simplex(m: Sequence[Sequence[float]], anchored: bool = False) -> tuple[tuple[float, ...], ...]:
    """Canonical interp weights: every layer-group column sums to 1 and the anchor (row 0) is exactly
    1 − Σ others after rounding, so that recipes that omit the anchor's weight round-trip.
    With `anchored`, rows 1.. are taken as they are (their sum ≤ 1) and only the anchor is derived."""
    n, g = len(m), len(m[0])
    rows = [[max(float(v), 0.0) for v in row] for row in m]
    if not anchored:
        for j in range(g):
            total = sum(row[j] for row in rows)
            for row in rows:
                row[j] = row[j] / total if total > 0 else 1.0 / n
    others = [[q(v) for v in row] for row in rows[1:]]
    anchor = [max(q(1.0 - sum(row[j] for row in others)), 0.0) for j in range(g)]
    return tuple(tuple(row) for row in [anchor, *others])


Q = Annotated[float, AfterValidator(q)]
Matrix = tuple[tuple[Q, ...], ...]
"""values[model][group]: one row per base model, one column per layer group."""


def columns(values: Sequence[float], groups: int) -> tuple[tuple[float, ...], ...]:
    """One value per model, the same in every layer group (seeds start global)."""
    return tuple((v,) * groups for v in values)


def clip(x: float, lo_hi: tuple[float, float]) -> float:
    return min(max(x, lo_hi[0]), lo_hi[1])


def jitter(m: Matrix, rng: random.Random, sigma: float, lo_hi: tuple[float, float]) -> Matrix:
    """Gaussian noise on every entry, row by row (the draw order is part of a run's reproducibility)."""
    return tuple(tuple(clip(v + rng.gauss(0.0, sigma), lo_hi) for v in row) for row in m)


def weighted(mats: Sequence[Matrix], w: Sequence[float]) -> Matrix:
    """Σ_k w_k · mats[k], entry by entry: the genome-space merge of continuous genes."""
    return tuple(
        tuple(sum(wk * m[i][j] for wk, m in zip(w, mats)) for j in range(len(mats[0][0])))
        for i in range(len(mats[0]))
    )


class Gene(BaseModel):
    """A frozen, strict gene; `check` says where it does not fit a space."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def check(self, space: GenomeSpace) -> None:
        """Raise ValueError where this gene does not fit `space`."""
        raise NotImplementedError

    def check_shape(self, field: str, space: GenomeSpace) -> None:
        """A per-model matrix must be models × layer groups."""
        n, g = len(space.models), space.layer_groups
        m = getattr(self, field)
        if len(m) != n or any(len(row) != g for row in m):
            raise ValueError(f"{type(self).__name__}.{field} must be {n} models × {g} layer groups")


@dataclass(frozen=True)
class GenomeSpace:
    """What a genome is over: the base models (anchor first), their depth, the granularity, the ancestor."""

    models: tuple[str, ...]
    paths: tuple[str, ...]
    num_layers: int
    layer_groups: int = 1
    ancestor: str | None = None
    """Resolved path of the common ancestor: the crossover's base and slerp's origin when given."""
    dtype: str = "bfloat16"

    @property
    def sources(self) -> tuple[str, ...]:
        return (*STAGE_SOURCES, *self.models)

    @property
    def max_depth(self) -> int:
        """DFS paths may repeat layers up to 1.5× the base depth (compute grows with depth)."""
        return self.num_layers + self.num_layers // 2

    @property
    def min_depth(self) -> int:
        return max(1, self.num_layers // 2)

    def path_of(self, name: str) -> str:
        return self.paths[self.models.index(name)]

    @classmethod
    def from_config(cls, cfg: EvolutionConfig, num_layers: int | None = None) -> GenomeSpace:
        """Build from a run config; the depth is read from the anchor model's config.json unless given."""
        paths = tuple(cfg.resolve(m) for m in cfg.base_models)
        if num_layers is None:
            anchor = cfg.base_models[0]
            num_layers = int(
                read_model_config(paths[0], what=f"base_models[0] ({anchor.name})")["num_hidden_layers"]
            )
        return cls(
            models=tuple(m.name for m in cfg.base_models),
            paths=paths,
            num_layers=num_layers,
            layer_groups=cfg.merge_operators.layer_groups,
            ancestor=cfg.resolve(cfg.ancestor) if cfg.ancestor else None,
            dtype=cfg.dtype,
        )

    def check(self, genome: Genome) -> None:
        """Raise ValueError where a genome does not fit this space (shapes, sources, layers, depth)."""
        genome.check(self)
