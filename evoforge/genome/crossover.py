"""Gene 2, crossover: a task-vector merge of the base models, and its registry of methods.

Every method is one of mergekit's generalized task arithmetic methods (`ties`, `dare_ties`, `della`,
`task_arithmetic`, …) over the interp output, or over the ancestor when the run declares one: per-model
`weight` and (where the method takes it) `density`, a global `lambda`, normalized weights. A method declares
which run-file keys its seed comes from; rendering, parsing, mutation and the genome-space merge are the
same for all of them.

With an ancestor the interp output joins the task vectors as one more model (`evoforge_interp`, its task
vector Σ wᵢτᵢ for linear, the multislerp direction for slerp) with its own weight and density per layer
group, so the interp gene enters the result; without one, the interp output is the base, and so in every
tensor of the stage.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from evoforge.config import MergeOperators
from evoforge.genome.base import Gene, GenomeSpace, Matrix, Q, clip, columns, jitter, q, weighted
from evoforge.genome.mergekit_yaml import (
    CROSSOVER_STAGE,
    INTERP_STAGE,
    fail,
    models_block,
    num,
    per_model,
    scalar,
    values,
)
from evoforge.genome.methods import Method, Registry, vote

DENSITY_RANGE = (0.05, 1.0)
WEIGHT_RANGE = (0.0, 2.0)
LAMBDA_RANGE = (0.1, 3.0)
PARAMS = ("weight", "density")
"""The per-model mergekit parameters the gene holds (`weights`, `density`)."""


@dataclass(frozen=True, kw_only=True)
class CrossoverMethod(Method):
    params: tuple[str, ...] = PARAMS
    """The per-model parameters it takes, of PARAMS; one it does not take is held at 1 and not written."""
    density_key: str | None = None
    """`merge_operators` key t of its seed: density = 1 − t. None: density 1."""
    lambda_key: str | None = None
    """`merge_operators` key of its seed's lambda. None: lambda 1."""

    def __post_init__(self) -> None:
        if "weight" not in self.params or not set(self.params) <= set(PARAMS):
            raise ValueError(f"crossover method {self.name!r}: params must hold 'weight', of {list(PARAMS)}")


METHODS: Registry[CrossoverMethod] = Registry("crossover")
METHODS.register(
    CrossoverMethod(
        name="ties",
        mergekit=("ties",),
        reference_url="https://arxiv.org/abs/2306.01708",
        density_key="ties_threshold",
    )
)
METHODS.register(
    CrossoverMethod(
        name="dare",
        mergekit=("dare_ties",),
        reference_url="https://arxiv.org/abs/2311.03099",
        density_key="dare_threshold",
        lambda_key="dare_amplification",
    )
)


class CrossoverGene(Gene):
    """Stage 2: a task-vector merge of the base models over the interp output (or the ancestor)."""

    method: Annotated[str, AfterValidator(METHODS.require)]
    weights: Matrix
    density: Matrix
    lambda_: Annotated[float, Field(gt=0.0), AfterValidator(q)] = 1.0
    seed: Annotated[int, Field(ge=0, lt=2**31)] = 0
    """mergekit's --random-seed for this recipe: DARE's drop masks depend on it, so a genome is one model."""
    interp_weight: tuple[Q, ...] = ()
    """With an ancestor: the interp output's weight per layer group as one more task vector. Empty: not in
    the stage (no ancestor, or a genome from before it joined, which so stays the model it was)."""
    interp_density: tuple[Q, ...] = ()
    """Its density per layer group (1 for a method without density); empty exactly when interp_weight is."""

    @field_validator("density", "interp_density")
    @classmethod
    def _unused_density_is_one(cls, density: tuple, info: ValidationInfo) -> tuple:
        """A method without density keeps it at 1, as its recipe (which omits it) parses back."""
        method = info.data.get("method")
        if method is not None and "density" not in METHODS[method].params:
            return tuple(1.0 if isinstance(row, float) else tuple(1.0 for _ in row) for row in density)
        return density

    @model_serializer(mode="wrap")
    def _omit_absent_interp(self, handler: SerializerFunctionWrapHandler) -> dict:
        """Genomes without the interp entry dump (and so hash) as they did before it existed."""
        data = handler(self)
        if not self.interp_weight:
            data.pop("interp_weight", None)
            data.pop("interp_density", None)
        return data

    def check(self, space: GenomeSpace) -> None:
        self.check_shape("weights", space)
        self.check_shape("density", space)
        g = space.layer_groups
        if len(self.interp_density) != len(self.interp_weight) or len(self.interp_weight) not in (
            (0, g) if space.ancestor else (0,)
        ):
            raise ValueError(
                f"crossover interp_weight and interp_density must be {g} layer groups with an ancestor, "
                "empty without one (the interp output is then the base)"
            )
        if any(not 0 < v <= 1 for row in (*self.density, self.interp_density) for v in row):
            raise ValueError("crossover density must be in (0, 1]")
        if any(v < 0 for row in (*self.weights, self.interp_weight) for v in row):
            raise ValueError("crossover weights must be ≥ 0")


