"""The bootstrap behind every printed comparison: known cases, fixed seed, stratification, pairing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evoforge.evaluate.stats import Interval, bootstrap, compute_fitness, domain_means, paired_difference

DOMAINS = {"arith": ["math"], "arith_fr": ["math", "multilingual"], "words": ["multilingual"]}
WEIGHTS = {"math": 1.0, "multilingual": 3.0}


def _bernoulli(p: float, n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def _items(seed: int = 1) -> dict[str, np.ndarray]:
    return {
        "arith": _bernoulli(0.3, 40, seed),
        "arith_fr": _bernoulli(0.5, 25, seed + 1),
        "words": _bernoulli(0.8, 60, seed + 2),
    }


def test_point_estimates_aggregate_as_the_fitness_does() -> None:
    items = _items()
    est = bootstrap(items, DOMAINS, WEIGHTS)
    means = {t: x.mean() for t, x in items.items()}
    math_ = (means["arith"] + means["arith_fr"]) / 2
    multi = (means["arith_fr"] + means["words"]) / 2
    assert est.domains["math"].estimate == pytest.approx(math_)
    assert est.domains["multilingual"].estimate == pytest.approx(multi)
    assert est.fitness.estimate == pytest.approx((math_ + 3 * multi) / 4)
    for iv in [est.fitness, *est.domains.values()]:
        assert iv.low <= iv.estimate <= iv.high and iv.se > 0


def test_se_of_a_bernoulli_mean_is_the_binomial_se() -> None:
    n, p = 400, 0.3
    x = _bernoulli(p, n, 7)
    est = bootstrap({"t": x}, {"t": ["d"]}, {"d": 1.0}, resamples=8000)
    phat = x.mean()
    assert est.fitness.se == pytest.approx(math.sqrt(phat * (1 - phat) / n), rel=0.05)
    # the percentile interval of a mean of 400 items is close to the normal one
    assert est.fitness.high - est.fitness.low == pytest.approx(2 * 1.96 * est.fitness.se, rel=0.1)


def test_resampling_is_stratified_by_task_and_keeps_the_weights() -> None:
    """Independent tasks: Var(fitness) = Σ (w_t / Σw)² Var(task mean), with each task's own item count."""
    items = {"a": _bernoulli(0.5, 30, 1), "b": _bernoulli(0.2, 300, 2)}
    est = bootstrap(items, {"a": ["x"], "b": ["y"]}, {"x": 1.0, "y": 3.0}, resamples=8000)
    var = {t: x.mean() * (1 - x.mean()) / len(x) for t, x in items.items()}
    expected = math.sqrt((1 / 4) ** 2 * var["a"] + (3 / 4) ** 2 * var["b"])
    assert est.fitness.se == pytest.approx(expected, rel=0.05)
    assert est.domains["x"].se == pytest.approx(math.sqrt(var["a"]), rel=0.05)


def test_fixed_seed_gives_the_same_interval() -> None:
    items = _items()
    assert bootstrap(items, DOMAINS, WEIGHTS) == bootstrap(items, DOMAINS, WEIGHTS)
    assert bootstrap(items, DOMAINS, WEIGHTS, seed=1) != bootstrap(items, DOMAINS, WEIGHTS, seed=2)


def test_identical_models_differ_by_exactly_zero() -> None:
    items = _items()
    diff = paired_difference(items, items, DOMAINS, WEIGHTS)
    for iv in [diff.fitness, *diff.domains.values()]:
        assert iv == Interval(0.0, 0.0, 0.0, 0.0)
        assert not iv.excludes_zero


def test_a_constant_shift_is_recovered_with_no_spread() -> None:
    a = {t: x * 0.5 for t, x in _items().items()}
    b = {t: x + 0.1 for t, x in a.items()}
    diff = paired_difference(a, b, DOMAINS, WEIGHTS)
    for iv in [diff.fitness, *diff.domains.values()]:
        assert iv.estimate == pytest.approx(0.1)
        assert iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1) and iv.se < 1e-12
        assert iv.excludes_zero
    assert paired_difference(b, a, DOMAINS, WEIGHTS).fitness.estimate == pytest.approx(-0.1)


def test_pairing_cancels_what_both_models_share() -> None:
    """B solves every item A solves plus 6 % more: a small gain a paired interval resolves and two separate
    SEs (sqrt(se_a² + se_b²)) would bury."""
    a = {"t": _bernoulli(0.5, 200, 3)}
    extra = _bernoulli(0.12, 200, 4)
    b = {"t": np.maximum(a["t"], extra)}
    gain = b["t"].mean() - a["t"].mean()
    diff = paired_difference(a, b, {"t": ["d"]}, {"d": 1.0})
    assert diff.fitness.estimate == pytest.approx(gain) and gain > 0
    assert diff.fitness.excludes_zero
    se_a = bootstrap(a, {"t": ["d"]}, {"d": 1.0}).fitness.se
    se_b = bootstrap(b, {"t": ["d"]}, {"d": 1.0}).fitness.se
    assert diff.fitness.se < 0.5 * math.sqrt(se_a**2 + se_b**2)
    assert gain < 1.96 * math.sqrt(se_a**2 + se_b**2)  # unpaired, the same gain would not be resolved


def test_models_scored_on_different_items_are_refused() -> None:
    a = _items()
    b = dict(a, words=a["words"][:-1])
    with pytest.raises(ValueError, match="'words': 60 items against 59"):
        paired_difference(a, b, DOMAINS, WEIGHTS)
    with pytest.raises(ValueError, match="'words'"):
        paired_difference(a, {t: x for t, x in a.items() if t != "words"}, DOMAINS, WEIGHTS)


def test_aggregation_works_on_replicate_arrays() -> None:
    reps = {"arith": np.array([0.0, 1.0]), "arith_fr": np.array([1.0, 1.0]), "words": np.array([0.5, 0.0])}
    domains = domain_means(reps, DOMAINS)
    assert list(domains) == ["math", "multilingual"]
    np.testing.assert_allclose(domains["math"], [0.5, 1.0])
    np.testing.assert_allclose(compute_fitness(domains, WEIGHTS), [(0.5 + 3 * 0.75) / 4, (1.0 + 3 * 0.5) / 4])
