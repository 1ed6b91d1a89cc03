"""The confirmation that ends a likelihood run (`evolve.confirm`): the fittest few and the best seed re-scored by
accuracy on the fitness split, the most accurate the run's best, resumable, and reported."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from evolution_support import run_config, write_mc_tasks

from evoforge import EvolutionConfig, EvoMergePipeline
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.confirm import choose, confirm, pool
from evoforge.evolve.loop import Cancelled
from evoforge.evolve.records import Confirmed, EvaluationRecord, Scores, read_records
from evoforge.evolve.run_dir import Run, RunDir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(family: dict[str, Path], root: Path, **overrides) -> EvolutionConfig:
    data = run_config(family, write_mc_tasks(root / "tasks", items=6), root / "run", wandb_mode="disabled")
    data["evaluation"].update({"fitness_metric": "likelihood", **overrides.pop("evaluation", {})})
    data.update(overrides)
    return EvolutionConfig(**data)


def test_the_most_accurate_wins_and_ties_go_to_the_fitter() -> None:
    def cand(name: str, fitness: float, accuracy: float | None) -> Confirmed:
        scores = (
            Scores(metric="accuracy", fitness=accuracy, domains={}, tasks={})
            if accuracy is not None
            else None
        )
        return Confirmed(id=name, generation=0, genome_hash=name, fitness=fitness, scores=scores, error=None)

    pool_order = [cand("fittest", 0.5, 0.30), cand("second", 0.49, 0.35), cand("third", 0.48, 0.35)]
    assert choose(pool_order).id == "second"  # more accurate; tied with third, and fitter
    assert choose([cand("a", 0.5, None), cand("b", 0.4, 0.1)]).id == "b"  # a failed candidate is never chosen
    assert choose([cand("a", 0.5, None)]) is None


def test_a_likelihood_run_ends_with_its_best_chosen_by_accuracy(qwen_family, tmp_path: Path) -> None:
    cfg = _config(qwen_family, tmp_path, max_generations=2, evaluation={"confirm_top": 2})
    best = EvoMergePipeline(cfg).run()
    run = Run.load(cfg.run_dir())
    conf = run.confirmation
    assert conf is not None and conf.split == "validation" and conf.generations == 2
    expected = pool(run, 2)
    assert [c.id for c in conf.candidates] == [r.id for r in expected]
    assert expected[0].genome_hash == run.fittest.genome_hash and run.best_seed.id in [r.id for r in expected]
    assert all(c.scores.metric == "accuracy" and c.error is None for c in conf.candidates)
    assert conf.chosen == choose(conf.candidates).id == run.best.id == best.id
    assert best.confirmed_accuracy == max(c.scores.fitness for c in conf.candidates)
    summary = (run.run_dir.report / "summary.md").read_text()
    assert "Chosen by accuracy on validation among the 2 fittest and the best seed" in summary
    assert best.model_path and Path(best.model_path, "evoforge_recipe.yaml").is_file()


def test_a_candidate_that_fails_confirmation_is_passed_over_and_the_chosen_gets_its_model(
    qwen_family, tmp_path: Path
) -> None:
    """Run without confirmation, remove the fittest's recipe, resume with confirm_top (a key a resume may
    change): the fittest fails, the next is chosen, scored on the held-out split and written."""
    cfg = _config(qwen_family, tmp_path, max_generations=1, evaluation={"confirm_top": 0})
    EvoMergePipeline(cfg).run()
    run_dir = RunDir(cfg.run_dir())
    assert not run_dir.confirmation.exists()
    fittest = Run.load(run_dir.root).fittest
    (run_dir.root / fittest.recipe).unlink()

    cfg = _config(qwen_family, tmp_path, max_generations=1, evaluation={"confirm_top": 2})
    best = EvoMergePipeline(cfg, resume=run_dir.root).run()
    run = Run.load(run_dir.root)
    failed, chosen = run.confirmation.candidates
    assert failed.id == fittest.id and failed.scores is None and "No such file" in failed.error
    assert best.id == chosen.id == run.best.id != fittest.id
    assert best.model_path == str(run_dir.confirmed_model) and best.heldout_fitness is not None
    assert (run_dir.confirmed_model / "README.md").read_text().startswith("---")
    assert chosen.genome_hash in run_dir.read_items().candidates  # the paired held-out comparisons
    assert run.best_heldout == run.confirmation.heldout and run.best_model == ("confirmed_best_model", None)


def test_a_stopped_confirmation_resumes_without_scoring_again(qwen_family, tmp_path: Path) -> None:
    cfg = _config(qwen_family, tmp_path, max_generations=1, evaluation={"confirm_top": 0})
    EvoMergePipeline(cfg).run()
    cfg = _config(qwen_family, tmp_path, max_generations=1, evaluation={"confirm_top": 3})
    run_dir = RunDir(cfg.run_dir())
    evaluator = CandidateEvaluator(cfg, str(cfg.resolve(cfg.base_models[0])), run_dir.work)
    cancel, lines = threading.Event(), []

    def stop_after_first(line: str) -> None:
        lines.append(line)
        cancel.set()  # the first candidate is scored, then the confirmation stops

    with pytest.raises(Cancelled):
        confirm(cfg, run_dir, evaluator, lambda *a: None, cancel, stop_after_first)
    partial = run_dir.read_confirmation()
    assert (
        len(partial.candidates) == 1
        and partial.chosen is None
        and Run.load(run_dir.root).confirmation is None
    )

    lines.clear()
    done = confirm(cfg, run_dir, evaluator, lambda *a: None, threading.Event(), lines.append)
    assert len(done.candidates) == 3 and done.chosen is not None
    assert done.candidates[0] == partial.candidates[0]
    assert not any(partial.candidates[0].id in line for line in lines if line.startswith("confirming"))
    assert sum(line.startswith("confirming") for line in lines) == 2
    assert confirm(cfg, run_dir, evaluator, lambda *a: None, threading.Event(), lines.append) == done


def test_an_accuracy_run_is_not_confirmed(qwen_family, tmp_path: Path) -> None:
    cfg = _config(qwen_family, tmp_path)
    cfg = cfg.model_copy(
        update={"evaluation": cfg.evaluation.model_copy(update={"fitness_metric": "accuracy"})}
    )
    assert confirm(cfg, RunDir(tmp_path / "none"), None, lambda *a: None, threading.Event()) is None


@pytest.mark.parametrize("metric", ["accuracy", "likelihood"])
def test_without_heldout_each_best_only_the_runs_best_is_scored_on_the_heldout_split_at_the_end(
    metric, qwen_family, tmp_path: Path
) -> None:
    """The same run with the held-out pass of each new best (the default) and without it: the same best, the
    same held-out scores and paired interval; without it nothing is scored on the held-out split before the
    search has ended, and the best's model is written at the end with its held-out scores."""
    runs = {}
    for each in (True, False):
        evaluation = {"fitness_metric": metric, "confirm_top": 2, "heldout_each_best": each}
        cfg = _config(qwen_family, tmp_path / str(each), max_generations=2, evaluation=evaluation)
        runs[each] = (EvoMergePipeline(cfg).run(), Run.load(cfg.run_dir()))
    (on, run_on), (off, run_off) = runs[True], runs[False]
    assert off.id == on.id and off.heldout_fitness is not None
    assert off.heldout_fitness == on.heldout_fitness and off.heldout_domain_scores == on.heldout_domain_scores
    assert off.heldout_gain_interval == on.heldout_gain_interval is not None
    records = read_records(run_off.run_dir.evaluations, EvaluationRecord)
    assert {r.split for r in records} == {"validation"}
    assert all(g.best_heldout is None for g in run_off.generations)
    assert any(r.split == "test" for r in read_records(run_on.run_dir.evaluations, EvaluationRecord))
    assert off.model_path == str(run_off.run_dir.confirmed_model)
    card = (run_off.run_dir.confirmed_model / "README.md").read_text()
    assert "not scored" not in card and "Best vs best base model" in card
    assert (
        "not scored"
        in (run_off.run_dir.root / run_off.fittest_generation.best_model / "README.md").read_text()
    )
    assert run_off.confirmation.top == (2 if metric == "likelihood" else 0)
    # a resumed run that has nothing new to do scores and writes nothing again, whichever the key now says
    written = (run_off.run_dir.confirmed_model / "README.md").stat().st_mtime_ns
    for each in (False, True):
        again = {**evaluation, "heldout_each_best": each}
        cfg = _config(qwen_family, tmp_path / "False", max_generations=2, evaluation=again)
        assert EvoMergePipeline(cfg, resume=run_off.run_dir.root).run() == off
    assert (run_off.run_dir.confirmed_model / "README.md").stat().st_mtime_ns == written