def seed(
    method: str, space: GenomeSpace, ops: MergeOperators, model_weights: Sequence[float], random_seed: int
) -> CrossoverGene:
    """The method's seed: weights ∝ the models' configured weights, density and lambda from its keys; with an
    ancestor the interp output takes part with a base model's mean share and the same density."""
    entry = METHODS[method]
    share = [w / sum(model_weights) for w in model_weights]
    threshold = getattr(ops, entry.density_key) if entry.density_key else 0.0
    g = space.layer_groups
    joins = g if space.ancestor else 0
    return CrossoverGene(
        method=method,
        weights=columns(share, g),
        density=columns([1.0 - threshold] * len(share), g),
        lambda_=getattr(ops, entry.lambda_key) if entry.lambda_key else 1.0,
        seed=random_seed,
        interp_weight=(1.0 / len(share),) * joins,
        interp_density=(1.0 - threshold,) * joins,
    )


def mutate(gene: CrossoverGene, rng: random.Random, rate: float) -> CrossoverGene:
    """Maybe another method, then Gaussian noise (σ = rate) on weights, density and lambda; same seed."""
    return CrossoverGene(
        method=METHODS.flip(gene.method, rng, rate),
        weights=jitter(gene.weights, rng, rate, WEIGHT_RANGE),
        density=jitter(gene.density, rng, rate, DENSITY_RANGE),
        lambda_=clip(gene.lambda_ + rng.gauss(0.0, rate), LAMBDA_RANGE),
        seed=gene.seed,
        interp_weight=jitter((gene.interp_weight,), rng, rate, WEIGHT_RANGE)[0],
        interp_density=jitter((gene.interp_density,), rng, rate, DENSITY_RANGE)[0],
    )


def blend(genes: Sequence[CrossoverGene], w: Sequence[float], order: Sequence[int]) -> CrossoverGene:
    """Majority method, `w`-weighted means of the parameters (a parent without the interp entry counts as
    weight 0, density 1 there), the fittest parent's (`order[0]`) seed."""
    joined = any(g.interp_weight for g in genes)
    weights = weighted([(*g.weights, _interp_row(g, "interp_weight", 0.0)) for g in genes], w)
    density = weighted([(*g.density, _interp_row(g, "interp_density", 1.0)) for g in genes], w)
    density = tuple(tuple(clip(v, DENSITY_RANGE) for v in row) for row in density)
    return CrossoverGene(
        method=vote([g.method for g in genes], order),
        weights=weights[:-1],
        density=density[:-1],
        lambda_=sum(wk * g.lambda_ for wk, g in zip(w, genes)),
        seed=genes[order[0]].seed,
        interp_weight=weights[-1] if joined else (),
        interp_density=density[-1] if joined else (),
    )


def _interp_row(gene: CrossoverGene, field: str, absent: float) -> tuple[float, ...]:
    """The interp entry's row of `field`; `absent` in every layer group for a gene without it."""
    return getattr(gene, field) or (absent,) * len(gene.weights[0])


def render(gene: CrossoverGene, space: GenomeSpace) -> list[str]:
    """The `evoforge_crossover` stage as YAML lines."""
    entry = METHODS[gene.method]
    what = "the declared ancestor" if space.ancestor else "the interp output"
    held = {"weight": gene.weights, "density": gene.density}
    rows = [
        (name, path, {k: held[k][i] for k in entry.params})
        for i, (name, path) in enumerate(zip(space.models, space.paths))
    ]
    if gene.interp_weight:
        interp = {"weight": gene.interp_weight, "density": gene.interp_density}
        rows.append(("interp", INTERP_STAGE, {k: interp[k] for k in entry.params}))
    return [
        f"# gene 2, crossover = {gene.method}: task vectors of the base models over {what}",
        f"name: {CROSSOVER_STAGE}",
        f"merge_method: {entry.mergekit[0]}",
        f"base_model: {scalar(space.ancestor or INTERP_STAGE)}",
        *models_block(rows),
        f"parameters: {{normalize: true, lambda: {num(gene.lambda_)}}}",
        f"dtype: {space.dtype}",
    ]


def parse(doc: dict, space: GenomeSpace, source: str, random_seed: int | None) -> CrossoverGene:
    """The gene an `evoforge_crossover` stage describes; `random_seed` is the recipe header's."""
    method = doc.get("merge_method")
    entry = METHODS.from_mergekit(method)
    if entry is None:
        known = METHODS.listing(METHODS.mergekit_names())
        raise fail(source, f"{CROSSOVER_STAGE}.merge_method", f"{method!r} is not {known}")
    given = per_model(doc.get("models") or [], space, entry.params, source, CROSSOVER_STAGE)
    if "interp" in given and not space.ancestor:
        raise fail(
            source,
            f"{CROSSOVER_STAGE}.models",
            f"{INTERP_STAGE} is the base without an ancestor, not a model",
        )
    absent = {"weight": (0.0,) * space.layer_groups, "density": (1.0,) * space.layer_groups}
    rows = [{**absent, **given.get(n, {})} for n in space.models]
    interp = {**absent, **given["interp"]} if "interp" in given else {"weight": (), "density": ()}
    lam = (doc.get("parameters") or {}).get("lambda", 1.0)
    return CrossoverGene(
        method=entry.name,
        weights=tuple(r["weight"] for r in rows),
        density=tuple(r["density"] for r in rows),
        lambda_=values(lam, 1, source, f"{CROSSOVER_STAGE}.parameters.lambda")[0],
        seed=random_seed or 0,
        interp_weight=interp["weight"],
        interp_density=interp["density"],
    )
