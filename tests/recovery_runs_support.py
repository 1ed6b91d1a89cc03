"""Whole runs for the failure-recovery tests, in-process: the run file, running and resuming through the CLI,
faults in the synthetic scorer, and the uninterrupted run every interrupted one must resume to.

Whole runs go through the CLI, the pipeline, the loop and the records with a synthetic scorer
(`recovery_support.SyntheticCandidates`), so each takes about a second; every interrupted run must resume to
the uninterrupted run's records. A test module binds the fixtures `run_file_data`, `straight` and `synthetic`
by name (module scope: one uninterrupted run per test module).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from evolution_support import run_config, write_mc_tasks
from recovery_support import SyntheticCandidates
from typer.testing import CliRunner

from evoforge.cli import app
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, read_records
from evoforge.evolve.run_dir import latest_records
from evoforge.tiny import make_family

GENS = 3


class Killed(BaseException):
    """Stands in for a kill in-process: it passes every `except Exception`."""


@pytest.fixture(scope="module")
def run_file_data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("recovery")
    family = make_family(root / "family")
    tasks = write_mc_tasks(root / "tasks", items=4)
    return run_config(
        family,
        tasks,
        root / "unused",
        max_generations=GENS,
        population_size=5,
        mutation_rate=0.3,
        wandb_mode="disabled",
    )


def write_run(tmp_path: Path, data: dict, **overrides) -> tuple[Path, Path]:
    """(run file, run directory) under tmp_path."""
    run_dir = tmp_path / "run"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**data, "output_dir": str(run_dir), **overrides}))
    return path, run_dir


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setattr("evoforge.evolve.candidates.CandidateEvaluator", SyntheticCandidates)
    monkeypatch.setattr(SyntheticCandidates, "scored", [])
    return SyntheticCandidates


def cli(*args: str):
    return CliRunner().invoke(app, [*args])


def trace(run_dir: Path) -> tuple[list, list]:
    """What must not depend on interruptions: every candidate's genome and outcome, each generation's best
    and its model folder."""
    evaluations = sorted(
        (r.generation, r.id, r.split, r.genome_hash, round(r.fitness, 9), r.error)
        for r in latest_records(read_records(run_dir / "evaluations.jsonl", EvaluationRecord))
    )
    gens = [
        (g.generation, g.best_hash, g.best_fitness, g.best_model, g.best_model_error)
        for g in read_records(run_dir / "generations.jsonl", GenerationRecord)
    ]
    return evaluations, gens


@pytest.fixture(scope="module")
def straight(run_file_data, tmp_path_factory) -> tuple[list, list]:
    """The uninterrupted run's trace: what every interrupted run must resume to."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("evoforge.evolve.candidates.CandidateEvaluator", SyntheticCandidates)
        run_file, run_dir = write_run(tmp_path_factory.mktemp("straight"), run_file_data)
        result = cli("run", str(run_file))
        assert result.exit_code == 0, result.output + str(result.exception)
    return trace(run_dir)


def error_line(result) -> str:
    """The one `error:` line of a command that failed with exit status 2 (the last thing it printed)."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert result.stderr.rstrip().endswith(errors[0])
    return errors[0]


def assert_resumes_to_straight(run_dir: Path, straight: tuple[list, list]) -> str:
    """Resume the run (healthy now) and compare; returns what the resume wrote to stderr."""
    result = cli("run", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert trace(run_dir) == straight
    records = read_records(run_dir / "evaluations.jsonl", EvaluationRecord)
    done = [(r.genome_hash, r.split) for r in records if not r.cached and r.error_kind != "transient"]
    assert len(done) == len(set(done)), "a finished evaluation was run again"
    assert not [p.name for p in run_dir.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    return result.stderr


def failing(synthetic, monkeypatch, fault) -> list[str]:
    """Make the scorer call `fault(n, recipe)` first (n counts calls from 1); it may raise. Returns the
    recipes scored, in order, attempts included."""
    calls: list[str] = []
    real = synthetic.score_recipe

    def score_recipe(self, recipe: str, seed: int, split: str):
        calls.append(recipe)
        fault(len(calls), recipe)
        return real(self, recipe, seed, split)

    monkeypatch.setattr(synthetic, "score_recipe", score_recipe)
    return calls
