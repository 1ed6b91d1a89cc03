"""Search strategies without models: the registry, ask/tell on a synthetic objective, the GA's elites and
mutation strength, and the runner's checkpointed strategy state (a run interrupted anywhere resumes to the
uninterrupted run's records) with a synthetic evaluator."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from statistics import fmean
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from evoforge.cli import app
from evoforge.config import EvolutionConfig
from evoforge.evolve import checkpoint as ckpt
from evoforge.evolve import strategies
from evoforge.evolve.loop import Evolution, Hooks
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, Scores, parent_ratios, read_records
from evoforge.evolve.run_dir import RunDir
from evoforge.evolve.strategies import Proposal
from evoforge.evolve.strategies.base import asks_ahead
from evoforge.evolve.strategies.continuous import Box
from evoforge.genome import Genome, GenomeSpace, mutate, seed_genomes, structure
from evoforge.genome.structure import edit_count
from evoforge.recipe import parse

SPACE = GenomeSpace(models=("alpha", "beta", "gamma"), paths=("/m/a", "/m/b", "/m/c"), num_layers=6)
NAMES = ("ga", "ga-async", "cmaes", "cmaes-async", "random")


def config(strategy: str, **extra) -> EvolutionConfig:
    return EvolutionConfig(
        base_models=[{"name": n, "path": f"/m/{n}"} for n in SPACE.models],
        search={"strategy": strategy},
        **extra,
    )


def objective(genome: Genome) -> float:
    """A smooth optimum inside the continuous space: weights 0.7, λ 1.3, the anchor's interp weight 0.2."""
    c = genome.crossover
    d = sum((v - 0.7) ** 2 for row in c.weights for v in row) + (c.lambda_ - 1.3) ** 2
    d += sum((v - 0.2) ** 2 for v in genome.interp.weights[0])
    return 1.0 / (1.0 + d)


def best_after(strategy: str, rounds: int, seed: int) -> float:
    s = strategies.make(config(strategy), SPACE, random.Random(seed))
    best = 0.0
    for _ in range(rounds):
        proposals = s.ask()
        fitness = [objective(p.genome) for p in proposals]
        best = max(best, *fitness)
        s.tell(list(zip(proposals, fitness)))
    return best


def test_registry_refuses_a_second_strategy_of_the_same_name():
    class Again:
        name: ClassVar[str] = "ga"

    with pytest.raises(ValueError, match="'ga' is registered twice"):
        strategies.register(Again)
    assert set(NAMES) <= set(strategies.STRATEGIES)


def test_cmaes_and_the_gas_beat_random_search_on_a_synthetic_objective():
    seeds = range(3)
    results = {name: fmean(best_after(name, 10, s) for s in seeds) for name in NAMES}
    assert all(results[name] > results["random"] for name in ("cmaes", "cmaes-async", "ga", "ga-async")), (
        results
    )
    assert results["cmaes"] > best_after("random", 1, 0)  # better than the best seed


@pytest.mark.parametrize("strategy", ["cmaes", "cmaes-async"])
def test_cmaes_samples_from_the_run_seed_whatever_numpy_holds(strategy):
    """Once every run seed sampled the same points: pycma ignores its `seed` option with a custom sampler, and
    numpy's global state was the same in every run (lm-eval seeds it). Run seeds 7 and 42 were one run."""
    import numpy as np

    def first_round(seed: int, numpy_seed: int) -> list[str]:
        np.random.seed(numpy_seed)
        s = strategies.make(config(strategy), SPACE, random.Random(seed))
        s.tell([(p, objective(p.genome)) for p in s.ask()])
        return [p.genome.hash for p in s.ask()]

    assert first_round(7, 1234) == first_round(7, 0)
    assert set(first_round(7, 1234)).isdisjoint(first_round(42, 1234))


