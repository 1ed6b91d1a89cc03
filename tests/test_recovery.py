"""Failure recovery (issue 14): failure kinds, records that survive kills and full disks, the run-directory
lock, cancellation of the Python API, and "what is scored is what is saved".

Whole runs go through the CLI, the pipeline, the loop and the records with a synthetic scorer
(`recovery_support.SyntheticCandidates`), so each takes about a second; every interrupted run must resume to
the uninterrupted run's records. The SIGKILL and Ctrl-C cases run `recovery_support.py` as a subprocess.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from evolution_support import run_config, write_mc_tasks
from recovery_support import SyntheticCandidates, install_synthetic
from typer.testing import CliRunner

from evoforge import EvoMergePipeline
from evoforge.cli import app
from evoforge.config import EvolutionConfig, load_config
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, read_records
from evoforge.evolve.run_dir import RunDir, latest_records
from evoforge.tiny import make_family

SUPPORT = Path(__file__).with_name("recovery_support.py")
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


# ---------------------------------------------------------------------------------------------- failure kinds


def test_out_of_memory_is_retried_once_at_half_the_batch_size(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    halved: list[int] = []
    monkeypatch.setattr(synthetic, "halve_batch_size", lambda self: halved.append(1) or True, raising=False)

    def fault(n: int, recipe: str) -> None:
        if n == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    calls = failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    result = cli("run", str(run_file))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert calls[2] == calls[3] and halved == [1]  # the same recipe again, at half the batch size
    assert trace(run_dir) == straight


def test_the_candidate_evaluator_halves_lm_evals_batch_size_down_to_1(run_file_data, tmp_path):
    from evoforge.evolve.candidates import CandidateEvaluator

    cfg = EvolutionConfig(**{**run_file_data, "merge_path": "disk"})
    evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), tmp_path / "work")
    assert evaluator.scorer.lm.batch_size == 16
    assert [evaluator.halve_batch_size() for _ in range(5)] == [True] * 4 + [False]
    assert evaluator.scorer.lm.batch_size == 1


def test_out_of_memory_first_stops_merging_ahead_then_halves_the_batch(run_file_data, tmp_path):
    from evoforge.evolve.candidates import CandidateEvaluator

    cfg = EvolutionConfig(**{**run_file_data, "overlap_merges": True})
    evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), tmp_path / "work")
    assert evaluator.overlap and evaluator.halve_batch_size()
    assert not evaluator.overlap and evaluator.scorer.lm.batch_size == 16
    assert evaluator.halve_batch_size() and evaluator.scorer.lm.batch_size == 8


def test_a_transient_failure_is_recorded_and_evaluated_again_on_resume(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    """A model folder gone in generation 1: its candidates fail twice each (the retry), are recorded as
    transient and the run is killed; once the folder is back, the resume scores them (not a cached 0)."""

    def fault(n: int, recipe: str) -> None:
        if n >= 14:
            raise Killed
        if n >= 10:
            raise FileNotFoundError(
                errno.ENOENT, "No such file or directory", "/models/beta/model.safetensors"
            )

    failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with pytest.raises(Killed):
        cli("run", str(run_file))
    failed = [r for r in read_records(run_dir / "evaluations.jsonl", EvaluationRecord) if r.error]
    assert len(failed) == 2 and all(r.error_kind == "transient" and r.fitness == 0.0 for r in failed)
    assert "No such file or directory" in failed[0].error
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)


def test_a_permanent_failure_scores_0_for_good_with_its_reason_in_the_report(
    run_file_data, synthetic, monkeypatch, tmp_path
):
    bad: list[str] = []

    def fault(n: int, recipe: str) -> None:
        if n == 4 or recipe in bad:
            bad.append(recipe)
            raise ValueError("recipe: slices.0.parameters.weight: nan is not a finite number")
        if n == 7:
            raise Killed

    calls = failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with pytest.raises(Killed):
        cli("run", str(run_file))
    assert calls.count(bad[0]) == 1  # not retried
    result = cli("run", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert calls.count(bad[0]) == 1  # nor evaluated again on resume
    failed = [r for r in read_records(run_dir / "evaluations.jsonl", EvaluationRecord) if r.error]
    assert [(r.generation, r.error_kind, r.fitness) for r in failed] == [(0, "permanent", 0.0)]
    summary = (run_dir / "report" / "summary.md").read_text()
    assert (
        f"- `{failed[0].id}` (gen 0, {failed[0].label}): permanent: ValueError: recipe: slices.0" in summary
    )


def test_every_candidate_failing_transiently_stops_the_run_for_a_resume(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    def fault(n: int, recipe: str) -> None:
        if n >= 10:
            raise OSError(errno.EIO, "Input/output error")

    failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    error = error_line(cli("run", str(run_file)))
    assert "generation 1: every candidate failed (OSError: [Errno 5] Input/output error)" in error
    assert "--resume" in error
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)


def test_a_failed_best_model_save_is_recorded_and_written_later(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    def full(self, recipe: str, seed: int, out_dir: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "merge", full)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    result = cli("run", str(run_file))
    assert result.exit_code == 0, result.output + str(result.exception)  # the run went on
    assert (
        "model: not written (OSError: [Errno 28] No space left on device); --resume writes it"
        in result.stdout
    )
    gens = list(read_records(run_dir / "generations.jsonl", GenerationRecord))
    unsaved = [g for g in gens if g.best_heldout]
    assert unsaved and all(g.best_model is None and "No space left" in g.best_model_error for g in unsaved)
    assert (
        "not written: OSError: [Errno 28] No space left on device"
        in (run_dir / "report" / "summary.md").read_text()
    )
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)  # every new best's folder, no error left


def test_a_best_model_save_failing_once_is_retried_at_the_next_new_best(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    real, attempts = synthetic.merge, []

    def once_full(self, recipe: str, seed: int, out_dir: Path) -> Path:
        attempts.append(out_dir.name)
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, recipe, seed, out_dir)

    monkeypatch.setattr(synthetic, "merge", once_full)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    result = cli("run", str(run_file))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert attempts[:2] == [attempts[0], attempts[0]]  # the failed one first, before (or without) the next
    assert trace(run_dir) == straight


# ------------------------------------------------------------------------------------- scored == saved


def test_the_best_model_is_built_from_the_recipe_text_that_was_scored(
    run_file_data, synthetic, monkeypatch, tmp_path
):
    """Each candidate's YAML is edited right after it is scored: the saved model and its recipe are the
    text that was scored, on both splits, not the file as it is now."""
    run_file, run_dir = write_run(tmp_path, run_file_data)
    real = synthetic.score_recipe

    def then_edit(self, recipe: str, seed: int, split: str):
        out = real(self, recipe, seed, split)
        for path in (run_dir / "candidates").rglob("*.yaml"):
            if path.read_text() == recipe:
                path.write_text(recipe + "# edited after scoring\n")
        return out

    monkeypatch.setattr(synthetic, "score_recipe", then_edit)
    assert cli("run", str(run_file)).exit_code == 0
    saved = sorted(run_dir.glob("gen_*_best_model"))
    assert saved
    for folder in saved:
        text = (folder / "evoforge_recipe.yaml").read_text()
        assert (folder / "mergekit_config.yml").read_text() == text
        assert [split for t, split in synthetic.scored if t == text] == ["validation", "test"]
        assert "edited" not in text


# ---------------------------------------------------------------------------------- records and resume


def test_a_torn_last_record_is_cut_off_with_one_warning_and_its_candidate_runs_again(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    def fault(n: int, recipe: str) -> None:
        if n == 12:
            raise Killed

    failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with pytest.raises(Killed):
        cli("run", str(run_file))
    evaluations = run_dir / "evaluations.jsonl"
    lines = evaluations.read_text().splitlines(keepends=True)
    evaluations.write_text("".join(lines[:-1]) + lines[-1][:40])  # a full disk cut the last record short
    (run_dir / ".gen_0_best_model.x1y2.partial" / "model").mkdir(parents=True)  # a kill before the rename
    (run_dir / "checkpoints" / ".evolution_checkpoint_gen_1.json.tmp").write_text('{"vers')
    monkeypatch.undo()
    install_synthetic()
    stderr = assert_resumes_to_straight(run_dir, straight)
    warnings = [line for line in stderr.splitlines() if "torn" in line]
    assert len(warnings) == 1 and "evaluations.jsonl: removed a torn last line (40 bytes" in warnings[0]


def full_disk(monkeypatch, pattern: str, nth: int = 1) -> None:
    """The nth write into a file matching `pattern` writes half its bytes and fails with ENOSPC."""
    real, seen = os.write, []

    def write(fd: int, data: bytes) -> int:
        if re.search(pattern, os.readlink(f"/proc/self/fd/{fd}")):
            seen.append(fd)
            if len(seen) == nth:
                real(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_while_appending_a_record_stops_with_one_line_and_leaves_no_half_line(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    full_disk(monkeypatch, r"evaluations\.jsonl$", nth=6)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    error = error_line(cli("run", str(run_file)))
    assert "evaluations.jsonl: cannot write (No space left on device); the run stopped" in error
    text = (run_dir / "evaluations.jsonl").read_text()
    assert text.endswith("\n") and text.count("\n") == 5
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)


def test_a_full_disk_during_the_resume_rewrite_of_generations_keeps_every_row(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    run_file, run_dir = write_run(tmp_path, run_file_data)
    assert cli("run", str(run_file), "--gens", "2").exit_code == 0
    before = (run_dir / "generations.jsonl").read_text()
    full_disk(monkeypatch, r"generations\.jsonl")
    error = error_line(cli("run", "--resume", str(run_dir), "--gens", str(GENS)))
    assert "generations.jsonl: cannot write (No space left" in error
    assert (run_dir / "generations.jsonl").read_text() == before
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)


def test_a_second_run_on_a_locked_run_directory_gets_one_line_naming_the_holder(
    run_file_data, synthetic, tmp_path
):
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with RunDir(run_dir).opened():
        error = error_line(cli("run", str(run_file)))
    assert f"another evoforge run (pid {os.getpid()}) is using this run directory" in error
    assert not (run_dir / "evaluations.jsonl").exists()


def test_resume_of_a_folder_that_does_not_exist_names_that_folder(tmp_path):
    missing = tmp_path / "runs" / "never"
    for args in (
        ["run", "--resume", str(missing)],
        ["run", "--resume", str(missing / "checkpoints" / "x.json")],
    ):
        error = error_line(cli(*args))
        assert f"{missing}" in error and "config.yaml" not in error


# ----------------------------------------------------------------------------------------- cancellation


def lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_cancelling_run_evolution_stops_within_the_current_candidate(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    monkeypatch.setattr(synthetic, "delay", 0.2)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    evaluations = run_dir / "evaluations.jsonl"

    async def cancel_after_four() -> tuple[int, float]:
        task = asyncio.ensure_future(EvoMergePipeline(load_config(run_file)).run_evolution())
        while lines(evaluations) < 4:
            await asyncio.sleep(0.01)
        at_cancel, t0 = lines(evaluations), time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return at_cancel, time.monotonic() - t0

    at_cancel, waited = asyncio.run(cancel_after_four())
    stopped = lines(evaluations)
    time.sleep(0.6)  # the worker thread is done: nothing more is written
    assert lines(evaluations) == stopped and stopped <= at_cancel + 1 and waited < 2.0
    assert not (run_dir / "checkpoints" / f"evolution_checkpoint_gen_{GENS}.json").exists()
    monkeypatch.setattr(synthetic, "delay", 0.0)
    assert_resumes_to_straight(run_dir, straight)


# ------------------------------------------------------------------ kills, Ctrl-C and concurrent runs


def support(*args: str, fault: str = "", delay: float = 0.0, **popen) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "EVOFORGE_TEST_FAULT": fault,
        "EVOFORGE_TEST_DELAY": str(delay),
    }
    # Ctrl-C reaches it as it reaches a command typed at a terminal, even where this suite was started in
    # the background (a shell starts background jobs with SIGINT ignored, and Python keeps that).
    return subprocess.Popen(
        [sys.executable, str(SUPPORT), *args],
        env=env,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        **popen,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        r"write:evaluations\.jsonl$:7",  # inside a record write
        r"write:evolution_checkpoint_gen_:2",  # inside a checkpoint write
        r"replace:gen_\d+_best_model$:1",  # just before the best model's rename
    ],
)
def test_a_sigkill_inside_a_write_resumes_to_the_uninterrupted_run(
    fault, run_file_data, synthetic, straight, tmp_path
):
    run_file, run_dir = write_run(tmp_path, run_file_data)
    proc = support("run", str(run_file), fault=fault, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    assert_resumes_to_straight(run_dir, straight)


@pytest.mark.slow
def test_a_sigkill_inside_the_resume_rewrite_of_generations_loses_no_row(
    run_file_data, synthetic, straight, tmp_path
):
    run_file, run_dir = write_run(tmp_path, run_file_data)
    assert cli("run", str(run_file), "--gens", "2").exit_code == 0
    before = (run_dir / "generations.jsonl").read_text()
    proc = support("run", "--resume", str(run_dir), "--gens", str(GENS), fault=r"write:generations\.jsonl:1")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert (run_dir / "generations.jsonl").read_text() == before
    assert_resumes_to_straight(run_dir, straight)


@pytest.mark.slow
def test_ctrl_c_stops_the_python_api_within_the_current_candidate(
    run_file_data, synthetic, straight, tmp_path
):
    run_file, run_dir = write_run(tmp_path, run_file_data)
    evaluations = run_dir / "evaluations.jsonl"
    proc = support("api", str(run_file), delay=0.3, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while lines(evaluations) < 4 and time.time() < deadline:
        time.sleep(0.02)
    at_interrupt = lines(evaluations)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)  # before this change the worker thread ran every remaining generation first
    assert lines(evaluations) <= at_interrupt + 1
    assert_resumes_to_straight(run_dir, straight)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_folder_do_not_double_the_records(
    run_file_data, synthetic, straight, tmp_path
):
    """Started together: one takes the lock and runs, the other stops at once naming its pid."""
    run_file, run_dir = write_run(tmp_path, run_file_data)
    procs = [
        support("run", str(run_file), delay=0.5, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    stderr = {p.pid: p.communicate(timeout=300)[1] for p in procs}
    assert sorted(p.returncode for p in procs) == [0, 2], stderr
    winner, loser = sorted(procs, key=lambda p: p.returncode)
    errors = [line for line in stderr[loser.pid].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"another evoforge run (pid {winner.pid})" in errors[0], stderr[loser.pid]
    assert trace(run_dir) == straight
