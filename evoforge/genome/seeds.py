"""The 8 seed genomes: the 2³ method triples, parameterised by the run's merge operators.

The mapping from each operator key to gene values (and from there to mergekit parameters) is documented on
`evoforge.config.MergeOperators`; this module is its implementation.
"""

from __future__ import annotations

import itertools
import zlib

from evoforge.config import MergeOperators
from evoforge.genome.genes import CrossoverGene, Genome, GenomeSpace, InterpGene, Step, StructureGene, simplex

SEED_LABELS = tuple(
    "-".join(t) for t in itertools.product(("linear", "slerp"), ("ties", "dare"), ("frankenmerge", "dfs"))
)


def _anchor_split(x: float, model_weights: list[float]) -> list[float]:
    """Anchor gets 1 − x, the other models share x in proportion to their configured weights."""
    others = model_weights[1:]
    total = sum(others)
    return [1.0 - x] + [x * w / total for w in others]


def _columns(values: list[float], groups: int) -> tuple[tuple[float, ...], ...]:
    return tuple((v,) * groups for v in values)


def _source(entry: int | str, models: tuple[str, ...]) -> str:
    if isinstance(entry, str):
        return entry
    return "crossover" if entry == 0 else models[entry - 1]


def frankenmerge_path(space: GenomeSpace, sources: list[int | str]) -> tuple[Step, ...]:
    """Depth cut into len(sources) equal contiguous blocks, block i taken from sources[i]."""
    n_blocks, depth = len(sources), space.num_layers
    return tuple(
        Step(source=_source(sources[min(layer * n_blocks // depth, n_blocks - 1)], space.models), layer=layer)
        for layer in range(depth)
    )


def dfs_path(space: GenomeSpace, ratio: float) -> tuple[Step, ...]:
    """The crossover output's layers in order; round(ratio·depth) evenly spaced steps take the same layer
    from the base models instead (round robin)."""
    depth = space.num_layers
    swaps = round(ratio * depth)
    picked = {round((i + 0.5) * depth / swaps - 0.5) for i in range(swaps)} if swaps else set()
    steps, k = [], 0
    for layer in range(depth):
        source = "crossover"
        if layer in picked:
            source, k = space.models[k % len(space.models)], k + 1
        steps.append(Step(source=source, layer=layer, scale=1.0))
    return tuple(steps)


def seed_genomes(
    space: GenomeSpace, ops: MergeOperators, model_weights: list[float], run_seed: int
) -> dict[str, Genome]:
    """label → genome for the 8 method triples, in the seed document's order."""
    g = space.layer_groups
    share = [w / sum(model_weights) for w in model_weights]
    seeds = {}
    for label in SEED_LABELS:
        interp_m, cross_m, struct_m = label.split("-")
        x = ops.linear_weight if interp_m == "linear" else ops.slerp_t
        threshold = ops.ties_threshold if cross_m == "ties" else ops.dare_threshold
        path = (
            frankenmerge_path(space, list(ops.frankenmerge_layers))
            if struct_m == "frankenmerge"
            else dfs_path(space, ops.dfs_merge_ratio)
        )
        seeds[label] = Genome(
            interp=InterpGene(method=interp_m, weights=simplex(_columns(_anchor_split(x, model_weights), g))),
            crossover=CrossoverGene(
                method=cross_m,
                weights=_columns(share, g),
                density=_columns([1.0 - threshold] * len(share), g),
                lambda_=ops.dare_amplification if cross_m == "dare" else 1.0,
                seed=zlib.crc32(f"{run_seed}:{label}".encode()) % 2**31,
            ),
            structure=StructureGene(method=struct_m, path=path),
        )
    return seeds
