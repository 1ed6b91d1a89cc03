"""The code sandbox: hostile programs fail and leave the host, this test process and its files untouched.

Every hostile program first prints its uid (unique to the call), so each test can check afterwards that no
process of that uid is left, zombies included.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from evoforge.evaluate import sandbox
from evoforge.evaluate.sandbox import SandboxError, SandboxResult, run_many, run_python

REPO = Path(__file__).resolve().parents[1]
SHOW_UID = "import os, sys\nprint(os.getuid(), flush=True)\n"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the contained mode needs root (as in CI)")


def run(body: str, **kwargs: float) -> tuple[SandboxResult, int]:
    """Run `body` after the uid-printing prelude; return the result and the program's uid."""
    result = run_python(SHOW_UID + textwrap.dedent(body), **kwargs)
    return result, int(result.stdout.split("\n", 1)[0])


def processes_of(uid: int) -> list[int]:
    """Pids of every process (zombies too) whose real, effective or saved uid is `uid`."""
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = Path(f"/proc/{name}/status").read_text()
        except OSError:
            continue
        uids = next(line.split()[1:4] for line in status.splitlines() if line.startswith("Uid:"))
        if str(uid) in uids:
            pids.append(int(name))
    return pids


def assert_contained(result: SandboxResult, uid: int) -> None:
    assert not result.passed
    assert processes_of(uid) == []


def test_correct_program_passes_with_stdout_and_stdlib() -> None:
    result = run_python(
        "import json, math, decimal\nprint(json.dumps([math.isqrt(49), str(decimal.Decimal(1) / 4)]))"
    )
    assert result == SandboxResult(True, 0, False, '[7, "0.25"]\n', "", result.duration_s)
    assert result.duration_s < 5


def test_program_runs_unprivileged() -> None:
    source = """
    import os
    assert os.getuid() == os.geteuid() == os.getgid() > 0 and os.getgroups() == []
    assert "CapEff:\\t0000000000000000" in open("/proc/self/status").read()
    assert "NoNewPrivs:\\t1" in open("/proc/self/status").read()
    assert open("/proc/self/oom_score_adj").read() == "1000\\n"
    assert os.getppid() == 1 and sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()]
    """
    result = run_python(textwrap.dedent(source))
    assert result.passed, result.stderr


def test_large_source_and_empty_stdin() -> None:
    result = run_python(f"x = {'a' * 300_000!r}\nprint(len(x))\ninput()")
    assert result.stdout == "300000\n" and "EOFError" in result.stderr


def test_site_packages_are_importable() -> None:
    assert run_python("import numpy\nassert numpy.arange(4).sum() == 6").passed


@pytest.mark.parametrize(
    ("source", "returncode", "stderr"),
    [
        ("assert sorted([3, 1]) == [3, 1], 'unsorted'", 1, "AssertionError: unsorted"),
        ("import sys\nsys.exit(3)", 3, ""),
        ("import sys\nsys.exit('bad input')", 1, "bad input"),
        ("def f(:\n    pass", 1, "SyntaxError"),
        ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", -9, ""),
    ],
)
def test_failures_report_returncode_and_stderr(source: str, returncode: int, stderr: str) -> None:
    result = run_python(source)
    assert (result.passed, result.returncode, result.timed_out) == (False, returncode, False)
    assert stderr in result.stderr


def test_exits_as_python_main_py_would() -> None:
    """Threads are joined, atexit runs, output is flushed, tracebacks start at main.py."""
    source = """
    import atexit, sys, threading, time
    atexit.register(print, "atexit ran")
    threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()
    sys.stdout.write("no newline; ")
    def check():
        assert 1 == 2, "wrong"
    check()
    """
    result = run_python(textwrap.dedent(source))
    assert (result.returncode, result.stdout) == (1, "no newline; thread done\natexit ran\n")
    assert result.stderr.startswith(
        'Traceback (most recent call last):\n  File "main.py", line 8, in <module>'
    )
    assert result.stderr.endswith("AssertionError: wrong\n")


def test_multiprocessing_works_inside() -> None:
    source = "from multiprocessing import Pool\nwith Pool(2) as p:\n    print(p.map(abs, [-1, -2]))"
    result = run_python(source, timeout_s=10)
    assert (result.passed, result.stdout) == (True, "[1, 2]\n"), result.stderr


def test_concurrent_calls_from_threads() -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * 2)"), range(8)))
    assert [r.stdout for r in results] == [f"{i * 2}\n" for i in range(8)]


# Every way a program ends, each printing its uid first: run side by side, each must end as it does alone.
ENDINGS = [
    "print('ok')",
    "assert sorted([3, 1]) == [3, 1], 'unsorted'",
    "raise SystemExit(3)",
    "import signal\nos.kill(os.getpid(), signal.SIGKILL)",
    "import ctypes\nctypes.string_at(0)",  # segfault
    "def f(:\n    pass",  # a syntax error: nothing runs, not even the uid line
    "while True:\n    pass",
    "x = bytearray(10 << 30)",
    "import time\ntime.sleep(0.3)\nprint('slept')",
    "sys.stdout.write('x' * (1 << 20))",
]


