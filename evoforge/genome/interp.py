"""Gene 1, interp: continuous interpolation of the base models, and its registry of methods.

The gene's weights are on the simplex in every layer group (row 0 is the anchor, the first base model). A
method declares the run-file key its seed is built from, how it writes the `evoforge_interp` stage, and how
it reads one back; mutation (noise, then the simplex) and the genome-space merge (weighted mean) are the
same for every method.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator

from evoforge.config import MergeOperators
from evoforge.genome.base import Gene, GenomeSpace, Matrix, columns, jitter, simplex, weighted
from evoforge.genome.mergekit_yaml import (
    INTERP_STAGE,
    fail,
    gradient,
    models_block,
    per_model,
    scalar,
    values,
)
from evoforge.genome.methods import Method, Registry, vote

WEIGHT_RANGE = (0.0, 2.0)


@dataclass(frozen=True, kw_only=True)
class InterpMethod(Method):
    operator: str
    """`merge_operators` key x of its seed: the anchor gets 1 − x, the others share x by their weight."""
    render: Callable[[InterpGene, GenomeSpace], list[str]]
    """The stage's lines between `name:` and `dtype:`."""
    parse: Callable[[dict, GenomeSpace, str], InterpGene]
    """The stage's YAML mapping (one of its `mergekit` methods) → the gene; `str` names the recipe."""


METHODS: Registry[InterpMethod] = Registry("interp")


class InterpGene(Gene):
    """Stage 1: interpolation of the base models. Weights are on the simplex in every layer group."""

    method: Annotated[str, AfterValidator(METHODS.require)]
    weights: Matrix

    def check(self, space: GenomeSpace) -> None:
        self.check_shape("weights", space)
        if any(v < 0 for row in self.weights for v in row):
            raise ValueError("interp weights must be ≥ 0")


def _weight_rows(gene: InterpGene, space: GenomeSpace) -> list[tuple[str, str, dict[str, Sequence[float]]]]:
    return [(n, p, {"weight": w}) for n, p, w in zip(space.models, space.paths, gene.weights)]


def _given_weights(
    doc: dict, space: GenomeSpace, source: str, names: Sequence[str]
) -> list[tuple[float, ...]]:
    """The `models:` weights of `names`, 0 for a model the stage leaves out."""
    given = per_model(doc.get("models") or [], space, ["weight"], source, INTERP_STAGE)
    return [given.get(n, {"weight": (0.0,) * space.layer_groups})["weight"] for n in names]


def _render_linear(gene: InterpGene, space: GenomeSpace) -> list[str]:
    return [
        "merge_method: linear",
        f"base_model: {scalar(space.paths[0])}  # config and tokenizer donor",
        "parameters: {normalize: true}",
        *models_block(_weight_rows(gene, space)),
    ]


def _parse_linear(doc: dict, space: GenomeSpace, source: str) -> InterpGene:
    weights = _given_weights(doc, space, source, space.models)
    if any(sum(w[j] for w in weights) <= 0 for j in range(space.layer_groups)):
        raise fail(source, f"{INTERP_STAGE}.models", "interpolation weights sum to 0")
    return InterpGene(method="linear", weights=tuple(weights))


def _render_slerp(gene: InterpGene, space: GenomeSpace) -> list[str]:
    """Around the ancestor: multislerp of all models. Two models: mergekit's slerp with t = the second's
    weight. Three or more: multislerp around the anchor, the others weighted (their sum ≤ 1)."""
    if space.ancestor:
        return [
            "merge_method: multislerp",
            f"base_model: {scalar(space.ancestor)}  # ancestor: origin of the sphere",
            *models_block(_weight_rows(gene, space)),
        ]
    if len(space.models) == 2:
        return [
            "merge_method: slerp",
            f"base_model: {scalar(space.paths[0])}  # anchor: t = 0",
            f"parameters: {{t: {gradient(gene.weights[1])}}}",
            "models:",
            f"  - model: {scalar(space.paths[0])}",
            f"  - model: {scalar(space.paths[1])}",
        ]
    return [
        "merge_method: multislerp",
        f"base_model: {scalar(space.paths[0])}  # anchor: weights 0 = anchor",
        "parameters: {normalize_weights: false}",
        *models_block(_weight_rows(gene, space)[1:]),
    ]


def _parse_slerp(doc: dict, space: GenomeSpace, source: str) -> InterpGene:
    g = space.layer_groups
    if doc.get("merge_method") == "slerp":
        t = values((doc.get("parameters") or {}).get("t"), g, source, f"{INTERP_STAGE}.parameters.t")
        return InterpGene(method="slerp", weights=simplex((t, t), anchored=True))
    if space.ancestor:
        return InterpGene(method="slerp", weights=tuple(_given_weights(doc, space, source, space.models)))
    others = _given_weights(doc, space, source, space.models[1:])
    if any(sum(w[j] for w in others) > 1 + 1e-9 for j in range(g)):
        raise fail(source, f"{INTERP_STAGE}.models", "weights around the anchor must sum to ≤ 1")
    return InterpGene(method="slerp", weights=simplex([(0.0,) * g, *others], anchored=True))


METHODS.register(
    InterpMethod(
        name="linear",
        mergekit=("linear",),
        reference_url="https://arxiv.org/abs/2203.05482",
        operator="linear_weight",
        render=_render_linear,
        parse=_parse_linear,
    )
)
METHODS.register(
    InterpMethod(
        name="slerp",
        mergekit=("slerp", "multislerp"),
        reference_url="https://doi.org/10.1145/325165.325242",
        operator="slerp_t",
        render=_render_slerp,
        parse=_parse_slerp,
    )
)


def seed(method: str, space: GenomeSpace, ops: MergeOperators, model_weights: Sequence[float]) -> InterpGene:
    """The method's seed: anchor 1 − x, the other models share x in proportion to their configured weights."""
    x = getattr(ops, METHODS[method].operator)
    others = model_weights[1:]
    total = sum(others)
    split = [1.0 - x] + [x * w / total for w in others]
    return InterpGene(method=method, weights=simplex(columns(split, space.layer_groups)))


def mutate(gene: InterpGene, rng: random.Random, rate: float) -> InterpGene:
    """Maybe another method, then Gaussian noise (σ = rate) on every weight, back onto the simplex."""
    return InterpGene(
        method=METHODS.flip(gene.method, rng, rate),
        weights=simplex(jitter(gene.weights, rng, rate, WEIGHT_RANGE)),
    )


def blend(genes: Sequence[InterpGene], w: Sequence[float], order: Sequence[int]) -> InterpGene:
    """Majority method, `w`-weighted mean of the weights."""
    return InterpGene(
        method=vote([g.method for g in genes], order),
        weights=simplex(weighted([g.weights for g in genes], w)),
    )


def render(gene: InterpGene, space: GenomeSpace) -> list[str]:
    """The `evoforge_interp` stage as YAML lines."""
    return [
        f"# gene 1, interp = {gene.method}: continuous interpolation of the base models",
        f"name: {INTERP_STAGE}",
        *METHODS[gene.method].render(gene, space),
        f"dtype: {space.dtype}",
    ]


def parse(doc: dict, space: GenomeSpace, source: str) -> InterpGene:
    """The gene an `evoforge_interp` stage describes."""
    method = doc.get("merge_method")
    entry = METHODS.from_mergekit(method)
    if entry is None:
        known = METHODS.listing(METHODS.mergekit_names())
        raise fail(source, f"{INTERP_STAGE}.merge_method", f"{method!r} is not {known}")
    return entry.parse(doc, space, source)
