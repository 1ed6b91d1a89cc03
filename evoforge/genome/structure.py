"""Gene 3, structure: the output model's layer path, and its registry of methods.

Every method renders to mergekit's `passthrough` over the crossover output, the interp output and the base
models. A method declares how its seed path is built from the run file, how a mutation edits a path, how the
path becomes slices, and whether its steps carry input scales (`scaled`). Parsing reads any slices into steps;
scaled slices make the path a scaled method's.

DFS input scales are rendered in weight space: scaling the input of path step k by w_k equals scaling
`o_proj` and `down_proj` of the output's layer k by 1 / (w_0 · … · w_k) in a pre-norm model (the final norm
is scale-invariant), so each step's slice carries that product as a filtered `scale`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, Field

from evoforge.config import MergeOperators
from evoforge.genome.base import Gene, GenomeSpace, clip, q
from evoforge.genome.mergekit_yaml import CROSSOVER_STAGE, fail, model_name, model_ref, num, scalar
from evoforge.genome.methods import Method, Registry, vote

SCALE_RANGE = (0.5, 2.0)
SCALED_MODULES = ("o_proj", "down_proj")


@dataclass(frozen=True, kw_only=True)
class StructureMethod(Method):
    scaled: bool
    """Its steps carry input scales (one slice per step); an unscaled method's steps all have scale 1."""
    seed: Callable[[GenomeSpace, MergeOperators], tuple[Step, ...]]
    """Its seed path, from the run's `merge_operators`."""
    edit: Callable[[list[Step], GenomeSpace, random.Random, float], list[Step]]
    """One mutation edit of a path (`float`: the mutation rate)."""
    slices: Callable[[Sequence[Step], GenomeSpace], list[str]]
    """The path as `slices:` entries."""


METHODS: Registry[StructureMethod] = Registry("structure")


class Step(Gene):
    """One layer of the output model: `layer` of `source`, its input multiplied by `scale` (DFS)."""

    source: str
    layer: Annotated[int, Field(ge=0)]
    scale: Annotated[float, Field(gt=0.0), AfterValidator(q)] = 1.0


class StructureGene(Gene):
    """Stage 3: the output's layer path. frankenmerge renders runs of consecutive layers as block slices with
    unit scales; dfs renders one slice per step with its scale (Sakana's data-flow-space merge)."""

    method: Annotated[str, AfterValidator(METHODS.require)]
    path: Annotated[tuple[Step, ...], Field(min_length=1)]

    def check(self, space: GenomeSpace) -> None:
        path = self.path
        if not space.min_depth <= len(path) <= space.max_depth:
            raise ValueError(
                f"structure path has {len(path)} layers; allowed {space.min_depth}..{space.max_depth}"
            )
        for i, step in enumerate(path):
            if step.source not in space.sources:
                raise ValueError(
                    f"structure.path[{i}].source {step.source!r} is not one of {list(space.sources)}"
                )
            if step.layer >= space.num_layers:
                raise ValueError(f"structure.path[{i}].layer {step.layer} ≥ {space.num_layers} layers")
        if not METHODS[self.method].scaled and any(s.scale != 1.0 for s in path):
            scaled = METHODS.listing([m.name for m in METHODS if m.scaled])
            raise ValueError(f"a {self.method} path has unit scales (scales belong to {scaled})")


# ------------------------------------------------------------------------------------------- frankenmerge


def _source(entry: int | str, models: tuple[str, ...]) -> str:
    if isinstance(entry, str):
        return entry
    return "crossover" if entry == 0 else models[entry - 1]