def test_many_programs_end_as_each_does_alone() -> None:
    """Identical outcomes serial and concurrent, results in order, a distinct uid each, nothing left over."""
    sources = [SHOW_UID + body for body in ENDINGS]
    serial = [run_python(s, timeout_s=1.0) for s in sources]
    concurrent = run_many(sources, timeout_s=1.0, jobs=len(sources))

    def outcome(r: SandboxResult) -> tuple[object, ...]:
        return r.passed, r.returncode, r.timed_out, r.stdout.split("\n", 1)[-1], r.stderr.splitlines()[-1:]

    assert [outcome(r) for r in concurrent] == [outcome(r) for r in serial]
    assert [r.passed for r in serial] == [True, False, False, False, False, False, False, False, True, False]
    assert [(r.returncode, r.timed_out) for r in serial[3:7]] == [
        (-9, False),
        (-11, False),
        (1, False),
        (-9, True),
    ]
    uids = [int(r.stdout.split("\n", 1)[0]) for r in concurrent if r.stdout]
    assert len(uids) == len(set(uids)) == len(ENDINGS) - 1  # all but the syntax error printed one
    assert all(processes_of(uid) == [] for uid in uids)


def test_runs_overlap() -> None:
    """N programs sleeping 0.5 s take about 0.5 s side by side, not N x 0.5 s (sleeping needs no CPU)."""
    start = time.monotonic()
    results = run_many([f"import time\ntime.sleep(0.5)\nprint({i})" for i in range(8)], jobs=8)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(8)]
    assert time.monotonic() - start < 0.5 * 8 / 2


