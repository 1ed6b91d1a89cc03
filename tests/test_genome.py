"""Genome: the 8 seeds, hashing, and variation operators that always yield valid genomes."""

import dataclasses
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evoforge.config import MergeOperators
from evoforge.genome import SEED_LABELS, Genome, GenomeSpace, mutate, recombine, seed_genomes
from evoforge.genome.mergekit_yaml import RecipeError
from evoforge.recipe import parse, render

SPACE = GenomeSpace(
    models=("alpha", "beta", "gamma"), paths=("/m/alpha", "/m/beta", "/m/gamma"), num_layers=8
)
SPACES = [
    SPACE,
    GenomeSpace(models=SPACE.models, paths=SPACE.paths, num_layers=8, layer_groups=3, ancestor="/m/anc"),
    GenomeSpace(models=("alpha", "beta"), paths=("/m/alpha", "/m/beta"), num_layers=5),
]


def seeds(space=SPACE, ops=MergeOperators(), seed=42):
    return seed_genomes(space, ops, [1.0] * len(space.models), seed)


def test_eight_seeds_named_by_their_method_triple():
    s = seeds()
    assert list(s) == list(SEED_LABELS)
    assert SEED_LABELS[0] == "linear-ties-frankenmerge" and SEED_LABELS[-1] == "slerp-dare-dfs"
    assert all(g.label == label for label, g in s.items())
    assert len({g.hash for g in s.values()}) == 8


def test_seed_parameters_follow_merge_operators():
    ops = MergeOperators(
        linear_weight=0.4,
        ties_threshold=0.2,
        dare_threshold=0.3,
        dare_amplification=1.5,
        frankenmerge_layers=[2, 0],
        dfs_merge_ratio=0.25,
    )
    s = seeds(ops=ops)
    lin = s["linear-ties-frankenmerge"]
    assert lin.interp.weights == ((0.6,), (0.2,), (0.2,))
    assert lin.crossover.density == ((0.8,),) * 3 and lin.crossover.lambda_ == 1.0
    dare = s["linear-dare-dfs"].crossover
    assert dare.density == ((0.7,),) * 3 and dare.lambda_ == 1.5
    path = lin.structure.path
    assert [st.source for st in path] == ["beta"] * 4 + ["crossover"] * 4
    dfs = s["linear-ties-dfs"].structure.path
    assert sum(st.source != "crossover" for st in dfs) == 2 and [st.layer for st in dfs] == list(range(8))


def test_hash_is_stable_and_content_based():
    a, b = seeds(), seeds()
    assert [g.hash for g in a.values()] == [g.hash for g in b.values()]
    g = a["slerp-dare-dfs"]
    assert g.model_copy(update={}).hash == g.hash
    assert seeds(seed=43)["slerp-dare-dfs"].hash != g.hash  # other DARE seed, other model


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rate=st.floats(0.01, 0.6),
    space_i=st.integers(0, len(SPACES) - 1),
    generations=st.integers(1, 6),
)
def test_mutants_and_children_stay_valid_and_round_trip(seed, rate, space_i, generations):
    space = SPACES[space_i]
    rng = random.Random(seed)
    pop = list(seeds(space).values())
    for _ in range(generations):
        mutants = [mutate(rng.choice(pop), space, rng, rate) for _ in range(4)]
        parents = rng.sample(pop + mutants, 3)
        children = [recombine(parents, [rng.random() for _ in parents], space, rng)]
        pop = mutants + children
        for g in pop:
            space.check(g)
            assert parse(render(g, space), space) == g


def test_variation_is_a_pure_function_of_the_rng():
    g = seeds()["slerp-ties-dfs"]
    a = [mutate(g, SPACE, random.Random(7), 0.2) for _ in range(3)]
    b = [mutate(g, SPACE, random.Random(7), 0.2) for _ in range(3)]
    assert a == b
    assert all(m.hash != g.hash for m in a)
    p = list(seeds().values())[:3]
    assert recombine(p, [0.5, 0.3, 0.2], SPACE, random.Random(1)) == recombine(
        p, [0.5, 0.3, 0.2], SPACE, random.Random(1)
    )


def test_recombine_takes_fitness_weighted_means_and_majority_methods():
    s = seeds()
    parents = [s["linear-ties-frankenmerge"], s["linear-dare-dfs"], s["slerp-dare-dfs"]]
    child = recombine(parents, [1.0, 0.0, 0.0], SPACE, random.Random(0))
    assert child.interp.method == "linear" and child.crossover.method == "dare"
    assert child.crossover.lambda_ == parents[0].crossover.lambda_  # all weight on the first parent
    even = recombine(parents, [1.0, 1.0, 1.0], SPACE, random.Random(0))
    assert even.crossover.lambda_ == pytest.approx((1.0 + 2.0 + 2.0) / 3, abs=1e-6)


