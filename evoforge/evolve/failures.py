"""Why a candidate failed, and what the run does about it.

A *transient* failure (out of memory, an I/O error or a missing file, a worker process that died) says
nothing about the candidate: it is retried once straight away after freeing memory (at half the batch size
after an out-of-memory error, where the evaluator can), and if it fails again it scores 0 for this run only
— it is never restored from the records, so a resume evaluates it again. A *permanent* failure (an invalid
recipe, non-finite weights, any other error) belongs to the candidate: it scores 0 for good, with its reason
in the records and the report.
"""

from __future__ import annotations

import gc
import sys
import traceback
from concurrent.futures import BrokenExecutor
from typing import Protocol

from evoforge.errors import ModelNotAvailableError
from evoforge.evolve.checkpoint import Outcome
from evoforge.evolve.records import ErrorKind, Scores


class WorkerDied(RuntimeError):
    """What an executor raises when worker processes died under a job (the Ray executor: twice, on different
    workers where there were several): a transient failure, the job may succeed on a resumed run."""


class Evaluator(Protocol):
    """What the loop scores candidates with (`candidates.CandidateEvaluator`, or an executor); it may also
    offer `halve_batch_size() -> bool`, called after an out-of-memory error."""

    def score_recipe(self, recipe: str, seed: int, split: str) -> tuple[Scores, float, float]: ...


TRANSIENT = (OSError, MemoryError, EOFError, BrokenExecutor, WorkerDied, ModelNotAvailableError)


def out_of_memory(exc: BaseException) -> bool:
    """Host or accelerator memory ran out (torch.OutOfMemoryError is a RuntimeError saying so)."""
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def error_kind(exc: BaseException) -> ErrorKind:
    return "transient" if isinstance(exc, TRANSIENT) or out_of_memory(exc) else "permanent"


def describe(exc: BaseException) -> str:
    """The exception's last line: what the records and the report show."""
    return traceback.format_exception_only(exc)[-1].strip()


def free_memory(evaluator: Evaluator, oom: bool) -> None:
    """Let go of what the failed attempt held; after an out-of-memory error, halve the batch size for the
    rest of the run where the evaluator can (a candidate that ran out once would run out again)."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    halve = getattr(evaluator, "halve_batch_size", None)
    if oom and halve is not None:
        halve()


def score(evaluator: Evaluator, recipe: str, seed: int, split: str) -> Outcome:
    """One candidate's outcome: its scores, or its failure after at most one retry of a transient one."""
    failure: Outcome
    for _ in range(2):
        try:
            scores, merge_s, eval_s = evaluator.score_recipe(recipe, seed, split)
            return Outcome(scores=scores, merge_s=merge_s, eval_s=eval_s)
        except Exception as exc:  # a failed candidate scores 0, the run goes on
            failure, oom = Outcome(error=describe(exc), error_kind=error_kind(exc)), out_of_memory(exc)
        if failure.error_kind == "permanent":
            break
        free_memory(evaluator, oom)  # outside the handler: the failed attempt's frames are let go first
    return failure