def _frankenmerge_seed(space: GenomeSpace, ops: MergeOperators) -> tuple[Step, ...]:
    """Depth cut into len(frankenmerge_layers) equal contiguous blocks, block i from its entry i."""
    sources, depth = list(ops.frankenmerge_layers), space.num_layers
    n_blocks = len(sources)
    return tuple(
        Step(source=_source(sources[min(layer * n_blocks // depth, n_blocks - 1)], space.models), layer=layer)
        for layer in range(depth)
    )


def _blocks(path: Sequence[Step]) -> list[tuple[int, int]]:
    """[start, end) index ranges of runs with one source (a frankenmerge's blocks)."""
    bounds, start = [], 0
    for i in range(1, len(path) + 1):
        if i == len(path) or path[i].source != path[start].source:
            bounds.append((start, i))
            start = i
    return bounds


def _edit_frankenmerge(path: list[Step], space: GenomeSpace, rng: random.Random, rate: float) -> list[Step]:
    """Move one block boundary by a layer, or give a run of up to rate × depth layers (at least one) inside
    one block a new source. Every seed's path is one block: re-sourcing whole blocks would swap the whole
    model for a base model or the interp output (a mutant at 0.15 of its parent's fitness on the demo)."""
    blocks = _blocks(path)
    if len(blocks) > 1 and rng.random() < 0.5:
        b = rng.randrange(len(blocks) - 1)
        (s0, e0), (s1, e1) = blocks[b], blocks[b + 1]
        if rng.random() < 0.5 and e1 - s1 > 1:  # grow the left block into the right one
            path[s1] = path[s1].model_copy(update={"source": path[s0].source})
        elif e0 - s0 > 1:  # grow the right block into the left one
            path[e0 - 1] = path[e0 - 1].model_copy(update={"source": path[s1].source})
        return path
    start, end = rng.choice(blocks)
    length = rng.randint(1, max(1, min(end - start, round(rate * len(path)))))
    first = rng.randint(start, end - length)
    new = rng.choice([s for s in space.sources if s != path[start].source])
    for i in range(first, first + length):
        path[i] = path[i].model_copy(update={"source": new})
    return path


def _runs(path: Sequence[Step]) -> list[tuple[str, int, int]]:
    """Consecutive layers of one source merge into one block slice [start, end)."""
    runs: list[tuple[str, int, int]] = []
    for step in path:
        if runs and runs[-1][0] == step.source and runs[-1][2] == step.layer:
            runs[-1] = (step.source, runs[-1][1], step.layer + 1)
        else:
            runs.append((step.source, step.layer, step.layer + 1))
    return runs


def _frankenmerge_slices(path: Sequence[Step], space: GenomeSpace) -> list[str]:
    return [
        f"  - sources: [{{model: {scalar(model_ref(source, space))}, layer_range: [{start}, {end}]}}]"
        for source, start, end in _runs(path)
    ]


# -------------------------------------------------------------------------------------------------- dfs


def _dfs_seed(space: GenomeSpace, ops: MergeOperators) -> tuple[Step, ...]:
    """The crossover output's layers in order; round(dfs_merge_ratio·depth) evenly spaced steps take the same
    layer from the base models instead (round robin). Where that is the frankenmerge seed's path (e.g. ratio 0
    and frankenmerge_layers all 0), one more step is swapped: the two seeds are always different models."""
    depth, frankenmerge = space.num_layers, _frankenmerge_seed(space, ops)
    swaps = round(ops.dfs_merge_ratio * depth)
    while True:
        picked = {round((i + 0.5) * depth / swaps - 0.5) for i in range(swaps)} if swaps else set()
        steps, k = [], 0
        for layer in range(depth):
            source = "crossover"
            if layer in picked:
                source, k = space.models[k % len(space.models)], k + 1
            steps.append(Step(source=source, layer=layer, scale=1.0))
        if tuple(steps) != frankenmerge or swaps >= depth:
            return tuple(steps)
        swaps += 1


def protected_ends(num_layers: int) -> int:
    """How many steps at each end of a data-flow path no edit repeats, drops or shifts: a tenth of the depth
    (at least one). The first layers and the last one are the ones a model cannot do without (Gromov et al.,
    "The Unreasonable Ineffectiveness of the Deeper Layers", arXiv:2403.17887; on the demo, a mutant that
    dropped layer 1 of 30 kept 3 % of its parent's fitness); re-sourcing or rescaling them stays allowed."""
    return max(1, round(num_layers / 10))


SOFT_EDITS = ("scale", "source")
DEPTH_EDITS = ("repeat", "drop", "shift")
DFS_EDITS = SOFT_EDITS + DEPTH_EDITS


def edit_dfs(
    path: list[Step], space: GenomeSpace, rng: random.Random, rate: float, op: str | None = None
) -> list[Step]:
    """One data-flow edit, `op` of DFS_EDITS or drawn: rescale, re-source, repeat, drop or shift a step (the
    last three never at either protected end). A drawn edit is a depth edit (repeat, drop, shift) with
    probability `rate`, else a soft one: on the demo trio one depth edit kept a median 0.65-0.89 of the
    parent's fitness (one shift 0.09), one soft edit 0.99-1.00 (recipes/demo/SEARCH.md), so the layer order
    changes rarely and the rate sets how rarely."""
    i = rng.randrange(len(path))
    op = op or rng.choice(DEPTH_EDITS if rng.random() < rate else SOFT_EDITS)
    ends = protected_ends(space.num_layers)
    if op in ("repeat", "drop", "shift"):
        if len(path) <= 2 * ends:
            op = "scale"
        else:
            i = rng.randrange(ends, len(path) - ends)
    step = path[i]
    if op == "scale":
        path[i] = step.model_copy(
            update={"scale": clip(step.scale * math.exp(rng.gauss(0.0, rate)), SCALE_RANGE)}
        )
    elif op == "source":
        path[i] = step.model_copy(
            update={"source": rng.choice([s for s in space.sources if s != step.source])}
        )
    elif op == "repeat" and len(path) < space.max_depth:
        path.insert(i + 1, step)
    elif op == "drop" and len(path) > space.min_depth:
        del path[i]
    else:
        layer = min(max(step.layer + rng.choice((-1, 1)), 0), space.num_layers - 1)
        path[i] = step.model_copy(update={"layer": layer})
    return path


def _dfs_slices(path: Sequence[Step], space: GenomeSpace) -> list[str]:
    lines, product = [], 1.0
    for step in path:
        product *= step.scale
        scale = ", ".join(f"{{filter: {m}, value: {num(1.0 / product)}}}" for m in SCALED_MODULES)
        lines.append(
            f"  - sources: [{{model: {scalar(model_ref(step.source, space))}, layer_range: [{step.layer}, "
            f"{step.layer + 1}], parameters: {{scale: [{scale}, {{value: 1.0}}]}}}}]  # input × {step.scale!r}"
        )
    return lines


METHODS.register(
    StructureMethod(
        name="frankenmerge",
        mergekit=("passthrough",),
        reference_url="https://arxiv.org/abs/2403.13257",
        scaled=False,
        seed=_frankenmerge_seed,
        edit=_edit_frankenmerge,
        slices=_frankenmerge_slices,
    )
)
METHODS.register(
    StructureMethod(
        name="dfs",
        mergekit=("passthrough",),
        reference_url="https://arxiv.org/abs/2403.13187",
        scaled=True,
        seed=_dfs_seed,
        edit=edit_dfs,
        slices=_dfs_slices,
    )
)

# ------------------------------------------------------------------------------------------------ the gene


def seed(method: str, space: GenomeSpace, ops: MergeOperators) -> StructureGene:
    return StructureGene(method=method, path=METHODS[method].seed(space, ops))


def _rebuild(path: Sequence[Step], method: str) -> StructureGene:
    """Re-validate steps (quantizing scales); an unscaled method drops the scales."""
    scaled = METHODS[method].scaled
    steps = tuple(Step(source=s.source, layer=s.layer, scale=s.scale if scaled else 1.0) for s in path)
    return StructureGene(method=method, path=steps)


def edit_count(depth: int, rng: random.Random, rate: float) -> int:
    """How many path edits a mutation makes: each of the `depth` steps is edited with probability `rate`, so
    rate × depth on average and none at all with probability (1 − rate)^depth (layer edits are what break a
    small model most; most mutants at a low rate keep their parent's path)."""
    return sum(rng.random() < rate for _ in range(depth))


def mutate(gene: StructureGene, space: GenomeSpace, rng: random.Random, rate: float) -> StructureGene:
    """Maybe another method, then `edit_count` of the (new) method's path edits."""
    method = METHODS.flip(gene.method, rng, rate)
    edit = METHODS[method].edit
    path = list(gene.path)
    for _ in range(edit_count(len(path), rng, rate)):
        path = edit(path, space, rng, rate)
    return _rebuild(path, method)


def blend(
    genes: Sequence[StructureGene], order: Sequence[int], space: GenomeSpace, rng: random.Random
) -> StructureGene:
    """Majority method; the fittest parent's path (`order[0]`), one-point-crossed with the second's."""
    method = vote([g.method for g in genes], order)
    a, b = genes[order[0]].path, genes[order[1]].path
    cut = rng.randint(1, len(a) - 1) if len(a) > 1 else 1
    path = list(a[:cut]) + list(b[round(cut * len(b) / len(a)) :])
    path = path[: space.max_depth]
    if len(path) < space.min_depth:
        path = list(a)
    return _rebuild(path, method)


def render(gene: StructureGene, space: GenomeSpace) -> list[str]:
    """The final (unnamed) stage as YAML lines."""
    entry = METHODS[gene.method]
    return [
        f"# gene 3, structure = {gene.method}: the output's layer path ({len(gene.path)} layers)",
        f"merge_method: {entry.mergekit[0]}",
        f"base_model: {CROSSOVER_STAGE}",
        "slices:",
        *entry.slices(gene.path, space),
        f"dtype: {space.dtype}",
    ]


def parse(doc: dict, space: GenomeSpace, source: str) -> StructureGene:
    """The gene the final stage describes: block slices expand to unit-scale steps, scaled one-layer slices
    to steps with the input scale their weight scales stand for."""
    if doc.get("merge_method") not in METHODS.mergekit_names() or not isinstance(doc.get("slices"), list):
        known = METHODS.listing(METHODS.mergekit_names())
        raise fail(source, "final stage", f"expected merge_method: {known} with slices")
    steps: list[Step] = []
    scaled = False
    previous = 1.0
    for i, sl in enumerate(doc["slices"]):
        field = f"final.slices[{i}]"
        srcs = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(srcs, list) or len(srcs) != 1 or not isinstance(srcs[0], dict):
            raise fail(source, field, "expected exactly one source per slice")
        src = srcs[0]
        name = model_name(src.get("model"), space, source, f"{field}.sources[0].model")
        lr = src.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
            raise fail(source, f"{field}.sources[0].layer_range", f"expected [start, end], got {lr!r}")
        if not 0 <= lr[0] < lr[1] <= space.num_layers:
            raise fail(source, f"{field}.sources[0].layer_range", f"{lr} is outside 0..{space.num_layers}")
        scale = (src.get("parameters") or {}).get("scale")
        if scale is None:
            steps += [Step(source=name, layer=layer) for layer in range(lr[0], lr[1])]
            continue
        if lr[1] - lr[0] != 1:
            raise fail(source, field, "a scaled (dfs) slice must hold exactly one layer")
        values = {e.get("filter"): e.get("value") for e in scale} if isinstance(scale, list) else {}
        s = values.get(SCALED_MODULES[0])
        if not isinstance(s, int | float) or s <= 0 or values.get(SCALED_MODULES[1]) != s:
            raise fail(
                source,
                f"{field}.sources[0].parameters.scale",
                "expected equal positive o_proj/down_proj scales",
            )
        scaled = True
        steps.append(Step(source=name, layer=lr[0], scale=previous / s))
        previous = s
    method = next((m.name for m in METHODS if m.scaled == scaled), None)
    if method is None:
        raise fail(
            source, "final.slices", f"no structure method takes {'scaled' if scaled else 'unscaled'} slices"
        )
    return StructureGene(method=method, path=tuple(steps))
