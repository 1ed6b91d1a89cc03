"""The ray executor on a local CPU cluster: the same run as the local executor, through a dead actor, a
resume and random search's look-ahead (tiny models, 2 actors). Needs the ray extra; CI installs it
(`make install`)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from evolution_support import run_config
from safetensors.torch import load_file
from typer.testing import CliRunner

from evoforge.cli import app
from evoforge.config import EvolutionConfig
from evoforge.evolve.executors import Job, WorkerDied
from evoforge.evolve.executors.ray_actors import OBJECT_STORE_BYTES, ExecutorLost, RayExecutor
from evoforge.evolve.strategies import STRATEGIES
from evoforge.pipeline import EvoMergePipeline

ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install '.[ray]')")
pytestmark = pytest.mark.slow

RUN = {"population_size": 5, "mutation_rate": 0.3, "max_generations": 2, "wandb_mode": "disabled"}
TIMINGS = {"merge_s", "eval_s", "wall_s"}


@pytest.fixture(scope="module")
def local_run(diverse_family, mc_tasks, tmp_path_factory) -> Path:
    """The reference: the same run on the local executor."""
    out = tmp_path_factory.mktemp("local") / "run"
    EvoMergePipeline(EvolutionConfig(**run_config(diverse_family, mc_tasks, out, **RUN))).run()
    return out


def without_timings(data):
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k not in TIMINGS | {"wandb_id"}}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def run_outputs(run_dir: Path) -> dict:
    """What must not depend on the executor: records, checkpoints and best models, timings aside."""
    lines = {
        name: [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        for name in ("evaluations.jsonl", "generations.jsonl")
    }
    checkpoints = {p.name: json.loads(p.read_text()) for p in sorted((run_dir / "checkpoints").iterdir())}
    best = {
        folder.name: load_file(folder / "model.safetensors")
        for folder in sorted(run_dir.glob("gen_*_best_model"))
    }
    assert best, "the run saved no best model"
    return {
        "baselines": json.loads((run_dir / "baselines.json").read_text()),
        "records": without_timings(lines),
        "checkpoints": without_timings(checkpoints),
        "best": {name: {k: t.tolist() for k, t in sorted(w.items())} for name, w in best.items()},
    }


def test_two_actors_give_the_local_executors_run(diverse_family, mc_tasks, local_run, tmp_path):
    """`evoforge run --executor ray` with no cluster running starts a local one (and stops it after)."""
    run_dir = tmp_path / "run"
    data = run_config(diverse_family, mc_tasks, run_dir, **RUN, ray={"actors": 2})
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(run_file), "--executor", "ray"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert not ray.is_initialized()
    fresh = [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert all(r["error"] is None for r in fresh)
    assert run_outputs(run_dir) == run_outputs(local_run)


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the tests below (the test above starts and stops its own)."""
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=OBJECT_STORE_BYTES,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def busy_actor_pid() -> int | None:
    """A Ray worker process running an evaluator job (Ray titles it `ray::EvaluatorActor.score_recipe`)."""
    for entry in Path("/proc").iterdir():
        try:
            title = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and title.startswith(b"ray::EvaluatorActor.score_recipe"):
            return int(entry.name)
    return None


def kill_a_busy_actor_after(evaluations: Path, records: int, killed: list[int]) -> threading.Thread:
    """SIGKILL an actor in the middle of a job once `records` lines are written."""

    def watch() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            lines = evaluations.read_text().count("\n") if evaluations.exists() else 0
            if lines >= records and (pid := busy_actor_pid()):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_run_resumed_on_ray_survives_a_killed_actor(cluster, diverse_family, mc_tasks, local_run, tmp_path):
    """Generation 0 locally, then stopped; resumed on Ray, where one actor is killed mid-job: its job goes to
    the other actor (Ray restarts the dead one) and the run ends as the local one did."""
    run_dir = tmp_path / "run"
    data = run_config(diverse_family, mc_tasks, run_dir, **{**RUN, "max_generations": 1})
    EvoMergePipeline(EvolutionConfig(**data)).run()
    resumed = EvolutionConfig(**{**data, "max_generations": 2, "executor": "ray", "ray": {"actors": 2}})
    killed: list[int] = []
    watcher = kill_a_busy_actor_after(run_dir / "evaluations.jsonl", records=10, killed=killed)
    EvoMergePipeline(resumed, resume=run_dir).run()
    watcher.join(timeout=1)
    assert killed, "no actor was busy to be killed"
    assert run_outputs(run_dir) == run_outputs(local_run)


class Flaky:
    """A stand-in evaluator actor: `die` kills its process, `bad` raises, `slow` takes a second, anything
    else scores (recipe, seed)."""

    def ready(self) -> int:
        return os.getpid()

    def score_recipe(self, recipe: str, seed: int, split: str):
        if recipe == "die":
            os._exit(1)
        if recipe == "bad":
            raise ValueError("bad recipe")
        if recipe == "slow":
            time.sleep(1.0)
        return recipe, float(seed), 0.0