def test_every_strategy_starts_with_the_seeds_and_then_asks_population_size_new_genomes():
    for name in NAMES:
        s = strategies.make(config(name), SPACE, random.Random(0))
        seeds = s.ask()
        assert [p.operator for p in seeds] == ["seed"] * 8
        s.tell([(p, objective(p.genome)) for p in seeds])
        fresh = [p for p in s.ask() if p.operator != "elite"]
        assert len(fresh) == 8 and len({p.genome.hash for p in fresh}) == 8, name


@pytest.mark.parametrize("size", [11, 16, 17, 40])
@pytest.mark.parametrize("distinct", [8, 3, 1])
def test_ga_serves_any_population_size_from_few_distinct_genomes(size, distinct):
    """Once a ZeroDivisionError after round 0 (size >= 11 with fewer distinct seeds than the children need):
    the best genomes fill the parent pool as often as needed."""
    s = strategies.make(config("ga", population_size=size), SPACE, random.Random(0))
    seeds = s.ask()
    s.tell([(p, objective(p.genome)) for p in seeds[:distinct]])
    for _ in range(3):
        proposals = s.ask()
        assert len([p for p in proposals if p.operator != "elite"]) == size
        s.tell([(p, objective(p.genome)) for p in proposals])


def test_ga_carries_the_two_elites_unchanged():
    s = strategies.make(config("ga"), SPACE, random.Random(0))
    seeds = s.ask()
    fitness = [0.1, 0.9, 0.3, 0.8, 0.2, 0.4, 0.5, None]  # the last one failed
    s.tell(list(zip(seeds, fitness)))
    nxt = s.ask()
    assert [(p.operator, p.genome) for p in nxt[:2]] == [
        ("elite", seeds[1].genome),
        ("elite", seeds[3].genome),
    ]


def test_continuous_space_keeps_methods_and_structure_and_spans_its_bounds():
    incumbent = seed_genomes(SPACE, config("cmaes").merge_operators, [1, 1, 1], 0)["slerp-dare-dfs"]
    box = Box(incumbent)
    assert box.decode(box.encode(incumbent)) == incumbent
    high = box.decode([1.0] * box.dim)
    assert high.structure == incumbent.structure and high.label == incumbent.label
    assert (
        high.crossover.lambda_ == 2.0 and sum(row[0] for row in high.crossover.weights) == 6.0
    )  # extrapolation
    low = box.decode([0.0] * box.dim)
    assert low.crossover.lambda_ == 0.5 and all(row[0] == 0.05 for row in low.crossover.density)
    assert low.interp.weights[0] == (1.0,)  # the anchor takes what the others leave


def test_path_edits_are_rate_times_depth_on_average_and_often_none():
    rng = random.Random(7)
    for rate, depth in ((0.05, 30), (0.15, 30), (0.5, 6)):
        counts = [edit_count(depth, rng, rate) for _ in range(4000)]
        assert fmean(counts) == pytest.approx(rate * depth, rel=0.06)
        assert counts.count(0) / len(counts) == pytest.approx((1 - rate) ** depth, abs=0.03)


def test_mutants_at_a_low_rate_keep_their_parents_methods_and_path():
    parent = seed_genomes(SPACE, config("ga").merge_operators, [1, 1, 1], 0)["linear-ties-dfs"]
    rng = random.Random(3)
    mutants = [mutate(parent, SPACE, rng, 0.02) for _ in range(500)]
    same_path = sum(m.structure == parent.structure for m in mutants) / len(mutants)
    assert same_path == pytest.approx(0.98**6, abs=0.05)  # only layer edits change a dfs path at this rate
    assert sum(m.label == parent.label for m in mutants) / len(mutants) > 0.95  # method flips: rate/4
    assert all(m.hash != parent.hash for m in mutants)


