"""The end of a likelihood run: its fittest candidates re-scored by accuracy, the most accurate the run's best.

Likelihood (each item's gold answer scored teacher-forced) is 3.9× cheaper than accuracy and ranks diverse
candidates as accuracy does (Spearman 0.96, bench/FITNESS_METRICS.md), but less so among the top ones (0.75),
which is where a search climbs: on the demo trio, cmaes raised validation likelihood by 0.008 while the
held-out accuracy of its best fell by 0.014 (recipes/demo/SEARCH.md). So a likelihood run ends as a
multi-fidelity search does: the `evaluation.confirm_top` fittest distinct candidates and the best seed are
scored on the *fitness* split by accuracy (the held-out split stays unseen by every choice), and the most
accurate is the run's best, the fitter on ties. Only that one is then scored on the held-out split, and its
model is written to `confirmed_best_model/` (the fittest's gen_<N>_best_model is there already). Each score is
saved as it comes (`confirmation.json`): a stopped confirmation resumes where it was, and a run resumed for more
generations is confirmed again, reusing the candidates it already scored.

With `evaluation.heldout_each_best: false` no best was scored on the held-out split during the run (nor where
the fittest's pass failed, or ran while it was false before a resume): the run's best (chosen as above, or the
fittest where nothing is confirmed: accuracy fitness, `confirm_top: 0`) is scored on it here and written to
`confirmed_best_model/` with those scores, fittest or not (`confirmation.json` with `top: 0` and no
candidates where nothing was confirmed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from evoforge.config import EvolutionConfig
from evoforge.evolve import failures
from evoforge.evolve.candidates import to_scores
from evoforge.evolve.executors import Executor
from evoforge.evolve.loop import Cancelled
from evoforge.evolve.records import Confirmation, Confirmed, EvaluationRecord, rounded_items
from evoforge.evolve.run_dir import Run, RunDir, first_evaluations
from evoforge.recipe import random_seed

WriteModel = Callable[[EvaluationRecord, str, Path], None]
"""Writes a candidate's model folder (record, recipe text, folder): the pipeline's, with its model card."""


def pool(run: Run, top: int) -> list[EvaluationRecord]:
    """The `top` fittest distinct genomes that scored (each by its first evaluation; on ties the earlier
    generation, then place), then the best seed if it is not among them."""
    scored = [r for r in first_evaluations(run.evaluations).values() if r.scores is not None]
    chosen = sorted(scored, key=lambda r: -r.fitness)[:top]  # stable: first_evaluations is in run order
    seed = run.best_seed
    if seed is not None and seed.genome_hash not in {r.genome_hash for r in chosen}:
        chosen.append(seed)
    return chosen


def choose(candidates: list[Confirmed]) -> Confirmed | None:
    """The most accurate candidate; on ties the first in pool order (the fitter). None if none scored."""
    scored = [c for c in candidates if c.scores is not None]
    return max(scored, key=lambda c: c.scores.fitness, default=None)  # max keeps the first of equals


def confirm(
    cfg: EvolutionConfig,
    run_dir: RunDir,
    executor: Executor,
    write_model: WriteModel,
    cancel: threading.Event,
    report: Callable[[str], None] = lambda line: None,
) -> Confirmation | None:
    """Confirm the finished run's best (module docstring); None where the run is not confirmed (accuracy
    fitness, `confirm_top: 0`) and its best was scored on the held-out split during the run. A candidate
    that fails is recorded with its error and cannot be chosen."""
    ev = cfg.evaluation
    top = ev.confirm_top if ev.fitness_metric == "likelihood" else 0
    if top == 0 and ev.heldout_each_best and not run_dir.generations.is_file():
        return None
    run = Run.load(run_dir.root)
    # the best is scored on the held-out split here unless the loop scored the fittest (a resume may switch
    # `heldout_each_best`, and a failed pass is tried again)
    at_end = not ev.heldout_each_best or run.fittest_generation.best_heldout is None
    if top == 0 and not at_end:
        return None
    old = run_dir.read_confirmation()
    if old and old.chosen and (old.generations, old.top) == (len(run.generations), top):
        if old.model or not (_written_separately(old, run) or at_end):
            return old
    known = {c.genome_hash: c for c in old.candidates if c.scores is not None} if old else {}
    done = Confirmation(split=ev.fitness_split, top=top, generations=len(run.generations), candidates=[])
    if top == 0:  # nothing to confirm: the fittest is the best, scored on the held-out split now
        done.chosen = run.fittest.id
        report(f"scoring the run's best, {done.chosen}, on {ev.heldout_split}")
        _score_heldout(cfg, run_dir, executor, run, done, write_model)
        run_dir.write_confirmation(done)
        return done
    for rec in pool(run, top):
        if cancel.is_set():
            raise Cancelled(f"confirmation stopped before {rec.id}")
        if rec.genome_hash in known:
            item = known[rec.genome_hash].model_copy(update={"id": rec.id, "generation": rec.generation})
        else:
            report(
                f"confirming {rec.id} {rec.label} (fitness {rec.fitness:.4f}) by accuracy on {ev.fitness_split}"
            )
            item = _score(run_dir, executor, rec, ev.fitness_split)
        done.candidates.append(item)
        run_dir.write_confirmation(done)
    best = choose(done.candidates)
    if best is None:
        report(
            f"[yellow]warning:[/] no confirmation candidate scored; the best stays the fittest, {run.fittest.id}"
        )
        return done
    done.chosen = best.id
    if best.genome_hash != run.fittest.genome_hash or at_end:
        _score_heldout(cfg, run_dir, executor, run, done, write_model)
    run_dir.write_confirmation(done)
    report(
        f"confirmed: {best.id} ({best.scores.fitness:.4f} by accuracy on {ev.fitness_split}) is the run's best"
    )
    return done


def _written_separately(conf: Confirmation, run: Run) -> bool:
    """Whether the chosen candidate needs its own model folder (it is not the fittest)."""
    chosen = next((c for c in conf.candidates if c.id == conf.chosen), None)
    return chosen is not None and chosen.genome_hash != run.fittest.genome_hash


def _recipe(run_dir: RunDir, rec: EvaluationRecord) -> tuple[str, int | None]:
    text = (run_dir.root / rec.recipe).read_text(encoding="utf-8")
    return text, random_seed(text)


def _score(run_dir: RunDir, executor: Executor, rec: EvaluationRecord, split: str) -> Confirmed:
    confirmed = Confirmed(
        id=rec.id, generation=rec.generation, genome_hash=rec.genome_hash, fitness=rec.fitness
    )
    try:
        text, seed = _recipe(run_dir, rec)
        confirmed.scores = to_scores(executor.result(text, seed, split, "accuracy"))
    except Exception as exc:  # recorded; the candidate cannot be chosen
        confirmed.error = failures.describe(exc)
    return confirmed


def _score_heldout(
    cfg: EvolutionConfig,
    run_dir: RunDir,
    executor: Executor,
    run: Run,
    done: Confirmation,
    write_model: WriteModel,
) -> None:
    """The chosen candidate (not the fittest, or any with `heldout_each_best: false`) on the held-out split,
    its per-item scores kept for the paired comparisons, and its model written; a failure of either is
    recorded, and `--resume` tries again."""
    rec = next(e for e in run.evaluations if e.id == done.chosen)
    try:
        text, seed = _recipe(run_dir, rec)
        result = executor.result(text, seed, cfg.evaluation.heldout_split)
        done.heldout = to_scores(result)
        run_dir.write_confirmation(done)  # the model card reads it
        items = run_dir.read_items()
        if items is not None and result.item_scores() is not None:
            items.candidates[rec.genome_hash] = rounded_items(result.item_scores())
            run_dir.write_items(items)
        write_model(rec, text, run_dir.confirmed_model)
    except Exception as exc:  # recorded, retried on resume
        done.model_error = failures.describe(exc)
    else:
        done.model, done.model_error = run_dir.confirmed_model.name, None
