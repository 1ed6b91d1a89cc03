"""Failure recovery (issue 14), interruptions: records that survive kills and full disks, the run-directory
lock, cancellation of the Python API, Ctrl-C and concurrent runs. The SIGKILL and Ctrl-C cases run
`recovery_support.py` as a subprocess."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import recovery_runs_support as runs
from recovery_runs_support import (
    GENS,
    Killed,
    assert_resumes_to_straight,
    cli,
    error_line,
    failing,
    trace,
    write_run,
)
from recovery_support import install_synthetic

from evoforge import EvoMergePipeline
from evoforge.config import load_config
from evoforge.evolve.run_dir import RunDir

SUPPORT = Path(__file__).with_name("recovery_support.py")

# The shared fixtures, bound here so that pytest finds them (module scope: one uninterrupted run here).
run_file_data, straight, synthetic = runs.run_file_data, runs.straight, runs.synthetic


# ---------------------------------------------------------------------------------- records and resume


def killed_in_generation_1(run_file_data, synthetic, monkeypatch, tmp_path) -> Path:
    """A run killed at its 12th scoring (generation 1, after its checkpoint); returns its folder."""

    def fault(n: int, recipe: str) -> None:
        if n == 12:
            raise Killed

    failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with pytest.raises(Killed):
        cli("run", str(run_file))
    return run_dir


def test_a_torn_last_record_is_cut_off_with_one_warning_and_its_candidate_runs_again(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    run_dir = killed_in_generation_1(run_file_data, synthetic, monkeypatch, tmp_path)
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


def test_the_records_and_the_latest_checkpoint_alone_resume_in_another_folder(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    """What bench/run_mirrored.sh brings back from a GPU lease (no recipes, no models, no older checkpoint)
    continues on a fresh machine to the uninterrupted run, keeping the finished generations' rows as measured
    (their `wall_s`: without the checkpoint the run would replay them from the cache)."""
    run_dir = killed_in_generation_1(run_file_data, synthetic, monkeypatch, tmp_path)
    mirror = tmp_path / "mirror"
    (mirror / "checkpoints").mkdir(parents=True)
    for record in [*run_dir.glob("*.jsonl"), *run_dir.glob("*.json"), run_dir / "config.yaml"]:
        shutil.copy(record, mirror)
    shutil.copy(RunDir(run_dir).latest_checkpoint(), mirror / "checkpoints")
    finished = (mirror / "generations.jsonl").read_text()
    assert finished.count("\n") >= 1
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(mirror, straight)
    assert (mirror / "generations.jsonl").read_text().startswith(finished)


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
