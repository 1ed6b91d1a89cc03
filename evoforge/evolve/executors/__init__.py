"""Executors: where a round's candidates are merged and scored (`executor:` in the run file).

`local` runs them one after another in this process; `ray` spreads them over Ray actors, one per GPU (or
GPU fraction), each holding the base models and a Scorer. Both take recipe texts and return score records;
the runner (`evolve.loop`) keeps the strategy, cache, records and checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from evoforge.config import EvolutionConfig
from evoforge.evolve.executors.base import Executor, Job, Result, Round
from evoforge.evolve.executors.local import LocalExecutor
from evoforge.evolve.failures import WorkerDied

__all__ = [
    "Executor",
    "Job",
    "LocalExecutor",
    "Result",
    "Round",
    "WorkerDied",
    "as_executor",
    "make_executor",
]


def as_executor(evaluator: object) -> Executor:
    """An executor as it is, anything else with `score_recipe` (a CandidateEvaluator) run locally."""
    return evaluator if hasattr(evaluator, "run") else LocalExecutor(evaluator)


def make_executor(cfg: EvolutionConfig, anchor_path: str, work_dir: Path) -> Executor:
    """The run's executor; the ray extra is imported only when `executor: ray` asks for it."""
    if cfg.executor == "ray":
        from evoforge.evolve.executors.ray_actors import RayExecutor

        return RayExecutor.start(cfg, anchor_path, work_dir)
    from evoforge.evolve.candidates import CandidateEvaluator

    return LocalExecutor(CandidateEvaluator(cfg, anchor_path, work_dir))
