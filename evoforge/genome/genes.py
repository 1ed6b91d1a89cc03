"""A candidate merge as three genes, one per stage of its mergekit recipe.

interp (linear | slerp) → crossover (ties | dare) → structure (frankenmerge | dfs). Continuous parameters are
held per base model and per layer group (G points of a mergekit gradient over depth; G = 1 is global) and
rounded to 6 decimals, so that a genome, its YAML and the YAML parsed back are exactly equal.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from evoforge.config import EvolutionConfig
from evoforge.models import read_model_config

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


class Gene(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InterpGene(Gene):
    """Stage 1: interpolation of the base models. Weights are on the simplex in every layer group."""

    method: Literal["linear", "slerp"]
    weights: Matrix


class CrossoverGene(Gene):
    """Stage 2: TIES or DARE task-vector merge of the base models over the interp output (or the ancestor)."""

    method: Literal["ties", "dare"]
    weights: Matrix
    density: Matrix
    lambda_: Annotated[float, Field(gt=0.0), AfterValidator(q)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    """mergekit's --random-seed for this recipe: DARE's drop masks depend on it, so a genome is one model."""


class Step(Gene):
    """One layer of the output model: `layer` of `source`, its input multiplied by `scale` (DFS)."""

    source: str
    layer: Annotated[int, Field(ge=0)]
    scale: Annotated[float, Field(gt=0.0), AfterValidator(q)] = 1.0


class StructureGene(Gene):
    """Stage 3: the output's layer path. frankenmerge renders runs of consecutive layers as block slices with
    unit scales; dfs renders one slice per step with its scale (Sakana's data-flow-space merge)."""

    method: Literal["frankenmerge", "dfs"]
    path: Annotated[tuple[Step, ...], Field(min_length=1)]


class Genome(Gene):
    interp: InterpGene
    crossover: CrossoverGene
    structure: StructureGene

    @property
    def label(self) -> str:
        """The seed-style name of its method triple, e.g. `linear-ties-frankenmerge`."""
        return f"{self.interp.method}-{self.crossover.method}-{self.structure.method}"

    @property
    def hash(self) -> str:
        """Stable content hash: equal genomes (and so equal recipes) share it across runs and machines."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


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
        n, g = len(self.models), self.layer_groups
        for gene, field in (
            (genome.interp, "weights"),
            (genome.crossover, "weights"),
            (genome.crossover, "density"),
        ):
            m = getattr(gene, field)
            if len(m) != n or any(len(row) != g for row in m):
                raise ValueError(f"{type(gene).__name__}.{field} must be {n} models × {g} layer groups")
        if any(v < 0 for row in genome.interp.weights for v in row):
            raise ValueError("interp weights must be ≥ 0")
        if any(not 0 < v <= 1 for row in genome.crossover.density for v in row):
            raise ValueError("crossover density must be in (0, 1]")
        if any(v < 0 for row in genome.crossover.weights for v in row):
            raise ValueError("crossover weights must be ≥ 0")
        path = genome.structure.path
        if not self.min_depth <= len(path) <= self.max_depth:
            raise ValueError(
                f"structure path has {len(path)} layers; allowed {self.min_depth}..{self.max_depth}"
            )
        for i, step in enumerate(path):
            if step.source not in self.sources:
                raise ValueError(
                    f"structure.path[{i}].source {step.source!r} is not one of {list(self.sources)}"
                )
            if step.layer >= self.num_layers:
                raise ValueError(f"structure.path[{i}].layer {step.layer} ≥ {self.num_layers} layers")
        if genome.structure.method == "frankenmerge" and any(s.scale != 1.0 for s in path):
            raise ValueError("a frankenmerge path has unit scales (scales belong to dfs)")
