"""Gene method registries: a name is registered once, and a new merge operator is one registry entry."""

from __future__ import annotations

import random

import pytest
from evolution_support import space_of

from evoforge.config import MergeOperators
from evoforge.genome import (
    SEED_LABELS,
    CrossoverGene,
    GenomeSpace,
    crossover,
    interp,
    mutate,
    seed_genomes,
    structure,
)
from evoforge.genome.crossover import CrossoverMethod
from evoforge.merge.disk import validate_recipe
from evoforge.recipe import RecipeError, parse, render

TASK_ARITHMETIC = CrossoverMethod(
    name="task_arithmetic",
    mergekit=("task_arithmetic",),
    reference_url="https://arxiv.org/abs/2212.04089",
    params=("weight",),
)


@pytest.fixture
def with_task_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """task_arithmetic registered as a crossover method for one test; evoforge's own registry afterwards."""
    monkeypatch.setattr(crossover.METHODS, "entries", dict(crossover.METHODS.entries))
    crossover.METHODS.register(TASK_ARITHMETIC)


def test_a_name_registered_twice_is_refused_and_the_first_entry_kept():
    ties = crossover.METHODS["ties"]
    impostor = CrossoverMethod(name="ties", mergekit=("dare_linear",), reference_url="https://example.org")
    with pytest.raises(ValueError, match=r"crossover method 'ties' is already registered \(https://arxiv"):
        crossover.METHODS.register(impostor)
    assert crossover.METHODS["ties"] is ties
    for registry in (interp.METHODS, structure.METHODS):
        with pytest.raises(ValueError, match="already registered"):
            registry.register(next(iter(registry)))
    assert [*interp.METHODS.names(), *crossover.METHODS.names(), *structure.METHODS.names()] == [
        "linear",
        "slerp",
        "ties",
        "dare",
        "frankenmerge",
        "dfs",
    ]


def test_unregistered_methods_are_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match="'della' is not a crossover method; registered: ties or dare"):
        CrossoverGene(method="della", weights=((1.0,),), density=((1.0,),))
    space = GenomeSpace(models=("alpha", "beta"), paths=("/m/alpha", "/m/beta"), num_layers=4)
    text = render(seed_genomes(space, MergeOperators(), [1.0, 1.0], 7)["linear-ties-dfs"], space)
    with pytest.raises(
        RecipeError, match=r"evoforge_crossover\.merge_method: 'della' is not ties or dare_ties"
    ):
        parse(text.replace("merge_method: ties", "merge_method: della"), space, source="edited.yaml")


@pytest.mark.parametrize("ancestor", [False, True])
def test_a_new_crossover_operator_is_one_registry_entry(with_task_arithmetic, qwen_family, ancestor):
    """Seeds, mutation, rendering (a recipe mergekit's schema accepts) and parsing all take it up."""
    space = space_of(qwen_family, ancestor)
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    new = {f"{i}-task_arithmetic-{s}" for i in ("linear", "slerp") for s in ("frankenmerge", "dfs")}
    assert set(seeds) == set(SEED_LABELS) | new
    rng = random.Random(0)
    genome = seeds["slerp-task_arithmetic-dfs"]
    candidates = [genome, *(mutate(genome, space, rng, 0.3) for _ in range(6))]
    kept = [g for g in candidates[1:] if g.crossover.method == "task_arithmetic"]
    assert kept and all(g.crossover.density == ((1.0,),) * 3 for g in kept)  # no density: held at 1
    for g in candidates:
        text = render(g, space)
        documents = validate_recipe(text, source="candidate.yaml")
        if g.crossover.method == "task_arithmetic":
            stage = next(d for d in documents if d.get("name") == "evoforge_crossover")
            assert stage["merge_method"] == "task_arithmetic"
            assert all(set(m["parameters"]) == {"weight"} for m in stage["models"])
        assert parse(text, space) == g
    flips = {mutate(seeds["linear-ties-frankenmerge"], space, rng, 1.0).crossover.method for _ in range(40)}
    assert "task_arithmetic" in flips  # mutation reaches the new method too
