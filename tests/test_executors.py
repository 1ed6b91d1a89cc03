"""The executor seam without Ray: results taken in any order are recorded in candidate order, the run file's
executor keys, how Ray actors are sized, and a core that never needs the ray extra."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from test_strategies import NAMES, SyntheticEvaluator, config, run
from typer.testing import CliRunner

from evoforge.cli import app
from evoforge.config import ConfigError, load_config
from evoforge.evolve.executors import Job, Result, Round
from evoforge.evolve.executors.ray_actors import actor_shape


class Reversed:
    """An executor that finishes a round's jobs last first (as a slow first candidate would on Ray)."""

    def __init__(self) -> None:
        self.evaluator = SyntheticEvaluator()
        self.rounds: list[int] = []

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Job, Result | Exception]]:
        self.rounds.append(len(jobs))
        results = []
        for job in jobs:
            try:
                results.append((job, self.evaluator.score_recipe(job.recipe, job.seed, job.split)))
            except Exception as exc:
                results.append((job, exc))
        yield from reversed(results)

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        return self.evaluator.score_recipe(recipe, seed, split)


def run_files(root: Path) -> dict:
    """Records and checkpoints, timings aside (they are what differs between executors)."""
    out = {}
    for path in sorted(root.rglob("*.json*")):
        text = path.read_text()
        rows = (
            [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else json.loads(text)
        )
        out[path.relative_to(root).as_posix()] = strip(rows)
    return out


IGNORED = {"merge_s", "eval_s", "wall_s", "es"}
"""Timings, and cmaes's pickled CMAEvolutionStrategy (its logger keeps wall-clock timer readings)."""


def strip(data):
    if isinstance(data, dict):
        return {k: strip(v) for k, v in data.items() if k not in IGNORED}
    return [strip(v) for v in data] if isinstance(data, list) else data


@pytest.mark.parametrize("strategy", NAMES)
def test_jobs_finished_out_of_order_are_recorded_as_the_local_executor_records_them(strategy, tmp_path):
    local = config(strategy, max_generations=4, output_dir=str(tmp_path / "local"))
    run(local, SyntheticEvaluator(), resume=False)
    shuffled = config(strategy, max_generations=4, output_dir=str(tmp_path / "reversed"))
    executor = Reversed()
    run(shuffled, executor, resume=False)
    assert executor.rounds[0] == 8 and len(executor.rounds) >= 4  # whole rounds went to the executor at once
    assert run_files(tmp_path / "reversed") == run_files(tmp_path / "local")


class Listed:
    def __init__(self, order: list[int]) -> None:
        self.order, self.started = order, 0

    def run(self, jobs):
        for i in self.order:
            self.started += 1
            yield (
                jobs[i],
                ValueError(jobs[i].recipe) if jobs[i].recipe == "bad" else (jobs[i].recipe, 0.0, 0.0),
            )


def test_a_round_hands_out_each_result_when_asked_and_raises_a_jobs_own_failure():
    jobs = [Job(r, 0, "validation") for r in ("a", "bad", "c")]
    executor = Listed([2, 0, 1])
    rnd = Round(executor, jobs)
    assert jobs[0] in rnd and executor.started == 0  # nothing runs before the loop asks
    assert rnd.take(jobs[0])[0] == "a" and executor.started == 2  # c finished first and waits
    assert jobs[0] not in rnd
    rnd.wait(jobs[0])  # taken already: returns at once
    assert rnd.take(jobs[2])[0] == "c" and executor.started == 2
    with pytest.raises(ValueError, match="bad"):
        rnd.take(jobs[1])
    rnd.close()


def write_run(tmp_path: Path, **keys) -> Path:
    data = {"base_models": [{"name": "a", "path": "/m/a"}, {"name": "b", "path": "/m/b"}], **keys}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"executor": "dask"}, "executor: Input should be 'local' or 'ray'"),
        ({"ray": {"actors": 0}}, "ray.actors: Input should be greater than or equal to 1"),
        ({"ray": {"gpus_per_actor": 1.5}}, "ray.gpus_per_actor: Input should be less than or equal to 1"),
        ({"ray": {"gpu_per_actor": 0.5}}, "ray.gpu_per_actor: unknown key (misspelt?)"),
    ],
)
def test_executor_keys_are_checked(keys, message, tmp_path):
    path = write_run(tmp_path, **keys)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: {message}"


def test_executor_flag_replaces_the_run_files_executor(tmp_path):
    path = write_run(tmp_path, executor="ray", ray={"actors": 2, "gpus_per_actor": 0.5})
    assert load_config(path, executor="local").executor == "local"
    assert load_config(path).ray.gpus_per_actor == 0.5


@pytest.mark.parametrize(
    ("device", "ray", "cluster", "shape"),
    [
        ("cpu", {}, {"CPU": 16, "GPU": 8}, (1, 0.0)),  # no GPU asked for on the CPU
        ("auto", {}, {"CPU": 16}, (1, 0.0)),
        ("auto", {}, {"CPU": 16, "GPU": 4}, (4, 1.0)),  # one actor per GPU
        ("cuda", {"gpus_per_actor": 0.5}, {"CPU": 16, "GPU": 1}, (2, 0.5)),  # two actors share the card
        ("cpu", {"actors": 2, "cpus_per_actor": 2}, {"CPU": 4}, (2, 0.0)),
    ],
)
def test_actors_follow_the_clusters_gpus(device, ray, cluster, shape):
    cfg = config("ga", device=device, executor="ray", ray=ray)
    assert actor_shape(cfg, cluster) == shape


@pytest.mark.parametrize(
    ("device", "ray", "cluster", "message"),
    [
        ("cuda", {}, {"CPU": 16}, "device: 'cuda' asked for, but the Ray cluster has no GPU"),
        (
            "auto",
            {"actors": 3},
            {"CPU": 16, "GPU": 2},
            "ray.actors: 3 actors need 3 GPUs, the Ray cluster has 2",
        ),
        ("cpu", {"actors": 3, "cpus_per_actor": 2}, {"CPU": 4}, "ray.actors: 3 actors need 6 CPUs"),
    ],
)
def test_actors_the_cluster_cannot_place_are_refused(device, ray, cluster, message):
    with pytest.raises(ConfigError, match=message):
        actor_shape(config("ga", device=device, executor="ray", ray=ray), cluster)


def test_without_the_ray_extra_the_core_runs_and_executor_ray_is_one_line(qwen_family, monkeypatch, tmp_path):
    code = (  # an import of ray anywhere below would fail
        "import sys; sys.modules['ray'] = None\n"
        "import evoforge.cli, evoforge.pipeline, evoforge.evolve.loop, evoforge.evolve.executors.ray_actors"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does without the extra
    models = [{"name": n, "path": str(qwen_family[n])} for n in ("alpha", "beta")]
    path = write_run(tmp_path, base_models=models, output_dir=str(tmp_path / "out"))
    result = CliRunner().invoke(app, ["run", str(path), "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert result.stderr == "error: executor: ray needs the ray extra: pip install 'ray==2.60.*'\n"
