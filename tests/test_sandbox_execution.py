"""The code sandbox runs a program as `python main.py` would (output, exit status, stdlib, site-packages,
multiprocessing), many side by side each ending as it does alone; a setup that fails raises, never scores."""

from __future__ import annotations

import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pytest
from sandbox_support import SHOW_UID, left_behind, needs_root

from evoforge.evaluate import sandbox
from evoforge.evaluate.sandbox import SandboxError, SandboxResult, run_many, run_python

pytestmark = needs_root


def test_correct_program_runs_with_stdout_and_stdlib() -> None:
    """Without tests nothing passes: an exit status proves nothing."""
    result = run_python(
        "import json, math, decimal\nprint(json.dumps([math.isqrt(49), str(decimal.Decimal(1) / 4)]))"
    )
    assert result == SandboxResult(False, 0, False, '[7, "0.25"]\n', "", result.duration_s)
    assert result.duration_s < 5


def test_program_runs_unprivileged() -> None:
    source = """
    import os
    assert os.getuid() == os.geteuid() == os.getgid() > 0 and os.getgroups() == []
    assert "CapEff:\\t0000000000000000" in open("/proc/self/status").read()
    assert "NoNewPrivs:\\t1" in open("/proc/self/status").read()
    assert "Seccomp:\\t2" in open("/proc/self/status").read()  # a filter is on
    assert open("/proc/self/oom_score_adj").read() == "1000\\n"
    assert os.getppid() == 1 and sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) == [1, os.getpid()]
    """
    result = run_python(textwrap.dedent(source))
    assert result.returncode == 0, result.stderr


def test_large_source_and_empty_stdin() -> None:
    result = run_python(f"x = {'a' * 300_000!r}\nprint(len(x))\ninput()")
    assert result.stdout == "300000\n" and "EOFError" in result.stderr


def test_site_packages_are_importable() -> None:
    assert run_python("import numpy\nassert numpy.arange(4).sum() == 6").returncode == 0


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
    assert (result.returncode, result.stdout) == (0, "[1, 2]\n"), result.stderr


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
        return r.returncode, r.timed_out, r.stdout.split("\n", 1)[-1], r.stderr.splitlines()[-1:]

    assert [outcome(r) for r in concurrent] == [outcome(r) for r in serial]
    assert [r.returncode == 0 for r in serial] == [
        True,
        False,
        False,
        False,
        False,
        False,
        False,
        False,
        True,
        False,
    ]
    assert [(r.returncode, r.timed_out) for r in serial[3:7]] == [
        (-9, False),
        (-11, False),
        (1, False),
        (-9, True),
    ]
    uids = [int(r.stdout.split("\n", 1)[0]) for r in concurrent if r.stdout]
    assert len(uids) == len(set(uids)) == len(ENDINGS) - 1  # all but the syntax error printed one
    assert left_behind(*uids) == []


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


def test_setup_failure_raises_instead_of_scoring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox, "_NOFILE", 3)  # the bootstrap cannot open main.py: no program ever runs
    with pytest.raises(SandboxError, match=r"setup failed.*Too many open files"):
        run_python("print('never')")


def test_a_failed_setup_is_tried_again_once_with_a_fresh_bootstrap(tmp_path: Path) -> None:
    """A bootstrap that dies before the program runs (seen once under heavy load) costs a retry, not the
    evaluation; one that keeps dying is still the SandboxError it was."""
    flag = tmp_path / "failed-once"
    flaky = f"import os, sys\nif not os.path.exists({str(flag)!r}):\n    open({str(flag)!r}, 'w').close(); sys.exit('boom')\n"
    with mock.patch.object(sandbox, "_BOOT", flaky + sandbox._BOOT.replace("; ", "\n")):
        result = run_python("print('ran')")
    assert flag.exists() and result.returncode == 0 and result.stdout.strip() == "ran"
    with mock.patch.object(sandbox, "_BOOT", "import sys; sys.exit('setup always fails')"):
        with pytest.raises(SandboxError, match="setup always fails"):
            run_python("print('never')")
