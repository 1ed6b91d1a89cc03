"""Variation operators: mutation of one genome and the genome-space merge of three.

Both are pure functions of their inputs and a `random.Random`: the run's single RNG makes the whole
evolution reproducible, and its state is what a checkpoint saves. Children are always valid in their space.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from evoforge.genome.genes import (
    CrossoverGene,
    Genome,
    GenomeSpace,
    InterpGene,
    Matrix,
    Step,
    StructureGene,
    simplex,
)

SCALE_RANGE = (0.5, 2.0)
DENSITY_RANGE = (0.05, 1.0)
WEIGHT_RANGE = (0.0, 2.0)
LAMBDA_RANGE = (0.1, 3.0)


def _clip(x: float, lo_hi: tuple[float, float]) -> float:
    return min(max(x, lo_hi[0]), lo_hi[1])


def _jitter(m: Matrix, rng: random.Random, sigma: float, lo_hi: tuple[float, float]) -> Matrix:
    return tuple(tuple(_clip(v + rng.gauss(0.0, sigma), lo_hi) for v in row) for row in m)


def _flip(method: str, options: tuple[str, str], rng: random.Random, rate: float) -> str:
    return (options[1] if method == options[0] else options[0]) if rng.random() < rate else method


def _blocks(path: Sequence[Step]) -> list[tuple[int, int]]:
    """[start, end) index ranges of runs with one source (a frankenmerge's blocks)."""
    bounds, start = [], 0
    for i in range(1, len(path) + 1):
        if i == len(path) or path[i].source != path[start].source:
            bounds.append((start, i))
            start = i
    return bounds


def _edit_frankenmerge(path: list[Step], space: GenomeSpace, rng: random.Random) -> list[Step]:
    """Give one block a new source, or move one block boundary by a layer."""
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
    new = rng.choice([s for s in space.sources if s != path[start].source])
    for i in range(start, end):
        path[i] = path[i].model_copy(update={"source": new})
    return path


def _edit_dfs(path: list[Step], space: GenomeSpace, rng: random.Random, rate: float) -> list[Step]:
    """One data-flow edit: rescale, re-source, repeat, drop or shift a step."""
    i = rng.randrange(len(path))
    op = rng.choice(("scale", "source", "repeat", "drop", "shift"))
    step = path[i]
    if op == "scale":
        path[i] = step.model_copy(
            update={"scale": _clip(step.scale * math.exp(rng.gauss(0.0, rate)), SCALE_RANGE)}
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


def _rebuild(path: Sequence[Step], method: str) -> tuple[Step, ...]:
    """Re-validate steps (quantizing scales); a frankenmerge drops DFS scales."""
    return tuple(
        Step(source=s.source, layer=s.layer, scale=1.0 if method == "frankenmerge" else s.scale) for s in path
    )


def _mutate_once(genome: Genome, space: GenomeSpace, rng: random.Random, rate: float) -> Genome:
    interp = InterpGene(
        method=_flip(genome.interp.method, ("linear", "slerp"), rng, rate),
        weights=simplex(_jitter(genome.interp.weights, rng, rate, WEIGHT_RANGE)),
    )
    cross = genome.crossover
    crossover = CrossoverGene(
        method=_flip(cross.method, ("ties", "dare"), rng, rate),
        weights=_jitter(cross.weights, rng, rate, WEIGHT_RANGE),
        density=_jitter(cross.density, rng, rate, DENSITY_RANGE),
        lambda_=_clip(cross.lambda_ + rng.gauss(0.0, rate), LAMBDA_RANGE),
        seed=cross.seed,
    )
    method = _flip(genome.structure.method, ("frankenmerge", "dfs"), rng, rate)
    path = list(genome.structure.path)
    for _ in range(max(1, round(rate * len(path)))):
        path = (
            _edit_frankenmerge(path, space, rng)
            if method == "frankenmerge"
            else _edit_dfs(path, space, rng, rate)
        )
    return Genome(
        interp=interp,
        crossover=crossover,
        structure=StructureGene(method=method, path=_rebuild(path, method)),
    )


def mutate(genome: Genome, space: GenomeSpace, rng: random.Random, rate: float) -> Genome:
    """A mutant that differs from its parent. `rate` is both the σ of the Gaussian noise on every continuous
    parameter and the probability of flipping each gene's method; the layer path gets
    max(1, round(rate × depth)) block (frankenmerge) or step (dfs) edits."""
    for _ in range(32):
        child = _mutate_once(genome, space, rng, rate)
        if child.hash != genome.hash:
            return child
    return child


def _weighted(mats: Sequence[Matrix], w: Sequence[float]) -> Matrix:
    return tuple(
        tuple(sum(wk * m[i][j] for wk, m in zip(w, mats)) for j in range(len(mats[0][0])))
        for i in range(len(mats[0]))
    )


def _vote(values: Sequence[str], order: Sequence[int]) -> str:
    """Majority vote; a tie goes to the fittest parent's value."""
    counts = Counter(values)
    best = max(counts.values())
    return next(values[k] for k in order if counts[values[k]] == best)


def recombine(
    parents: Sequence[Genome], weights: Sequence[float], space: GenomeSpace, rng: random.Random
) -> Genome:
    """Merge genomes in genome space: continuous genes → weighted mean (weights ∝ the given parent weights,
    e.g. fitness), methods → majority vote, layer path → the fittest parent's, one-point-crossed with the
    second fittest's. Every recipe stays self-contained over the base models."""
    total = sum(max(w, 0.0) for w in weights)
    w = [max(x, 0.0) / total for x in weights] if total > 0 else [1.0 / len(parents)] * len(parents)
    order = sorted(range(len(parents)), key=lambda k: -w[k])
    first, second = parents[order[0]], parents[order[1]]
    interp = InterpGene(
        method=_vote([p.interp.method for p in parents], order),
        weights=simplex(_weighted([p.interp.weights for p in parents], w)),
    )
    crossover = CrossoverGene(
        method=_vote([p.crossover.method for p in parents], order),
        weights=_weighted([p.crossover.weights for p in parents], w),
        density=tuple(
            tuple(_clip(v, DENSITY_RANGE) for v in row)
            for row in _weighted([p.crossover.density for p in parents], w)
        ),
        lambda_=sum(wk * p.crossover.lambda_ for wk, p in zip(w, parents)),
        seed=first.crossover.seed,
    )
    method = _vote([p.structure.method for p in parents], order)
    a, b = first.structure.path, second.structure.path
    cut = rng.randint(1, len(a) - 1) if len(a) > 1 else 1
    path = list(a[:cut]) + list(b[round(cut * len(b) / len(a)) :])
    path = path[: space.max_depth]
    if len(path) < space.min_depth:
        path = list(a)
    return Genome(
        interp=interp,
        crossover=crossover,
        structure=StructureGene(method=method, path=_rebuild(path, method)),
    )