def flaky_executor(actors: int, max_restarts: int) -> RayExecutor:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    actor = ray.remote(Flaky).options(num_cpus=0, max_restarts=max_restarts, max_task_retries=0)
    return RayExecutor(ray, [actor.remote() for _ in range(actors)], max_restarts)


def test_a_candidate_that_kills_its_worker_twice_fails_with_the_reason_and_the_rest_go_on(cluster):
    executor = flaky_executor(actors=2, max_restarts=2)
    try:
        jobs = [Job(recipe, seed, "validation") for seed, recipe in enumerate(["a", "die", "bad", "b", "c"])]
        results = dict(executor.run(jobs))
        assert [results[j][:2] for j in jobs if j.recipe in "abc"] == [("a", 0.0), ("b", 3.0), ("c", 4.0)]
        assert type(results[jobs[2]]) is ValueError and str(results[jobs[2]]) == "bad recipe"
        died = results[jobs[1]]
        assert isinstance(died, WorkerDied) and str(died).startswith(
            "a worker died under this candidate 2 times"
        )
        assert executor.score_recipe("d", 7, "test") == ("d", 7.0, 0.0)
        assert all(not isinstance(r, Exception) for _, r in executor.run([Job(r, 8, "test") for r in "efgh"]))
        assert len(set(ray.get([a.ready.remote() for a in executor.actors]))) == 2  # both were restarted
    finally:
        executor.close()


def test_when_every_actor_is_dead_for_good_the_run_stops(cluster):
    executor = flaky_executor(actors=1, max_restarts=0)
    try:
        results = executor.run([Job("die", 0, "validation"), Job("a", 1, "validation")])
        with pytest.raises(ExecutorLost, match="every Ray evaluator actor is dead"):
            list(results)
    finally:
        executor.close()


def test_rounds_open_together_share_the_actors_and_a_call_meanwhile_waits_for_a_free_one(cluster):
    """The loop's look-ahead: a round asked ahead runs on the actor the current round leaves free, and a
    held-out score or a best model's save asked while every actor is busy waits for one (rather than
    finding no idle actor and stopping the run)."""
    executor = flaky_executor(actors=2, max_restarts=0)
    try:
        current = executor.run([Job("slow", 0, "validation"), Job("a", 1, "validation")])
        ahead = executor.run([Job("b", 2, "validation")])
        assert [job.recipe for job, _ in current] == ["a", "slow"]
        assert len(ahead.done) == 1  # b finished while the driver waited for the current round's slowest
        assert [(job.recipe, result) for job, result in ahead] == [("b", ("b", 2.0, 0.0))]
        busy = executor.run([Job("slow", 3, "validation"), Job("slow", 4, "validation")])
        assert executor.score_recipe("d", 7, "test") == ("d", 7.0, 0.0)
        assert sorted(result[1] for _, result in busy) == [3.0, 4.0]
        dropped = executor.run([Job("slow", 5, "validation"), Job("slow", 6, "validation"), Job("c", 8, "x")])
        dropped.close()  # c is withdrawn; the slow ones finish unread
        assert executor.score_recipe("e", 9, "test") == ("e", 9.0, 0.0)
        # e ran on the first actor a slow one freed; the other may still be sleeping (a loaded machine), unread
        assert not executor.batches and all(owner is None for owner, _, _ in executor.running.values())
    finally:
        executor.close()


@pytest.mark.parametrize("strategy", ["random", "cmaes-async"])
def test_a_search_asked_ahead_on_ray_gives_the_local_executors_run(
    strategy, cluster, diverse_family, mc_tasks, tmp_path, monkeypatch
):
    """Random search and cmaes-async ask each round ahead: new bests' held-out scores and saves run while the
    next round's jobs hold the actors, and the run is still the local one."""
    keys = {**RUN, "max_generations": 3, "search": {"strategy": strategy}}
    local = tmp_path / "local"
    with monkeypatch.context() as patch:  # the reference: rounds strictly in turn
        patch.setattr(STRATEGIES[strategy], "asks_ahead", lambda self: False)
        EvoMergePipeline(EvolutionConfig(**run_config(diverse_family, mc_tasks, local, **keys))).run()
    open_before: list[int] = []  # batches of calls open when each new one was made
    calls = RayExecutor.calls
    monkeypatch.setattr(
        RayExecutor,
        "calls",
        lambda self, *a, **k: open_before.append(len(self.batches)) or calls(self, *a, **k),
    )
    on_ray = tmp_path / "ray"
    data = run_config(diverse_family, mc_tasks, on_ray, **keys, executor="ray", ray={"actors": 2})
    EvoMergePipeline(EvolutionConfig(**data)).run()
    assert run_outputs(on_ray) == run_outputs(local)
    assert max(open_before) >= 1  # rounds overlapped: without look-ahead each call is made alone
