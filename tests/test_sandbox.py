"""The code sandbox: hostile programs fail and leave the host, this test process and its files untouched,
and tests run apart from the program pass only when they ran to their end.

Every hostile program first prints its uid (unique to the call), so each test can check afterwards that no
process of that uid (or of its test process's) is left, zombies included.
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
from unittest import mock

import pytest

from evoforge.evaluate import sandbox, seccomp
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
    assert result.returncode != 0
    assert processes_of(uid) == processes_of(uid + sandbox._UID_SPAN) == []


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
    assert result.returncode == 0, result.stderr
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
    assert "PermissionError: [Errno 1] Operation not permitted" in result.stderr  # the seccomp filter
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
    """Without root: no network (the seccomp filter), leftover processes contained (user namespace), writes not."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert run_python("print('ok')").stdout == "ok\n"
    assert (
        "Operation not permitted"
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
    assert result.returncode == 0 and result.duration_s < 2.0
    assert named(marker) == []
    target = tmp_path / "written-by-fallback"
    assert run_python(f"open({str(target)!r}, 'w').write('x')").returncode == 0
    assert target.exists()  # not contained: the program writes as the calling user


# ---------------------------------------------------------------------- sockets (the seccomp filter)


def test_no_connection_to_a_world_writable_unix_socket_of_the_host(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    path = tmp_path / "open.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        path.chmod(0o777)
        server.listen()
        result, uid = run(
            f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(path)!r})\nprint('sent')"
        )
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()
    assert "PermissionError: [Errno 1] Operation not permitted" in result.stderr
    assert "sent" not in result.stdout
    assert_contained(result, uid)


@pytest.mark.parametrize(
    "call",
    [
        "socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)",
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM)",  # no network even without a namespace
        "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)",
        "socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)",
        "socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)",
        "socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)",
        "socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)",  # its sendto() could address a host path
    ],
)
def test_sockets_that_could_leave_the_namespace_cannot_be_opened(call: str) -> None:
    result = run_python(f"import socket\n{call}")
    assert result.returncode == 1 and "Operation not permitted" in result.stderr


def test_anonymous_socket_pairs_and_asyncio_still_work() -> None:
    source = """
    import asyncio, socket
    a, b = socket.socketpair()
    a.sendall(b"ping")
    async def answer():
        return b.recv(4)
    print(asyncio.run(answer()))
    """
    result = run_python(textwrap.dedent(source))
    assert (result.returncode, result.stdout) == (0, "b'ping'\n"), result.stderr


def test_no_filter_for_an_unknown_machine_is_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert seccomp.socket_filter("riscv64") is None
    monkeypatch.setattr(sandbox, "_FILTER", None)
    monkeypatch.setattr(sandbox, "_warned", set())
    assert run_python("import socket\nsocket.socket(socket.AF_UNIX)").returncode == 0
    assert "no seccomp filter" in caplog.text


# ---------------------------------------------------------------------- tests, apart from the program

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate('a', 'b') == 'ab'\n"
ADD_TESTS += "\ncheck(add)\n"


def test_tests_pass_only_once_they_ran_to_their_end() -> None:
    assert run_python(ADD, tests=ADD_TESTS) == SandboxResult(True, None, False, "", "", mock.ANY)
    wrong = run_python(ADD.replace("+", "-"), tests=ADD_TESTS)
    assert not wrong.passed
    assert 'File "tests.py", line 2, in check\n    assert candidate(2, 3) == 5\n' in wrong.stderr
    assert wrong.stderr.endswith("\nAssertionError\n")
    assert not run_python(ADD, tests=ADD_TESTS.replace("add)", "sub)")).passed  # NameError: no such function


def test_the_programs_output_is_kept_when_its_tests_end_it() -> None:
    program = "print('loaded')\ndef add(a, b):\n    print('adding', a, b)\n    return a + b\n"
    result = run_python(program, tests="print('testing')\nassert add(1, 2) == 3\n")
    assert result.passed and result.stdout == "loaded\nadding 1 2\ntesting\n"  # the tests' own at their end


def test_an_exit_before_the_tests_ran_says_so() -> None:
    result = run_python(ADD + "exit()", tests=ADD_TESTS)
    assert (result.passed, result.returncode) == (False, 0)
    assert result.stderr.endswith("[sandbox: the program exited with status 0 before its tests finished]")


VALUES = [  # as source: each crosses to the program and back
    "None",
    "True",
    "0",
    "-(10**5000)",  # past int's default digit limit for str()
    "0.1",
    "-0.0",
    "float('inf')",
    "-float('inf')",
    "2 + 3j",
    "'naïve \\ud800 \\n'",
    "b'\\x00\\xff'",
    "[1, [2.5, 'x']]",
    "(1, (2,), ())",
    "{1: 'a', (2, 3): [4], 'k': {'n': None}}",
    "{1, 2}",
    "frozenset({'a'})",
]


