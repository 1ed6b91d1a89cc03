"""Look-ahead (issue 17): with random search, ga-async and cmaes-async, the next round's jobs start while the current
round's slowest candidate is still running, yet records, checkpoints, best and resume are those of the
local executor; ga and cmaes never ask ahead. A thread-pool executor stands in for Ray's actors (jobs start as soon as they are
handed over, finish in any order)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path

import pytest
from test_executors import run_files
from test_strategies import NAMES, SPACE, Killed, SyntheticEvaluator, config, run, trace

from evoforge.evolve import checkpoint as ckpt
from evoforge.evolve.executors import Job, Result
from evoforge.evolve.loop import Cancelled, Evolution, Hooks
from evoforge.evolve.run_dir import RunDir
from evoforge.evolve.strategies import STRATEGIES
from evoforge.evolve.strategies.random import RandomSearch

SLOW_S = 0.3
"""How long the first job of every round takes (the others take milliseconds)."""


class Batch:
    """One `run`'s futures, yielded as they complete; `close` cancels the ones not started."""

    def __init__(self, futures: dict[Future, Job]) -> None:
        self.futures, self.finished = futures, as_completed(futures)

    def __iter__(self) -> Batch:
        return self

    def __next__(self) -> tuple[Job, Result | Exception]:
        future = next(self.finished)
        if isinstance(error := future.exception(), Exception):
            return self.futures[future], error
        return self.futures[future], future.result()  # `Killed` stops the run, as a SIGKILL would

    def close(self) -> None:
        for future in self.futures:
            future.cancel()


class Pool:
    """Two worker threads that start a round's jobs as soon as `run` hands them over (as Ray's actors do),
    the first job of each round slow; `events` is the order jobs started and ended in."""

    def __init__(self, evaluator: SyntheticEvaluator) -> None:
        self.evaluator = evaluator
        self.threads = ThreadPoolExecutor(2)
        self.lock = threading.Lock()
        self.events: list[tuple[str, int, int]] = []
        """("start" | "end", round handed over (0, 1, …), job index)."""
        self.batches: list[Batch] = []

    def run(self, jobs: Sequence[Job]) -> Batch:
        number = len(self.batches)
        futures = {self.threads.submit(self.job, number, i, job): job for i, job in enumerate(jobs)}
        self.batches.append(Batch(futures))
        return self.batches[-1]

    def job(self, number: int, index: int, job: Job) -> Result:
        with self.lock:
            self.events.append(("start", number, index))
        try:
            if index == 0:
                time.sleep(SLOW_S)
            return self.evaluator.score_recipe(job.recipe, job.seed, job.split)
        finally:
            with self.lock:
                self.events.append(("end", number, index))

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        return self.evaluator.score_recipe(recipe, seed, split)

    def close(self) -> None:
        self.threads.shutdown(wait=True)

    def started_before_slowest_ended(self, number: int) -> bool:
        """Whether a job handed over after round `number` started before that round's slow job ended."""
        end = self.events.index(("end", number, 0))
        return any(kind == "start" and n > number for kind, n, _ in self.events[:end])

    def waited_for_every_round(self) -> bool:
        """Whether every round's jobs started only after all jobs handed over before it had ended."""
        ends: dict[int, int] = {}
        for at, (kind, n, _) in enumerate(self.events):
            if kind == "end":
                ends[n] = at
            elif any(earlier < n and at < ends[earlier] for earlier in ends):
                return False
        return all(
            ("end", n, i) in self.events for n, b in enumerate(self.batches) for i in range(len(b.futures))
        )


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


ASKS_AHEAD = ("random", "ga-async", "cmaes-async")
"""Strategies whose next round, from round 2 on, does not depend on the current round's results."""

