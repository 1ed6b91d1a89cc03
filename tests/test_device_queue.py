"""bench/device_queue.sh: the GPU session's benchmark commands run one after another in the background; a
poll reports each job's state and brings back logs and the jobs' own files; a queue started again runs only
what has not succeeded."""

from __future__ import annotations

import os
import subprocess
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_queue.sh"


def _queue(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT)


def _wait_done(queue: Path) -> None:
    deadline = time.monotonic() + 30
    while not (queue / "DONE").exists():
        assert time.monotonic() < deadline, "the queue did not finish in 30 s"
        time.sleep(0.1)


def test_jobs_run_in_order_failures_are_kept_and_a_restart_runs_only_what_failed(tmp_path: Path) -> None:
    queue, out = tmp_path / "queue", tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "QUEUE": str(queue), "OUT": str(out)}
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "# a comment, then a blank line\n\n"
        'echo first > "$QUEUE_OUT/first.txt"\n'
        "echo half; exit 3\n"
        'test -e "$QUEUE_OUT/first.txt" && echo third'
    )
    started = _queue(env, "start", str(jobs))
    assert started.returncode == 0 and "queue of 3 job(s) started" in started.stdout
    _wait_done(queue)
    poll = _queue(env, "poll", "0")
    assert poll.returncode == 0, poll.stderr
    lines = poll.stdout.splitlines()
    assert lines[0].startswith('01 exit 0: echo first > "$QUEUE_OUT/first.txt" | [')
    assert lines[1].startswith("02 exit 3: echo half; exit 3 | [") and lines[1].endswith("exit 3")
    assert lines[2].startswith("03 exit 0:") and lines[3] == "ALL DONE"
    assert sorted(p.name for p in out.iterdir()) == ["queue.tar"]  # one file: a call brings back 8 at most
    with tarfile.open(out / "queue.tar") as tar:
        assert tar.extractfile("out/first.txt").read() == b"first\n"
        assert b"half" in tar.extractfile("02.log").read() and tar.extractfile("02.rc").read().strip() == b"3"

    logs = {n: (queue / f"{n}.log").read_text() for n in ("01", "03")}
    jobs.write_text(jobs.read_text().replace("echo half; exit 3", "echo fixed"))  # the cause fixed
    assert _queue(env, "start", str(jobs)).returncode == 0
    _wait_done(queue)
    assert {n: (queue / f"{n}.log").read_text() for n in ("01", "03")} == logs  # not run again
    assert (queue / "02.rc").read_text().strip() == "0" and "fixed" in (queue / "02.log").read_text()


def test_several_queue_files_run_in_order_and_a_command_listed_twice_runs_once(tmp_path: Path) -> None:
    """One GPU session chains the real trio's queue and the random-weight one; their shared first jobs (the
    CUDA tests) run once. A file without a final newline still ends its last command."""
    queue = tmp_path / "queue"
    env = {**os.environ, "QUEUE": str(queue)}
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text('echo shared >> "$QUEUE_OUT/log"\necho one >> "$QUEUE_OUT/log"')
    second.write_text('echo shared >> "$QUEUE_OUT/log"\necho two >> "$QUEUE_OUT/log"\n')
    started = _queue(env, "start", str(first), str(second))
    assert started.returncode == 0 and "queue of 3 job(s) started" in started.stdout, started.stderr
    _wait_done(queue)
    assert (queue / "out" / "log").read_text() == "shared\none\ntwo\n"


def test_a_queue_file_without_commands_or_missing_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "QUEUE": str(tmp_path / "queue")}
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    result = _queue(env, "start", str(empty))
    assert result.returncode == 2 and result.stderr.strip() == f"error: {empty} holds no command"
    missing = _queue(env, "start", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "no such queue file" in missing.stderr
    assert _queue(env, "poll", "0").stdout.strip() == f"no queue in {tmp_path / 'queue'}"


def test_the_committed_queues_name_scripts_that_exist() -> None:
    """A renamed bench or script breaks a GPU session's queue only on the device: caught here instead."""
    queues = sorted((ROOT / "bench" / "queues").glob("*.txt"))
    assert queues
    for queue in queues:
        jobs = [line for line in queue.read_text().splitlines() if line and not line.startswith("#")]
        words = (word.rstrip(";&|") for job in jobs for word in job.split())
        named = {word for word in words if word.startswith(("bench/", "scripts/"))}
        assert named, queue
        missing = sorted(p for p in named if not (ROOT / p).exists())
        assert not missing, f"{queue.name} names {missing}"


def test_run_mirrored_copies_a_runs_records_while_it_runs_and_keeps_its_exit_status(tmp_path: Path) -> None:
    """bench/run_mirrored.sh: the records of a running `evoforge run` (here a stand-in that writes a record,
    waits, writes another and fails) reach the mirror as they land, with the latest checkpoint only (gen 10
    after gen 9), and its exit status is the run's."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python3").write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do [ "$prev" = --output-dir ] && run=$a; prev=$a; done\n'
        'mkdir -p "$run/checkpoints" && echo 0 > "$run/generations.jsonl"\n'
        'echo 9 > "$run/checkpoints/evolution_checkpoint_gen_9.json"; sleep 2\n'
        'echo 10 > "$run/checkpoints/evolution_checkpoint_gen_10.json"\n'
        'echo 1 >> "$run/generations.jsonl"; exit 5\n'
    )
    (fake / "python3").chmod(0o755)
    mirror, run = tmp_path / "mirror", tmp_path / "run"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "MIRROR_EVERY": "0.1"}
    started = subprocess.Popen(
        ["bash", str(ROOT / "bench" / "run_mirrored.sh"), str(mirror), "x.yaml", "--output-dir", str(run)],
        env=env,
    )
    deadline = time.monotonic() + 15
    while not (mirror / "generations.jsonl").exists():
        assert time.monotonic() < deadline, "nothing mirrored while the run ran"
        time.sleep(0.2)
    assert (mirror / "generations.jsonl").read_text() == "0\n" and started.poll() is None
    assert started.wait(timeout=60) == 5
    assert (mirror / "generations.jsonl").read_text() == "0\n1\n"
    assert [p.name for p in (mirror / "checkpoints").iterdir()] == ["evolution_checkpoint_gen_10.json"]
    missing = _run_mirrored_without_output_dir(tmp_path)
    assert missing.returncode == 2 and "needs --output-dir" in missing.stderr


def _run_mirrored_without_output_dir(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "run_mirrored.sh"), str(tmp_path / "m"), "x.yaml"],
        capture_output=True,
        text=True,
    )