def test_concurrent_calls_never_share_a_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even when the random draw repeats itself, a call never gets a uid a running call holds."""
    draws = iter([7, 7, 7, 7, 9, 9, 9, 11])
    monkeypatch.setattr(sandbox.secrets, "randbelow", lambda _: next(draws))
    results = run_many([SHOW_UID + "import time\ntime.sleep(0.5)"] * 3, jobs=3)
    assert sorted(int(r.stdout) for r in results) == [sandbox._UID_BASE + n for n in (7, 9, 11)]


def test_jobs_default_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOFORGE_SANDBOX_JOBS", "1")
    start = time.monotonic()
    run_many(["import time\ntime.sleep(0.3)"] * 3)
    assert time.monotonic() - start >= 0.9  # one at a time
    monkeypatch.setenv("EVOFORGE_SANDBOX_JOBS", "all")
    with pytest.raises(SandboxError, match="EVOFORGE_SANDBOX_JOBS: expected a positive number"):
        run_many(["print(1)"])


def test_infinite_loop_is_killed_at_the_timeout() -> None:
    result, uid = run("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and result.returncode == -9
    assert 1.0 <= result.duration_s < 2.0
    assert "timeout" in result.stderr
    assert_contained(result, uid)


@pytest.mark.parametrize(
    "body",
    [
        "while True:\n    os.fork()",
        # Forks that survive errors and leave the process group: the pid namespace still ends them.
        """
        import time
        while True:
            try:
                if os.fork() == 0:
                    os.setsid()
            except OSError:
                time.sleep(0.01)
        """,
    ],
    ids=["plain", "setsid"],
)
def test_fork_bomb_is_bounded_and_leaves_nothing(body: str) -> None:
    result, uid = run(body, timeout_s=2.0)
    assert result.duration_s < 3.0
    if "setsid" not in body:  # RLIMIT_NPROC stops it long before the timeout
        assert not result.timed_out and "Resource temporarily unavailable" in result.stderr
    assert_contained(result, uid)


def test_grandchild_holding_the_pipes_is_killed_when_main_ends() -> None:
    result, uid = run(
        "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(60)\nprint('done')"
    )
    assert result.stdout.endswith("done\n") and result.duration_s < 2.0
    assert processes_of(uid) == []


def test_program_dies_with_a_killed_caller(tmp_path: Path) -> None:
    marker = f"evo{uuid.uuid4().hex[:12]}"  # the program's name (comm), to find it from here
    program = f"import ctypes, time\nctypes.CDLL(None).prctl(15, b'{marker}')\ntime.sleep(60)"
    call = f"from evoforge.evaluate.sandbox import run_python\nrun_python({program!r}, 60)"
    # A killed caller cannot remove its (empty) working folder: let it be one under tmp_path.
    caller = subprocess.Popen([sys.executable, "-c", call], env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        assert wait_until(lambda: named(marker), 20), "the program never started"
    finally:
        caller.kill()
        caller.wait()
    assert wait_until(lambda: not named(marker), 2)


def wait_until(condition: Callable[[], object], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def named(comm: str) -> list[str]:
    """Pids of the processes whose name (as PR_SET_NAME sets it) is `comm`."""
    return [p for p in os.listdir("/proc") if p.isdigit() and read_comm(p) == comm]


def read_comm(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def test_ten_gigabytes_fail_with_memory_error() -> None:
    result, uid = run("x = bytearray(10 << 30)")
    assert "MemoryError" in result.stderr
    assert_contained(result, uid)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_gigabytes_of_output_are_capped_and_killed(stream: str) -> None:
    result, uid = run(f"chunk = 'x' * (1 << 20)\nfor _ in range(4096):\n    sys.{stream}.write(chunk)")
    assert len(getattr(result, stream)) <= sandbox._OUTPUT_LIMIT + 100  # + the sandbox's note on stderr
    assert "killed for writing more than" in result.stderr
    assert result.duration_s < 5
    assert_contained(result, uid)


@pytest.mark.parametrize("where", ["test tmp_path", "repo", "/tmp", "/var/tmp"])
def test_writing_outside_its_folder_fails(where: str, tmp_path: Path) -> None:
    name = f"evoforge-sandbox-escape-{uuid.uuid4().hex}"
    folder = {"test tmp_path": tmp_path, "repo": REPO, "/tmp": Path("/tmp"), "/var/tmp": Path("/var/tmp")}[
        where
    ]
    target = folder / name
    result, uid = run(f"open({str(target)!r}, 'w').write('pwned')")
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert not target.exists()
    assert_contained(result, uid)


def test_existing_files_cannot_be_changed(tmp_path: Path) -> None:
    ours = tmp_path / "ours.txt"
    ours.write_text("original")
    ours.chmod(0o666)  # even world-writable: the whole system is read-only to the program
    result, uid = run(f"open({str(ours)!r}, 'a').write('pwned')")
    assert ours.read_text() == "original"
    assert_contained(result, uid)


def test_own_folder_and_shm_are_private_and_gone_afterwards() -> None:
    name = f"evoforge-sandbox-{uuid.uuid4().hex}"
    source = f"""
    import pathlib
    pathlib.Path('note.txt').write_text('kept')
    assert pathlib.Path('note.txt').read_text() == 'kept'
    pathlib.Path('/dev/shm/{name}').write_text('shm')
    print(os.getcwd())
    """
    mounts = Path("/proc/self/mountinfo").read_text()
    result, _ = run(source)
    assert result.passed, result.stderr
    assert Path("/proc/self/mountinfo").read_text() == mounts  # its mounts never reach the host
    workdir = Path(result.stdout.split()[1])
    assert not workdir.exists()
    assert not Path(f"/dev/shm/{name}").exists()


def test_parent_environment_is_not_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"s3cret-{uuid.uuid4().hex}"
    monkeypatch.setenv("EVOFORGE_TEST_SECRET", secret)
    env_before = dict(os.environ)
    source = f"""
    print(dict(os.environ))
    print(open('/proc/{os.getpid()}/environ', 'rb').read())
    """
    result, uid = run(source)
    assert secret not in result.stdout + result.stderr
    assert "EVOFORGE_TEST_SECRET" not in result.stdout
    assert dict(os.environ) == env_before
    assert_contained(result, uid)


def test_network_connect_to_host_loopback_fails() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        result, uid = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    assert "Network is unreachable" in result.stderr
    assert_contained(result, uid)


@pytest.mark.parametrize(
    "attack",
    [
        "os.kill(os.getppid(), 9)",
        "os.killpg(os.getpgid(os.getppid()), 9)",
        "os.kill({test_pid}, 9)",
        "os.kill({sentinel_pid}, 9)",
        "os.kill(-1, 9)",
    ],
)
def test_killing_the_parent_or_our_processes_fails(attack: str) -> None:
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        result, uid = run(attack.format(test_pid=os.getpid(), sentinel_pid=sentinel.pid) + "\nprint('alive')")
        assert sentinel.poll() is None
    finally:
        sentinel.kill()
        sentinel.wait()
    assert "alive" not in result.stdout
    assert_contained(result, uid)


def test_setup_failure_raises_instead_of_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_NOFILE", 3)  # the bootstrap cannot open main.py: no program ever runs
    with pytest.raises(SandboxError, match=r"setup failed.*Too many open files"):
        run_python("print('never')")


def test_unprivileged_fallback_states_what_it_contains(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without root: network and leftover processes are contained (user namespace), writes are not."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_python("print('ok')").stdout == "ok\n"
    assert (
        "Network is unreachable"
        in run_python("import socket\nsocket.create_connection(('127.0.0.1', 9))").stderr
    )
    marker = f"evo{uuid.uuid4().hex[:12]}"  # the orphan's name (comm), to find it from here
    source = f"""
    import ctypes, os, time
    if os.fork() == 0:
        os.setsid()
        ctypes.CDLL(None).prctl(15, b"{marker}")  # PR_SET_NAME
        time.sleep(60)
    time.sleep(0.2)
    """
    result = run_python(textwrap.dedent(source))
    assert result.passed and result.duration_s < 2.0
    assert named(marker) == []
    target = tmp_path / "written-by-fallback"
    assert run_python(f"open({str(target)!r}, 'w').write('x')").passed
    assert target.exists()  # not contained: the program writes as the calling user
