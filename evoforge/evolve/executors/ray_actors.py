"""The ray executor: evaluator actors, one per GPU (or GPU fraction), each a resident `CandidateEvaluator`.

Each actor loads the base models and one Scorer once, then takes recipe text + DARE seed + split and returns
`(Scores, merge s, eval s)`: only recipes and numbers travel, never weights. The driver keeps the strategy,
cache, records and checkpoints. Jobs are handed to whichever actor is free and taken as they finish
(`ray.wait`), so no actor waits for another's candidate; `Round` puts them back in candidate order. One
scheduler serves every open batch of calls (the current round, a round asked ahead, a held-out score or a
best model's save while those run), the batch the driver waits on first.

Best models are written by an actor straight into the run directory (preferably the one that has just scored
the new best on the held-out split, whose Scorer still holds its weights): the actors need the base models
at the same paths as the driver anyway, so the run directory is on storage they all see, and the driver
needs neither a GPU nor a copy of the models.

Faults: an actor whose process dies (kill -9, the OOM killer, a lost node) is restarted by Ray
(`ray.max_restarts`) and its job goes to another actor; a job under which workers died twice fails with
`WorkerDied`. When no actor is left the run stops (`ExecutorLost`); its checkpoint resumes it.
"""

from __future__ import annotations

import logging
import math
import os
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evoforge.config import EvolutionConfig
from evoforge.errors import ConfigError, EvoforgeError
from evoforge.evolve.executors.base import Job, Result
from evoforge.evolve.failures import WorkerDied
from evoforge.evolve.records import Scores
from evoforge.quiet import quiet_libraries

if TYPE_CHECKING:
    from evoforge.evaluate.scorer import EvalResult, Metric

OBJECT_STORE_BYTES = 128 * 1024**2
"""A local cluster's object store: recipes and score records are kilobytes (Ray's minimum is 75 MiB)."""
DEATHS_PER_JOB = 2
"""A job is given to another worker when its worker dies, and fails when workers died under it this often."""


class ExecutorLost(EvoforgeError):
    """Every evaluator actor is gone for good: the run stops (resume it from its checkpoint)."""


class EvaluatorActor:
    """One `CandidateEvaluator` in a Ray worker process (made a Ray actor by `RayExecutor`). A failure to
    build it is kept for `ready`, so the driver shows it as the one-line error it is, not as a dead actor."""

    def __init__(self, cfg: EvolutionConfig, anchor_path: str, work_dir: str) -> None:
        from evoforge.evolve.candidates import CandidateEvaluator

        self.error: Exception | None = None
        try:
            with quiet_libraries():
                self.evaluator = CandidateEvaluator(cfg, anchor_path, Path(work_dir))
        except Exception as exc:
            self.error = exc

    def ready(self) -> int:
        """The worker's process id, once its models are loaded."""
        if self.error is not None:
            raise self.error
        return os.getpid()

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        with quiet_libraries():
            return self.evaluator.score_recipe(recipe, seed, split)

    def score_model(self, path: str, split: str) -> Scores:
        with quiet_libraries():
            return self.evaluator.score_model(path, split)

    def evaluate_model(self, path: str, split: str) -> EvalResult:
        with quiet_libraries():
            return self.evaluator.evaluate_model(path, split)

    def result(self, recipe: str, seed: int, split: str, metric: Metric | None = None) -> EvalResult:
        with quiet_libraries():
            return self.evaluator.result(recipe, seed, split, metric)

    def merge(self, recipe: str, seed: int, out_dir: str) -> str:
        with quiet_libraries():
            return str(self.evaluator.merge(recipe, seed, Path(out_dir)))


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray needs the ray extra: pip install 'ray==2.60.*'") from None
    return ray


def connect(ray: Any, cfg: EvolutionConfig) -> bool:
    """Join the running Ray (an `ray.init` of the caller's, or the cluster `RAY_ADDRESS` names), else start
    a local one with room for the actors; True when this call started it (and `close` stops it)."""
    if ray.is_initialized():
        return False
    common = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**common)
        return True
    settings = cfg.ray
    cpus = math.ceil(settings.actors * settings.cpus_per_actor) if settings.actors else None
    ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES, **common)
    return True


def actor_shape(cfg: EvolutionConfig, cluster: dict[str, float]) -> tuple[int, float]:
    """(actors, GPUs per actor) for this cluster; refuses what the cluster cannot place (Ray would wait)."""
    settings, gpus = cfg.ray, cluster.get("GPU", 0.0)
    if cfg.device == "cpu" or (cfg.device == "auto" and gpus == 0):
        per_gpu = 0.0
    elif gpus == 0:
        raise ConfigError(f"device: {cfg.device!r} asked for, but the Ray cluster has no GPU")
    else:
        per_gpu = settings.gpus_per_actor
    actors = settings.actors or (max(1, math.floor(gpus / per_gpu + 1e-9)) if per_gpu else 1)
    for resource, need, have in (
        ("GPU", actors * per_gpu, gpus),
        ("CPU", actors * settings.cpus_per_actor, cluster.get("CPU", 0.0)),
    ):
        if need > have + 1e-9:
            raise ConfigError(
                f"ray.actors: {actors} actors need {need:g} {resource}s, the Ray cluster has {have:g}"
            )
    return actors, per_gpu