PLATEAU = {"plateau_patience": 1, "plateau_threshold": 10.0}
"""Stops after generation 1: a round asked ahead is dropped."""


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [*((name, {}) for name in NAMES), ("random", PLATEAU)],
    ids=[*NAMES, "random-plateau"],
)
def test_asking_ahead_starts_the_next_round_before_the_slowest_and_records_what_local_does(
    strategy, extra, tmp_path, monkeypatch
):
    """The reference: the local executor, never asked ahead (the rounds strictly in turn)."""
    local = config(strategy, max_generations=4, output_dir=str(tmp_path / "local"), **extra)
    with monkeypatch.context() as patch:
        patch.setattr(STRATEGIES[strategy], "asks_ahead", lambda self: False, raising=False)
        run(local, SyntheticEvaluator(), resume=False)
    pooled = config(strategy, max_generations=4, output_dir=str(tmp_path / "pool"), **extra)
    pool = Pool(SyntheticEvaluator())
    try:
        run(pooled, pool, resume=False)
    finally:
        pool.close()
    assert run_files(tmp_path / "pool") == run_files(tmp_path / "local")
    assert files(tmp_path / "pool") == files(tmp_path / "local")
    if strategy not in ASKS_AHEAD:
        assert len(pool.batches) == 4 and pool.waited_for_every_round()
    elif extra:  # generation 1 asked generation 2 ahead, then the plateau stopped the run: it was withdrawn
        assert len(pool.batches) == 3 and all(f.cancelled() or f.done() for f in pool.batches[2].futures)
        assert not (tmp_path / "pool" / "candidates" / "gen_2").exists()
    else:  # round 1 needs round 0's results; rounds 1 and 2 ask the next one ahead, round 3 is the last
        assert len(pool.batches) == 4
        assert pool.started_before_slowest_ended(1) and not pool.started_before_slowest_ended(0)


class KilledAfter(SyntheticEvaluator):
    """Killed at its n-th evaluation on the fitness split (counted across worker threads)."""

    def __init__(self, n: int) -> None:
        self.left, self.lock = n, threading.Lock()

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        with self.lock:
            self.left -= split == "validation"
            if self.left < 0:
                raise Killed
        return super().score_recipe(recipe, seed, split)


def run_pooled(cfg, evaluator: SyntheticEvaluator, resume: bool, cancel_after: int | None = None) -> None:
    run_dir = RunDir(cfg.run_dir())
    run_dir.root.mkdir(parents=True, exist_ok=True)
    cancel = threading.Event()
    seen: list[str] = []

    def on_candidate(gen, member, outcome, cached) -> None:
        seen.append(member.id)
        if cancel_after is not None and len(seen) >= cancel_after:
            cancel.set()

    pool = Pool(evaluator)
    evolution = Evolution(cfg, SPACE, run_dir, pool, Hooks(on_candidate=on_candidate), cancel=cancel)
    latest = run_dir.latest_checkpoint() if resume else None
    try:
        evolution.run(ckpt.load(latest, cfg) if latest else evolution.initial_state())
    finally:
        pool.close()


def test_a_run_stopped_while_a_round_is_asked_ahead_resumes_to_the_local_run(tmp_path, monkeypatch):
    straight = config("random", max_generations=4, output_dir=str(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        patch.setattr(RandomSearch, "asks_ahead", lambda self: False)
        run(straight, SyntheticEvaluator(), resume=False)
    cut = config("random", max_generations=4, output_dir=str(tmp_path / "cut"))
    with pytest.raises(Cancelled):  # in round 1, round 2's jobs queued: withdrawn, its recipes removed
        run_pooled(cut, SyntheticEvaluator(), resume=False, cancel_after=11)
    assert not (cut.run_dir() / "candidates" / "gen_2").exists()
    with pytest.raises(Killed):  # resumed, killed at round 2's 5th job (round 3 asked ahead)
        run_pooled(cut, KilledAfter(5 + 4), resume=True)
    assert RunDir(cut.run_dir()).latest_checkpoint() == RunDir(cut.run_dir()).checkpoint(2)
    run_pooled(cut, SyntheticEvaluator(), resume=True)
    assert trace(cut) == trace(straight)
    checkpoints = {k: v for k, v in run_files(cut.run_dir()).items() if k.startswith("checkpoints/")}
    assert checkpoints == {
        k: v for k, v in run_files(straight.run_dir()).items() if k.startswith("checkpoints/")
    }
