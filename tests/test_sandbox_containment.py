"""Hostile programs in the code sandbox fail and leave the host, this test process and its files untouched:
time, process, memory and output limits, a read-only system, no network or sockets out (seccomp)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from sandbox_support import SHOW_UID, left_behind, needs_root

from evoforge.evaluate import sandbox, seccomp
from evoforge.evaluate.sandbox import SandboxResult, run_python

REPO = Path(__file__).resolve().parents[1]

pytestmark = needs_root


def run(body: str, **kwargs: float) -> tuple[SandboxResult, int]:
    """Run `body` after the uid-printing prelude; return the result and the program's uid."""
    result = run_python(SHOW_UID + textwrap.dedent(body), **kwargs)
    return result, int(result.stdout.split("\n", 1)[0])


def assert_contained(result: SandboxResult, uid: int) -> None:
    assert result.returncode != 0
    assert left_behind(uid, uid + sandbox._UID_SPAN) == []


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
    assert left_behind(uid) == []


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