class RayExecutor:
    """Calls to a set of evaluator actors (any actor class with `ready` and the methods called); `start`
    builds the run's. `close` removes the actors, and the Ray instance when `start` started it."""

    def __init__(self, ray: Any, actors: list[Any], max_restarts: int, started: bool = False) -> None:
        self.ray, self.actors, self.max_restarts, self.started = ray, actors, max_restarts, started
        self.idle = deque(range(len(actors)))
        self.restarting: dict[Any, int] = {}
        """`ready` calls to actors that Ray is restarting → the actor's index."""
        self.last_worker: int | None = None
        """The actor that answered the call taken last (a new best's held-out score, before its save)."""
        self.batches: list[Calls] = []
        """Open batches of calls (`calls`), oldest first."""
        self.running: dict[Any, tuple[Calls | None, int, int]] = {}
        """Calls on the actors → (their batch, None once it is closed; index in it; actor index)."""
        try:
            ray.get([a.ready.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            self.close()
            if isinstance(exc, ray.exceptions.RayTaskError):
                raise cause(exc) from None  # e.g. a base model that does not load: its one-line error
            raise ExecutorLost(
                f"executor: a Ray evaluator actor died while starting: {first_line(exc)}"
            ) from None

    @classmethod
    def start(cls, cfg: EvolutionConfig, anchor_path: str, work_dir: Path) -> RayExecutor:
        """The run's actors, each loading its models (`ready` waits for that; a load error is raised here)."""
        ray = import_ray()
        started = connect(ray, cfg)
        try:
            n, per_gpu = actor_shape(cfg, ray.cluster_resources())
        except ConfigError:
            if started:
                ray.shutdown()
            raise
        actor = ray.remote(EvaluatorActor).options(
            num_cpus=cfg.ray.cpus_per_actor,
            num_gpus=per_gpu,
            max_restarts=cfg.ray.max_restarts,
            max_task_retries=0,  # a dead worker's job is re-queued here, on another actor
        )
        resolved = cfg.resolved()
        actors = [actor.remote(resolved, anchor_path, str(work_dir / f"actor-{i}")) for i in range(n)]
        return cls(ray, actors, cfg.ray.max_restarts, started)

    # -------------------------------------------------------------------------------------- the seam

    def run(self, jobs: Sequence[Job]) -> Calls:
        return self.calls([("score_recipe", (j.recipe, j.seed, j.split)) for j in jobs], jobs)

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        return self.call("score_recipe", (recipe, seed, split))

    def score_model(self, path: str | Path, split: str) -> Scores:
        return self.call("score_model", (str(path), split))

    def evaluate_model(self, path: str | Path, split: str) -> EvalResult:
        return self.call("evaluate_model", (str(path), split))

    def result(self, recipe: str, seed: int, split: str, metric: Metric | None = None) -> EvalResult:
        """On the actor that scored last where it can: it may still hold the candidate's result."""
        return self.call("result", (recipe, seed, split, metric), prefer=self.last_worker)

    def merge(self, recipe: str, seed: int, out_dir: Path) -> Path:
        return Path(self.call("merge", (recipe, seed, str(out_dir)), prefer=self.last_worker))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)
        self.actors, self.batches = [], []
        if self.started:
            self.ray.shutdown()
            self.started = False

    # ------------------------------------------------------------------------------------- scheduling

    def call(self, method: str, args: tuple, prefer: int | None = None) -> Any:
        ((_, result),) = self.calls([(method, args)], [None], prefer)
        if isinstance(result, Exception):
            raise result
        return result

    def calls(self, calls: Sequence[tuple[str, tuple]], tags: Sequence, prefer: int | None = None) -> Calls:
        """Actor calls, started on free actors from now on, taken as `(tag, value or exception)` as they
        finish (`Calls`)."""
        batch = Calls(self, calls, tags, prefer)
        self.batches.append(batch)
        self._dispatch(batch)
        return batch

    def _dispatch(self, first: Calls) -> None:
        """Free actors take queued calls: those of the batch a caller waits on first, then the other open
        batches', oldest first (a round asked ahead waits behind the current one)."""
        for batch in [first, *(b for b in self.batches if b is not first)]:
            while batch.queue and self.idle:
                i = batch.queue.popleft()
                worker = self._pick(batch.avoid.get(i, set()), batch.prefer)
                method, args = batch.calls[i]
                self.running[getattr(self.actors[worker], method).remote(*args)] = (batch, i, worker)
                batch.running += 1

    def next_result(self, batch: Calls) -> tuple[int, Any]:
        """The batch's next finished call; while it waits, every batch's calls are served."""
        while not batch.done:
            if not batch.queue and not batch.running:
                self.withdraw(batch)
                raise StopIteration
            self._dispatch(batch)
            if not self.running and not self.restarting:
                self.withdraw(batch)
                raise ExecutorLost(
                    f"executor: every Ray evaluator actor is dead (each was restarted up to "
                    f"ray.max_restarts = {self.max_restarts} times); resume the run from its checkpoint"
                )
            self._step(batch)
        i, value, worker = batch.done.popleft()
        if worker is not None:
            self.last_worker = worker
        return i, value

    def withdraw(self, batch: Calls) -> None:
        """Close a batch: its queued calls are dropped, its running ones finish unread."""
        if batch in self.batches:
            self.batches.remove(batch)
        batch.queue.clear()
        batch.done.clear()
        for ref, (owner, i, worker) in self.running.items():
            if owner is batch:
                self.running[ref] = (None, i, worker)

    def _step(self, waiting: Calls) -> None:
        """Wait for one call (or restart) to finish and file its result with its batch; a call whose worker
        died goes to another actor, and fails once workers died under it `DEATHS_PER_JOB` times."""
        ray = self.ray
        (ref,), _ = ray.wait([*self.running, *self.restarting], num_returns=1)
        if ref in self.restarting:
            self._restarted(ref)
            return
        batch, i, worker = self.running.pop(ref)
        if batch is not None:
            batch.running -= 1
        done_by: int | None = None
        try:
            value = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the call raised: the candidate's own failure
            self.idle.append(worker)
            value = cause(exc)
        except (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError) as exc:
            # its process died (Ray reports it as died or as unavailable: calls go to idle actors only)
            self._restart(worker)
            if batch is None:
                return
            batch.avoid.setdefault(i, set()).add(worker)
            batch.died[i] = batch.died.get(i, 0) + 1
            if batch.died[i] < DEATHS_PER_JOB:
                batch.queue.appendleft(i)
                return
            value = WorkerDied(f"a worker died under this candidate {batch.died[i]} times: {first_line(exc)}")
        else:
            self.idle.append(worker)
            done_by = worker
        if batch is not None:
            batch.done.append((i, value, done_by))
        self._dispatch(waiting)  # the freed actor starts its next call before this result goes back

    def _pick(self, avoid: set[int], prefer: int | None) -> int:
        """An idle actor: `prefer` if idle, else one this call has not failed on, else any."""
        for worker in [*([prefer] if prefer is not None else []), *(w for w in self.idle if w not in avoid)]:
            if worker in self.idle:
                self.idle.remove(worker)
                return worker
        return self.idle.popleft()

    def _restart(self, worker: int) -> None:
        """Ray restarts an actor whose process died (up to max_restarts); it takes calls again once `ready`
        answers (a call sent while it restarts would fail)."""
        probe = self.actors[worker].ready.options(max_task_retries=-1).remote()
        self.restarting[probe] = worker

    def _restarted(self, probe: Any) -> None:
        worker = self.restarting.pop(probe)
        try:
            self.ray.get(probe)
        except self.ray.exceptions.RayError:
            return  # dead for good: restarts used up, or its models no longer load
        self.idle.append(worker)


class Calls:
    """One batch of actor calls (a round's jobs, or one call), yielded as `(tag, value or exception)` as they
    finish; `close` withdraws the ones not started. Several may be open at once: an actor that finishes takes
    the next queued call of whichever batch (`RayExecutor._dispatch`)."""

    def __init__(
        self, executor: RayExecutor, calls: Sequence[tuple[str, tuple]], tags: Sequence, prefer: int | None
    ) -> None:
        self.executor, self.calls, self.tags, self.prefer = executor, calls, tags, prefer
        self.queue = deque(range(len(calls)))
        self.running = 0
        self.done: deque[tuple[int, Any, int | None]] = deque()
        """(index, value or exception, the actor that answered it unless it failed)."""
        self.died: dict[int, int] = {}
        self.avoid: dict[int, set[int]] = {}
        """Index → actors that died under it (it goes to another one where there is one)."""

    def __iter__(self) -> Calls:
        return self

    def __next__(self) -> tuple[Any, Any]:
        i, value = self.executor.next_result(self)
        return self.tags[i], value

    def close(self) -> None:
        self.executor.withdraw(self)


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def cause(exc: Exception) -> Exception:
    """The exception an actor method raised, as the local executor would have raised it."""
    inner = getattr(exc, "cause", None)
    return inner if isinstance(inner, Exception) else exc