def test_values_cross_between_program_and_tests_exactly() -> None:
    program = """
    def echo(x):
        return x

    def fail(kind):
        raise {"builtin": ValueError, "own": type("Own", (Exception,), {})}[kind]("why")
    """
    tests = f"""
    for value in [{", ".join(VALUES)}]:
        back = echo(value)
        assert back == value and type(back) is type(value) and str(back) == str(value), (value, back)

    assert str(echo(float("nan"))) == "nan"

    def raised(call, *args):
        try:
            call(*args)
        except Exception as exc:
            return type(exc), str(exc)

    assert raised(fail, "builtin") == (ValueError, "why")
    assert raised(fail, "own") == (RuntimeError, "Own: why")  # not a builtin type: named in a RuntimeError
    assert raised(echo, echo)[0] is TypeError  # a function is not data
    print("all crossed")
    """
    result = run_python(textwrap.dedent(program), tests=textwrap.dedent(tests))
    assert result.passed and result.stdout == "all crossed\n", result.stderr


def test_no_object_of_the_program_reaches_the_tests() -> None:
    """An object equal to everything, or a builtin the program rebinds, does not answer the tests' asserts."""
    program = """
    import builtins
    builtins.abs = lambda x: 0
    def abs(x):
        return 0
    class Yes:
        def __eq__(self, other):
            return True
    def add(a, b):
        return Yes()
    """
    tests = "assert abs(-2) == 2\nassert add(1, 2) == 3\n"
    result = run_python(textwrap.dedent(program), tests=tests)
    assert not result.passed
    assert result.stderr.rstrip().endswith(
        "TypeError: a Yes cannot pass between the program and its tests (plain data only)"
    )
    assert run_python(textwrap.dedent(program).replace("Yes()", "a + b"), tests=tests).passed


def test_the_program_never_sees_its_tests() -> None:
    """No trace of the tests in its memory, fds, files or /proc: it cannot read the expected answers."""
    secret = uuid.uuid4().hex
    half, rest = secret[:16], secret[16:]  # the program never holds the whole secret
    program = f"""
    import ctypes, gc, os, re

    def holds(data):
        starts = [m.start() for m in re.finditer({half!r}.encode(), data)]
        return any(data[i + 16 : i + 32] == {rest!r}.encode() for i in starts)

    found = [type(o).__name__ for o in gc.get_objects() if holds(repr(o).encode(errors="replace"))]
    for fd in range(3, 64):
        try:
            blocking = os.get_blocking(fd)
        except OSError:
            continue
        os.set_blocking(fd, False)
        try:
            found += [f"fd {{fd}}"] if holds(os.read(fd, 1 << 20)) else []
        except OSError:
            pass
        os.set_blocking(fd, blocking)  # as it was: its own link to the tests must keep working
    found += [name for name in os.listdir() if holds(open(name, "rb").read())]
    for pid in [p for p in os.listdir("/proc") if p.isdigit()]:
        for what in ["cmdline", "environ"]:
            try:
                found += [f"{{pid}}/{{what}}"] if holds(open(f"/proc/{{pid}}/{{what}}", "rb").read()) else []
            except OSError:  # another uid's environ
                pass
    for line in open("/proc/self/maps"):
        span, perms = line.split()[:2]
        if perms.startswith("rw"):
            start, end = (int(x, 16) for x in span.split("-"))
            found += [line.strip()] if holds(ctypes.string_at(start, end - start)) else []

    def report():
        return found
    """
    tests = f"# {secret}\nassert report() == [], report()\n"
    result = run_python(textwrap.dedent(program), tests=tests, timeout_s=20)
    assert result.passed, result.stderr
    # The search itself works: with the secret in its own source, the program finds it.
    leaked = textwrap.dedent(program).replace("def report", f"LEAK = {secret!r}\ndef report")
    assert "AssertionError" in run_python(leaked, tests=tests, timeout_s=20).stderr


def test_the_program_cannot_stop_trace_or_write_to_the_test_process() -> None:
    program = """
    import ctypes, os, signal
    libc = ctypes.CDLL(None)
    attacks = []
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]:
        for fd in range(64):
            try:
                os.write(os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK), b"pass 0\\n")
                attacks.append(f"wrote {pid}/{fd}")
            except OSError:
                pass
        if libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH
            attacks.append(f"traced {pid}")
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
                attacks.append(f"signalled {pid}")
            except OSError:
                pass

    def report():
        return attacks
    """
    result = run_python(textwrap.dedent(program), tests="assert report() == [], report()\n")
    assert result.passed, result.stderr


def test_a_verdict_needs_the_runs_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass line without the nonce only the test process reads (say, written by a fallback-mode program
    that reached the caller's status pipe through /proc) passes nothing."""
    communicate = sandbox._communicate

    def forged(*args: object) -> tuple[bytes, bytes, bytes, bool, bool]:
        stdout, stderr, status, timed_out, overflow = communicate(*args)  # type: ignore[arg-type]
        return stdout, stderr, status + b"pass " + b"0" * 32 + b"\n", timed_out, overflow

    monkeypatch.setattr(sandbox, "_communicate", forged)
    assert not run_python(ADD, tests="assert add(1, 1) == 3\n").passed
    assert run_python(ADD, tests="assert add(1, 1) == 2\n").passed


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
