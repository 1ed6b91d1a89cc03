"""Uncertainty of a fitness, and of the difference between two models, by bootstrap over the scored items.

A fitness is a weighted mean of domain means of task means, so its noise comes from which items each task
happens to hold. The bootstrap resamples items with replacement *within each task* (stratified): every
replicate keeps each task's item count and the domain weights, and is aggregated exactly as the fitness is
(`domain_means`, `compute_fitness`). Two models scored on the same items are compared *paired*: both are
resampled with the same indices. Because the fitness is linear in the item scores, that is the bootstrap of
the per-item differences B − A, which is how it is computed; item-level correlation between the models
(an item hard for both) cancels, so the interval is far narrower than two separate SEs would suggest.

Only numpy: the report and the CLI use this without importing lm-eval. A few thousand replicates over a few
hundred items take milliseconds (one index draw per task, vectorised means).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from evoforge.errors import ConfigError

RESAMPLES = 2000
"""Replicates per bootstrap: the SE is then within ~2 % of its limit, the 95 % bounds within ~0.1 SE."""
SEED = 0
"""Fixed, so a report or `evoforge compare` prints the same interval every time."""
LEVEL = 0.95

V = TypeVar("V", float, np.ndarray)
Items = Mapping[str, Sequence[float] | np.ndarray]
"""Task name → per-item scores in document order (`TaskScore.items`)."""


def compute_fitness(domain_scores: Mapping[str, V], weights: Mapping[str, float]) -> V:
    """Σ w_d·score_d / Σ w_d over the weighted domains; domains without a weight are reported, not counted.
    Scores may be floats or arrays of bootstrap replicates."""
    total = sum(weights.values())
    if total <= 0:
        raise ConfigError("evaluation_weights: at least one domain weight must be positive")
    missing = [d for d, w in weights.items() if w > 0 and d not in domain_scores]
    if missing:
        raise ConfigError(f"evaluation_weights.{missing[0]}: no task scores this domain")
    return sum(w * domain_scores[d] for d, w in weights.items() if w > 0) / total


def domain_means(task_scores: Mapping[str, V], task_domains: Mapping[str, Sequence[str]]) -> dict[str, V]:
    """Domain → mean of its tasks' scores, domains sorted by name (a task with two domains counts in both)."""
    members: dict[str, list[V]] = {}
    for task, domains in task_domains.items():
        for domain in domains:
            members.setdefault(domain, []).append(task_scores[task])
    return {d: sum(members[d]) / len(members[d]) for d in sorted(members)}


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap standard error and percentile interval."""

    estimate: float
    se: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """The interval lies wholly above or below 0: a difference this bootstrap calls real."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class Estimates:
    """Per-domain and overall (fitness) intervals of one bootstrap."""

    domains: dict[str, Interval]
    fitness: Interval
    resamples: int
    level: float


def _replicate_means(items: Mapping[str, np.ndarray], resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Task → its mean in each of `resamples` resamples of its items; tasks draw in name order from one
    seeded generator, so the same items give the same replicates."""
    rng = np.random.default_rng(seed)
    out = {}
    for task in sorted(items):
        x = items[task]
        out[task] = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    return out


def _interval(estimate: float, replicates: np.ndarray, level: float) -> Interval:
    low, high = np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(np.std(replicates, ddof=1)), float(low), float(high))


def _as_arrays(items: Items) -> dict[str, np.ndarray]:
    arrays = {}
    for task, values in items.items():
        x = np.asarray(values, dtype=float)
        if x.ndim != 1 or len(x) == 0:
            raise ValueError(f"task {task!r}: expected a non-empty list of per-item scores")
        arrays[task] = x
    return arrays


def bootstrap(
    items: Items,
    task_domains: Mapping[str, Sequence[str]],
    weights: Mapping[str, float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Estimates:
    """Per-domain scores and fitness of per-item scores, each with its stratified bootstrap SE and
    percentile interval. `task_domains` names every task of `items`; `weights` as for the fitness."""
    arrays = _as_arrays(items)
    unknown = sorted(set(arrays) ^ set(task_domains))
    if unknown:
        raise ValueError(f"task {unknown[0]!r}: in only one of the item scores and the task domains")
    reps = _replicate_means(arrays, resamples, seed)
    point = domain_means({t: float(x.mean()) for t, x in arrays.items()}, task_domains)
    rep_domains = domain_means(reps, task_domains)
    return Estimates(
        domains={d: _interval(point[d], rep_domains[d], level) for d in point},
        fitness=_interval(compute_fitness(point, weights), compute_fitness(rep_domains, weights), level),
        resamples=resamples,
        level=level,
    )


def paired_difference(
    a: Items,
    b: Items,
    task_domains: Mapping[str, Sequence[str]],
    weights: Mapping[str, float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Estimates:
    """B − A per domain and in fitness, with paired bootstrap intervals: A and B must be scores of the same
    items (same split, limit and tasks), each task's items resampled with the same indices for both."""
    xa, xb = _as_arrays(a), _as_arrays(b)
    if set(xa) != set(xb):
        task = sorted(set(xa) ^ set(xb))[0]
        raise ValueError(f"task {task!r}: scored for only one of the two models")
    for task in xa:
        if len(xa[task]) != len(xb[task]):
            raise ValueError(
                f"task {task!r}: {len(xa[task])} items against {len(xb[task])}; a paired comparison "
                "needs the same items (same split and limit)"
            )
    return bootstrap({t: xb[t] - xa[t] for t in xa}, task_domains, weights, resamples, seed, level)


@dataclass(frozen=True)
class Comparison:
    """Two models on the same items: each one's scores with its SE, and B − A with paired intervals."""

    a: Estimates
    b: Estimates
    difference: Estimates


def compare(
    a: Items,
    b: Items,
    task_domains: Mapping[str, Sequence[str]],
    weights: Mapping[str, float],
    resamples: int = RESAMPLES,
    seed: int = SEED,
    level: float = LEVEL,
) -> Comparison:
    """`bootstrap` of each model and `paired_difference` B − A, with the same settings."""
    difference = paired_difference(a, b, task_domains, weights, resamples, seed, level)
    return Comparison(
        a=bootstrap(a, task_domains, weights, resamples, seed, level),
        b=bootstrap(b, task_domains, weights, resamples, seed, level),
        difference=difference,
    )