def test_mutation_rate_scales_the_change():
    g = seeds()["linear-ties-dfs"]

    def spread(rate):
        rng = random.Random(3)
        return sum(
            abs(m.crossover.lambda_ - g.crossover.lambda_)
            for m in (mutate(g, SPACE, rng, rate) for _ in range(50))
        )

    assert spread(0.02) < spread(0.3)


def test_tiny_values_render_as_yaml_floats_and_round_trip():
    """`1e-05` is a string to YAML 1.1 (PyYAML); a recipe writes it `1.0e-05`."""
    g = seeds()["linear-ties-dfs"]
    small = ((1e-05,), (0.5,), (0.5,))
    crossover = g.crossover.model_copy(update={"weights": small, "density": ((5e-06,), (1.0,), (1.0,))})
    path = (g.structure.path[0].model_copy(update={"scale": 1e05}), *g.structure.path[1:])
    g = g.model_copy(
        update={"crossover": crossover, "structure": g.structure.model_copy(update={"path": path})}
    )
    text = render(g, SPACE)
    assert "weight: 1.0e-05, density: 5.0e-06" in text and "value: 1.0e-05" in text
    assert parse(text, SPACE) == g


def interp_entry(weight: str, density: str) -> str:
    """The crossover stage's `evoforge_interp` entry over 3 layer groups (SPACES[1])."""
    return f"  - model: evoforge_interp  # interp\n    parameters: {{weight: [{weight}], density: [{density}]}}\n"


def test_with_an_ancestor_the_interp_output_is_one_of_the_crossovers_task_vectors():
    space = SPACES[1]
    s = seeds(space, MergeOperators(ties_threshold=0.2))
    ties = s["linear-ties-frankenmerge"].crossover
    assert ties.interp_weight == (0.333333,) * 3 and ties.interp_density == (0.8,) * 3
    text = render(s["slerp-ties-dfs"], space)
    assert interp_entry("0.333333, 0.333333, 0.333333", "0.8, 0.8, 0.8") in text
    assert all(not g.crossover.interp_weight for g in seeds().values())  # no ancestor: interp is the base


def test_a_recipe_or_genome_from_before_the_interp_entry_stays_the_same_model():
    """Without the entry, the crossover is what it was: the genome renders the recipe it came from, and its
    JSON (a checkpoint's) loads with the hash the run recorded."""
    space = SPACES[1]
    new = seeds(space)["linear-dare-dfs"]
    old_text = render(new, space).replace(interp_entry("0.333333, 0.333333, 0.333333", "0.9, 0.9, 0.9"), "")
    old = parse(old_text, space, source="old.yaml")
    assert old.crossover.interp_weight == ()
    assert render(old, space).split("\n---\n", 1)[1] == old_text.split("\n---\n", 1)[1]  # header: hash
    dumped = old.model_dump(mode="json")
    assert "interp_weight" not in dumped["crossover"] and "interp_weight" in new.model_dump()["crossover"]
    assert Genome.model_validate(dumped).hash == old.hash
    child = recombine([old, new, new], [1.0, 1.0, 0.0], space, random.Random(0))
    assert child.crossover.interp_weight == pytest.approx((0.333333 / 2,) * 3, abs=1e-6)  # old: weight 0
    assert child.crossover.interp_density == (0.95,) * 3


def test_an_interp_entry_in_the_crossover_without_an_ancestor_names_file_and_field():
    text = render(seeds(SPACES[1])["linear-ties-dfs"], SPACES[1])
    text = text.replace("base_model: /m/anc", "base_model: evoforge_interp")
    with pytest.raises(
        RecipeError, match=r"^bad.yaml: evoforge_crossover.models: evoforge_interp is the base"
    ):
        parse(text, dataclasses.replace(SPACES[1], ancestor=None), source="bad.yaml")


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("lambda: 2.0", "lambda: .inf", "evoforge_crossover.parameters.lambda"),
        ("weight: 0.25}", "weight: .nan}", "evoforge_interp.models.1.parameters.weight"),
        (
            "down_proj, value: 1.0}",
            "down_proj, value: -.inf}",
            "final.slices.0.sources.0.parameters.scale.1.value",
        ),
    ],
)
def test_a_non_finite_number_in_an_evoforge_recipe_names_file_and_field(old, new, field):
    """A hand-edited candidate recipe with NaN/inf once parsed into a genome that merges to all-NaN tensors."""
    text = render(seeds()["linear-dare-dfs"], SPACE)
    assert old in text
    with pytest.raises(RecipeError, match=rf"^edited.yaml: {field}: not a finite number$"):
        parse(text.replace(old, new, 1), SPACE, source="edited.yaml")