def test_two_of_each_elites_three_mutants_keep_its_layer_plan():
    """A layer-plan edit costs a small model ~12 % (recipes/demo/SEARCH.md): the GA's median mutant must keep
    the plan, so only one mutant in three may edit it, even at a rate that edits most plans."""
    s = strategies.make(config("ga", mutation_rate=0.5), SPACE, random.Random(0))
    seeds = s.ask()
    s.tell([(p, 0.1 * k) for k, p in enumerate(seeds)])
    elites = {p.genome.hash: p.genome for p in seeds[-2:]}
    mutants = [p for p in s.ask() if p.operator == "mutation"]
    assert len(mutants) == 6
    for parent_hash, parent in elites.items():
        kept = [m.genome.structure == parent.structure for m in mutants if m.parents == [parent_hash]]
        assert len(kept) == 3 and kept[:2] == [True, True] and not kept[2]


def test_keep_layers_mutants_change_only_continuous_genes_and_methods():
    parent = seed_genomes(SPACE, config("ga").merge_operators, [1, 1, 1], 0)["slerp-dare-dfs"]
    rng = random.Random(5)
    mutants = [mutate(parent, SPACE, rng, 0.5, keep_layers=True) for _ in range(50)]
    assert all(m.structure == parent.structure and m.hash != parent.hash for m in mutants)


RESUME_ELSEWHERE = """
import json, random, sys
from test_strategies import SPACE, config, objective
from evoforge.evolve import strategies
s = strategies.make(config("cmaes"), SPACE, random.Random(0))
s.load_state_dict(json.loads(open(sys.argv[1]).read()))
s.tell([(None, objective(s.box.decode(x))) for x in s.asked])
print(json.dumps([p.genome.hash for p in s.ask()]))
"""


def test_cmaes_state_resumes_in_another_process(tmp_path):
    """pycma files asked points under Python's salted `hash`: a checkpoint must be told in a new process."""
    s = strategies.make(config("cmaes"), SPACE, random.Random(0))
    for _ in range(2):
        proposals = s.ask()
        s.tell([(p, objective(p.genome)) for p in proposals])
    proposals = s.ask()
    (tmp_path / "state.json").write_text(json.dumps(s.state_dict()))
    s.tell([(p, objective(p.genome)) for p in proposals])
    expected = [p.genome.hash for p in s.ask()]
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", RESUME_ELSEWHERE, str(tmp_path / "state.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[-1]) == expected


