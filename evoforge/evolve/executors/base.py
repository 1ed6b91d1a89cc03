"""The executor seam: the loop hands a round's candidate jobs to an executor and takes their results back.

A job is what a worker needs to score a candidate: its recipe text, DARE seed and split; a result is
`(Scores, merge seconds, evaluation seconds)`, or the exception that failed the job. Only recipes and
numbers cross the seam, never weights. An executor may finish jobs in any order; `Round` hands them to the
loop in candidate order, so the records are the same whichever executor ran them. Several rounds may be
open at once (the loop's look-ahead, `evolve.loop`), and single calls (a held-out score, a best model's
merge) may come while they are: an executor serves all of them, the one a caller waits on first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from evoforge.evolve.records import Scores

if TYPE_CHECKING:
    from evoforge.evaluate.scorer import EvalResult, Metric

Result = tuple[Scores, float, float]
"""(scores, merge seconds, evaluation seconds), as `CandidateEvaluator.score_recipe` returns them."""


@dataclass(frozen=True)
class Job:
    """One candidate on one split: everything a worker needs to merge and score it."""

    recipe: str
    seed: int
    split: str


class Executor(Protocol):
    """Runs jobs; also scores whole model folders (the baselines) and writes a run's best models."""

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Result | Exception]]:
        """Each job's result or the exception that failed it, as the jobs finish (any order); `close()` on
        the iterator withdraws the jobs not started. The local executor runs each job only when the loop
        asks for the next result; the ray one starts them on free workers from this call on."""
        ...

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result: ...

    def score_model(self, path: str | Path, split: str) -> Scores: ...

    def evaluate_model(self, path: str | Path, split: str) -> EvalResult:
        """A whole model folder's result, per-item scores included (the baselines)."""
        ...

    def result(self, recipe: str, seed: int, split: str, metric: Metric | None = None) -> EvalResult:
        """A candidate's result, per-item scores included (the held-out comparisons, the confirmation), by
        `metric` (default: the split's)."""
        ...

    def merge(self, recipe: str, seed: int, out_dir: Path) -> Path:
        """The candidate's model folder at `out_dir` (the run directory: a worker writes it there)."""
        ...

    def close(self) -> None: ...


class Round:
    """One round's jobs, running on an executor; `take` returns a job's result (or raises its exception)
    once it is done, keeping the ones that finish earlier for when the loop asks for them."""

    def __init__(self, executor: Executor, jobs: Sequence[Job]) -> None:
        self._waiting = set(jobs)
        self._done: dict[Job, Result | Exception] = {}
        self._results = executor.run(list(dict.fromkeys(jobs)))

    def __contains__(self, job: Job) -> bool:
        return job in self._waiting

    def wait(self, job: Job) -> None:
        """Until the job is done (or taken); an executor failure that is not the job's own (no worker
        left) raises here."""
        while job in self._waiting and job not in self._done:
            finished, result = next(self._results)
            self._done[finished] = result

    def take(self, job: Job) -> Result:
        """The job's result, once (it leaves the round); its exception is raised as the job's failure."""
        self.wait(job)
        self._waiting.discard(job)
        result = self._done.pop(job)
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        """Stop handing out jobs: queued ones are withdrawn, running ones finish unread."""
        self._results.close()
