"""The local executor: jobs one after another in this process, each when the loop asks for it (the next
job's merge overlapping this one's scoring where the evaluator allows, `CandidateEvaluator.overlap`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evoforge.evolve.executors.base import Job, Result
from evoforge.evolve.records import Scores

if TYPE_CHECKING:
    from evoforge.evaluate.scorer import EvalResult, Metric
    from evoforge.evolve.candidates import CandidateEvaluator


class LocalExecutor:
    """Wraps one `CandidateEvaluator`-like object (anything with `score_recipe`). Jobs run lazily, in
    order: the loop takes each result before the next job is scored, as it did before executors existed.
    While a job is scored, the evaluator may merge the next one (`then`); that is all that runs ahead."""

    def __init__(self, evaluator: CandidateEvaluator) -> None:
        self.evaluator = evaluator

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Result | Exception]]:
        overlap = getattr(self.evaluator, "overlap", False)
        for job, after in zip(jobs, [*jobs[1:], None], strict=True):
            then = {"then": (after.recipe, after.seed)} if overlap and after is not None else {}
            try:
                result = self.evaluator.score_recipe(job.recipe, job.seed, job.split, **then)
            except Exception as exc:  # handed to the loop, which records the failure
                yield job, exc
            else:
                yield job, result

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        return self.evaluator.score_recipe(recipe, seed, split)

    def score_model(self, path: str | Path, split: str) -> Scores:
        return self.evaluator.score_model(path, split)

    def evaluate_model(self, path: str | Path, split: str) -> EvalResult:
        return self.evaluator.evaluate_model(path, split)

    def result(self, recipe: str, seed: int, split: str, metric: Metric | None = None) -> EvalResult:
        return self.evaluator.result(recipe, seed, split, metric)

    def merge(self, recipe: str, seed: int, out_dir: Path) -> Path:
        return self.evaluator.merge(recipe, seed, out_dir)

    def halve_batch_size(self) -> bool:
        """After an out-of-memory error (`evolve.failures`), where the evaluator can."""
        halve = getattr(self.evaluator, "halve_batch_size", None)
        return bool(halve and halve())

    def close(self) -> None:
        """Nothing to release: the evaluator's models go with the process."""