class SyntheticEvaluator:
    """Scores a recipe by `objective` of the genome it parses back to; a λ above 1.9 fails."""

    def score_recipe(self, recipe: str, seed: int, split: str) -> tuple[Scores, float, float]:
        genome = parse(recipe, SPACE)
        if genome.crossover.lambda_ > 1.9:
            raise RuntimeError("synthetic failure")
        f = objective(genome) - (0.01 if split == "test" else 0.0)
        return Scores(fitness=f, domains={"math": f}, tasks={"t": f}), 0.0, 0.0


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (it passes the loop's `except Exception`)."""


class KilledAfter(SyntheticEvaluator):
    def __init__(self, n: int) -> None:
        self.left = n

    def score_recipe(self, recipe: str, seed: int, split: str) -> tuple[Scores, float, float]:
        if self.left == 0:
            raise Killed
        self.left -= 1
        return super().score_recipe(recipe, seed, split)


def run(cfg: EvolutionConfig, evaluator, resume: bool) -> None:
    run_dir = RunDir(cfg.run_dir())
    run_dir.root.mkdir(parents=True, exist_ok=True)
    evolution = Evolution(cfg, SPACE, run_dir, evaluator, Hooks())
    latest = run_dir.latest_checkpoint() if resume else None
    state = ckpt.load(latest, cfg) if latest else evolution.initial_state()
    evolution.run(state)


def trace(cfg: EvolutionConfig) -> tuple[list, list]:
    root = cfg.run_dir()
    evaluations = sorted(
        (r.generation, r.id, r.split, r.operator, r.cached, round(r.fitness, 9), tuple(r.parent_fitness))
        for r in read_records(root / "evaluations.jsonl", EvaluationRecord)
    )
    gens = [(g.best_hash, g.best_fitness) for g in read_records(root / "generations.jsonl", GenerationRecord)]
    return evaluations, gens


@pytest.mark.parametrize("strategy", NAMES)
def test_a_run_interrupted_anywhere_resumes_to_the_uninterrupted_run(strategy, tmp_path):
    straight = config(strategy, max_generations=4, output_dir=str(tmp_path / "straight"))
    run(straight, SyntheticEvaluator(), resume=False)
    cut = config(strategy, max_generations=4, output_dir=str(tmp_path / "cut"))
    for n in (5, 9, 14, 3):  # inside round 0, round 1, round 2, ...
        with pytest.raises(Killed):
            run(cut, KilledAfter(n), resume=n != 5)
    run(cut, SyntheticEvaluator(), resume=True)
    assert trace(cut) == trace(straight)
    records = list(read_records(cut.run_dir() / "evaluations.jsonl", EvaluationRecord))
    fresh = [(r.genome_hash, r.split) for r in records if not r.cached]
    assert len(fresh) == len(set(fresh)), "a finished evaluation was run again"
    rounds = {g: [r for r in records if r.generation == g and r.split == "validation"] for g in range(4)}
    assert all(sum(not r.cached for r in rounds[g]) == 8 for g in rounds)  # 8 evaluations a round
    assert all(len(r.parent_fitness) == len(r.parents) for r in records if r.split == "validation")


@pytest.mark.parametrize("strategy", ["ga-async", "cmaes-async"])
def test_async_strategies_ask_the_same_whether_or_not_the_latest_round_was_told(strategy):
    """Round r is made from rounds 0 … r − 2 only: asked ahead (before round r − 1 is told, as the runner asks
    it for several workers) or after, the same proposals; ga-async's elites are the best of those rounds."""

    def rounds(ahead: bool) -> list[list[Proposal]]:
        s = strategies.make(config(strategy), SPACE, random.Random(3))
        asked = [s.ask()]
        s.tell([(p, objective(p.genome)) for p in asked[0]])
        asked.append(s.ask())
        for r in range(2, 6):
            if ahead:
                assert asks_ahead(s)
                asked.append(s.ask())
            s.tell([(p, objective(p.genome)) for p in asked[r - 1]])
            if not ahead:
                asked.append(s.ask())
        return asked

    ahead, in_turn = rounds(True), rounds(False)
    assert ahead == in_turn
    if strategy == "cmaes-async":  # every round new points of the incumbent's space
        assert all(p.operator == "cmaes" for r in ahead[1:] for p in r)
        assert len({p.genome.hash for r in ahead[1:] for p in r}) == 5 * 8
        return
    seen = [(p.genome.hash, objective(p.genome)) for r in ahead[:3] for p in r]  # what round 4 may see
    best = sorted(dict(seen).items(), key=lambda hf: -hf[1])[:2]
    assert [(p.genome.hash, p.operator) for p in ahead[4][:2]] == [(h, "elite") for h, _ in best]


def test_elites_are_recorded_cached_and_mutants_near_their_parents(tmp_path):
    cfg = config("ga", max_generations=3, mutation_rate=0.05, output_dir=str(tmp_path / "run"))
    run(cfg, SyntheticEvaluator(), resume=False)
    records = list(read_records(cfg.run_dir() / "evaluations.jsonl", EvaluationRecord))
    elites = [r for r in records if r.operator == "elite"]
    assert len(elites) == 4 and all(r.cached and r.parent_fitness == [r.fitness] for r in elites)
    assert parent_ratios(records, "validation")["mutation"] > 0.95


def test_unknown_strategy_is_one_line_naming_the_field(tmp_path):
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "base_models: [{name: a, path: /m/a}, {name: b, path: /m/b}]\nsearch: {strategy: bo}\n"
    )
    result = CliRunner().invoke(app, ["run", str(run_file)])
    assert result.exit_code == 2 and "search.strategy: 'bo' is not one of" in result.stderr, result.stderr
    run_file.with_name("ok.yaml").write_text("base_models: [{name: a, path: /m/a}, {name: b, path: /m/b}]\n")
    result = CliRunner().invoke(app, ["run", str(run_file.with_name("ok.yaml")), "--strategy", "bo"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --strategy: 'bo' is not one of"), (
        result.stderr
    )


def test_a_frankenmerge_edit_re_sources_a_few_layers_not_the_whole_model():
    """Every seed's frankenmerge path is one block (all layers from the crossover stage): an edit gives a run
    of at most rate × depth of its layers a new source, never the whole model (which a base model or the
    interp output in place of the merge is: 0.15 of the parent's fitness on the demo)."""
    space = GenomeSpace(models=("alpha", "beta", "gamma"), paths=("/m/a", "/m/b", "/m/c"), num_layers=30)
    ops = config("ga", merge_operators={"frankenmerge_layers": [0, 0, 0]}).merge_operators  # the demo's
    parent = seed_genomes(space, ops, [1, 1, 1], 0)["linear-ties-frankenmerge"]
    assert {s.source for s in parent.structure.path} == {"crossover"}
    edit = structure.METHODS["frankenmerge"].edit
    rng = random.Random(11)
    for rate in (0.03, 0.15):
        for _ in range(200):
            path = edit(list(parent.structure.path), space, rng, rate)
            moved = [i for i, s in enumerate(path) if s.source != "crossover"]
            assert 1 <= len(moved) <= max(1, round(rate * 30))
            assert moved == list(range(moved[0], moved[-1] + 1))  # one contiguous run


def test_a_data_flow_edit_never_drops_repeats_or_shifts_the_first_or_last_layers():
    """A dfs mutant that dropped layer 1 of the demo's 30 kept 3 % of its parent's fitness: edits that
    restructure the path leave a tenth of the depth at each end in place (re-sourcing and rescaling them are
    still allowed), and they still reach every step in between."""
    space = GenomeSpace(models=("alpha", "beta", "gamma"), paths=("/m/a", "/m/b", "/m/c"), num_layers=30)
    parent = seed_genomes(space, config("ga").merge_operators, [1, 1, 1], 0)["linear-ties-dfs"].structure.path
    ends = structure.protected_ends(30)
    assert ends == 3
    edit = structure.METHODS["dfs"].edit
    rng = random.Random(5)
    restructured: set[int] = set()
    for _ in range(400):
        path = list(parent)
        for _ in range(3):
            path = edit(path, space, rng, 0.15)
        head, tail = [s.layer for s in path[:ends]], [s.layer for s in path[-ends:]]
        assert head == [0, 1, 2] and tail == [27, 28, 29], (head, tail)
        layers = [s.layer for s in path]
        if layers != list(range(30)):
            restructured.add(next(i for i, (a, b) in enumerate(zip(layers, range(30))) if a != b))
    assert min(restructured) == ends and max(restructured) >= 25  # the middle is edited, up to its end


@pytest.mark.parametrize("rate", [0.05, 0.3])
def test_a_data_flow_edit_changes_the_layer_order_with_the_mutation_rates_probability(rate):
    """On the demo one repeat, drop or shift kept a median 0.65-0.89 of the parent's fitness and one rescale or
    re-source 0.99-1.00 (recipes/demo/SEARCH.md): a drawn edit touches the layer order with probability
    `rate`, so a rate-0.15 mutant with its ~4.5 edits keeps its order about half the time."""
    space = GenomeSpace(models=("alpha", "beta", "gamma"), paths=("/m/a", "/m/b", "/m/c"), num_layers=30)
    parent = seed_genomes(space, config("ga").merge_operators, [1, 1, 1], 0)["linear-ties-dfs"].structure.path
    rng, n = random.Random(3), 2000
    reordered = sum(
        [s.layer for s in structure.METHODS["dfs"].edit(list(parent), space, rng, rate)] != list(range(30))
        for _ in range(n)
    )
    assert abs(reordered / n - rate) < 4 * (rate * (1 - rate) / n) ** 0.5
