"""Paired comparisons where they are printed: `evoforge compare`, the run report and the best model's card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from evolution_support import run_config, write_mc_tasks
from typer.testing import CliRunner

from evoforge.cli import app
from evoforge.cli.recipe_cmds import seed_recipes
from evoforge.config import EvolutionConfig
from evoforge.evaluate.stats import bootstrap, paired_difference
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.records import EvaluationRecord, ItemScores, Scores, read_records
from evoforge.evolve.run_dir import best_seed
from evoforge.merge.disk import merge_recipe
from evoforge.pipeline import EvoMergePipeline
from evoforge.recipe import random_seed
from evoforge.track.comparisons import heldout_comparisons

runner = CliRunner()
WEIGHTS = ["--weight", "math=1", "--weight", "multilingual=1"]


@pytest.fixture(scope="module")
def mc_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tasks with 30 items per split: enough for a bootstrap interval to be more than a point."""
    return write_mc_tasks(tmp_path_factory.mktemp("mc_tasks"), items=30)


def _rows(stdout: str) -> dict[str, list[str]]:
    """domain → cells of the printed table (Rich box characters stripped)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells and cells[0] in ("math", "multilingual", "fitness"):
            rows[cells[0]] = cells[1:]
    return rows


def _compare(a: str, b: str, tasks: Path, *extra: str):
    args = ["compare", a, b, "--tasks-dir", str(tasks), "--device", "cpu", *WEIGHTS, *extra]
    return runner.invoke(app, args, env={"COLUMNS": "200"})


def test_compare_prints_paired_intervals_per_domain(diverse_family: dict[str, Path], mc_tasks: Path) -> None:
    result = _compare(str(diverse_family["alpha"]), str(diverse_family["beta"]), mc_tasks)
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert set(rows) == {"math", "multilingual", "fitness"}
    for a, b, diff, interval, verdict in rows.values():
        (va, _), (vb, _) = (map(float, x.split(" ± ")) for x in (a, b))
        low, high = map(float, interval.strip("[]").split(","))
        assert float(diff) == pytest.approx(vb - va, abs=2e-4) and low <= float(diff) <= high
        assert verdict == ("no" if low <= 0 <= high else "yes, B higher" if low > 0 else "yes, A higher")
    assert "60 items, paired bootstrap (2000 resamples within each task)" in result.stdout


def test_a_model_against_itself_differs_by_exactly_zero(
    diverse_family: dict[str, Path], mc_tasks: Path
) -> None:
    result = _compare(str(diverse_family["gamma"]), str(diverse_family["gamma"]), mc_tasks, "--limit", "10")
    assert result.exit_code == 0, result.output
    for row in _rows(result.stdout).values():
        assert row[2:] == ["+0.0000", "[+0.0000, +0.0000]", "no"]
    assert "20 items" in result.stdout and "the interval includes 0" in result.stdout


def test_a_candidate_yaml_is_the_model_its_merge_makes(
    diverse_family: dict[str, Path], mc_tasks: Path, tmp_path: Path
) -> None:
    cfg = EvolutionConfig(**run_config(diverse_family, mc_tasks, tmp_path / "run"))
    recipe = tmp_path / "candidate.yaml"
    recipe.write_text(next(iter(seed_recipes(cfg).values())))
    text = recipe.read_text()
    merged = merge_recipe(text, tmp_path / "merged", device="cpu", random_seed=random_seed(text))
    result = _compare(str(recipe), str(merged), mc_tasks, "--split", "validation", "--limit", "8")
    assert result.exit_code == 0, result.output
    rows = _rows(result.stdout)
    assert [row[2] for row in rows.values()] == ["+0.0000"] * 3
    assert rows["fitness"][0].split(" ± ")[0] == rows["fitness"][1].split(" ± ")[0]


def test_a_candidates_result_is_the_last_evaluation_or_a_new_one(
    diverse_family: dict[str, Path], mc_tasks: Path, tmp_path: Path
) -> None:
    """What a run's held-out items come from: the loop's last evaluation when it was this candidate on
    this split (a recipe differing only in comments is the same candidate), else a fresh one."""
    cfg = EvolutionConfig(**run_config(diverse_family, mc_tasks, tmp_path / "run"))
    (a, b) = list(seed_recipes(cfg).values())[:2]
    evaluator = CandidateEvaluator(cfg, str(diverse_family["alpha"]), tmp_path / "work")
    scores, _, _ = evaluator.score_recipe(a, random_seed(a), "test")
    evaluator.score_recipe(b, random_seed(b), "validation")
    calls = []
    score = evaluator.scorer.score
    evaluator.scorer.score = lambda *args, **kwargs: calls.append(args) or score(*args, **kwargs)
    last = evaluator.result("# another title\n" + b, random_seed(b), "validation")
    assert last.split == "validation" and calls == []
    again = evaluator.result(a, random_seed(a), "test")
    assert calls == [("test",)]
    assert again.split == "test" and again.fitness == scores.fitness and again.fitness_se == scores.fitness_se
    assert {t: len(v) for t, v in again.item_scores().items()} == dict.fromkeys(again.tasks, 30)


def test_compare_errors_are_one_line(diverse_family: dict[str, Path], mc_tasks: Path, tmp_path: Path) -> None:
    result = _compare(str(diverse_family["alpha"]), str(tmp_path / "nothing"), mc_tasks)
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nothing: no such folder" in lines[0], result.stderr
    bad = _compare(str(diverse_family["alpha"]), str(diverse_family["beta"]), mc_tasks, "--weight", "code=1")
    assert bad.exit_code == 2 and "evaluation_weights.code" in bad.stderr


def _items(n: int, shift: float = 0.0) -> dict[str, list[float]]:
    return {
        "tiny_math_mc": [float(i % 3 == 0) + shift for i in range(n)],
        "tiny_words_mc": [float(i % 2 == 0) + shift for i in range(n)],
    }


HELD = ItemScores(
    split="test",
    metric="accuracy",
    task_domains={"tiny_math_mc": ["math"], "tiny_words_mc": ["multilingual"]},
    weights={"math": 0.5, "multilingual": 0.5},
    base_models={"alpha": _items(20)},
    candidates={"best": _items(20, 0.25), "seed": _items(20, 0.1)},
)


def test_run_comparisons_say_what_is_missing() -> None:
    text = "\n".join(heldout_comparisons(HELD, ("g002-c1", "best"), "alpha", ("g000-c3", "seed")))
    assert "### Best vs best base model: A = alpha, B = g002-c1" in text
    assert (
        "| **fitness** | **0.4250 ± 0.0796** | **0.6750 ± 0.0796** " in text
        and "| **+0.2500** | **[+0.2500, +0.2500]** | **yes, B higher** |" in text
    )
    assert "### Best vs best seed: A = g000-c3, B = g002-c1" in text and "| **+0.1500** |" in text
    same = "\n".join(heldout_comparisons(HELD, ("g000-c3", "seed"), "alpha", ("g000-c3", "seed")))
    assert "The best candidate is the best seed" in same
    missing = "\n".join(heldout_comparisons(HELD, ("g001-c0", "other"), None, None))
    assert "Not available: no best base model scored." in missing
    assert "Not available: no best seed scored." in missing
    old = heldout_comparisons(None, ("g001-c0", "other"), "alpha", None)
    assert old == ["No held-out per-item scores in this run (it predates them): no paired intervals."]


@pytest.mark.slow
def test_a_run_keeps_held_out_items_and_prints_intervals(
    diverse_family: dict[str, Path], mc_tasks: Path, tmp_path: Path
) -> None:
    """Base models, every new best and the best seed get held-out item vectors that reproduce their
    recorded held-out scores; the report and the model card pair them; every record carries its SE."""
    run = tmp_path / "run"
    data = run_config(  # 4 generations: the best is no longer a seed, so the seed comparison is computed
        diverse_family, mc_tasks, run, max_generations=4, population_size=5, wandb_mode="disabled"
    )
    best = EvoMergePipeline(EvolutionConfig(**data)).run()
    low, high = best.heldout_gain_interval
    assert low <= best.heldout_fitness - best.best_base_heldout <= high and low < high
    items = ItemScores.model_validate_json((run / "heldout_items.json").read_text())
    baselines = json.loads((run / "baselines.json").read_text())
    assert set(items.base_models) == set(baselines["models"]) == {"alpha", "beta", "gamma", "ancestor"}
    records = list(read_records(run / "evaluations.jsonl", EvaluationRecord))
    held = {r.genome_hash: r for r in records if r.split == "test"}
    assert held and set(held) <= set(items.candidates)
    seed = best_seed(records, "validation")  # the printed "vs best seed" is the card's paired difference
    assert best.best_seed == seed.id and seed.genome_hash != best.genome_hash and not best.best_is_seed
    pair = [items.candidates[h] for h in (seed.genome_hash, best.genome_hash)]
    assert best.seed_gain == paired_difference(*pair, items.task_domains, items.weights).fitness
    scored = [(v, held[h].scores) for h, v in items.candidates.items() if h in held]
    scored += [(items.base_models[m], Scores(**s["test"])) for m, s in baselines["models"].items()]
    for vectors, scores in scored:
        assert {t: len(v) for t, v in vectors.items()} == dict.fromkeys(items.task_domains, 30)
        est = bootstrap(vectors, items.task_domains, items.weights)
        assert est.fitness.estimate == pytest.approx(scores.fitness)
        assert est.fitness.se == pytest.approx(scores.fitness_se, rel=1e-3)
    fit = [r for r in records if r.split == "validation" and r.scores]
    assert all(r.scores.fitness_se > 0 and set(r.scores.domain_se) == {"math", "multilingual"} for r in fit)
    summary = (run / "report" / "summary.md").read_text()
    assert "## Held-out comparisons (test)" in summary and "### Best vs best base model: A = " in summary
    assert re.search(r"\| \*\*fitness\*\* \| \*\*[\d.]+ ± [\d.]+\*\* \|", summary), summary
    card = sorted(run.glob("gen_*_best_model"))[-1] / "README.md"
    assert "## Held-out comparisons" in card.read_text() and "95% interval" in card.read_text()
