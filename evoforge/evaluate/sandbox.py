"""Run model-written Python programs, each in a contained child process, and their tests apart from them.

Why so much machinery: code-scoring tasks execute whatever a candidate model wrote, so a program must not
reach the host (files, network, our secrets, our processes), must not take it down (memory, disk,
processes, output, time), and must not be able to pass its tests other than by computing the right values.
Each call starts `sys.executable -I -S` (isolated: no user site, no PYTHON* variables) with an empty
environment, in its own session, under a bootstrap (`sandbox_boot.py`) that sets up the containment, forks,
and runs the program in the same interpreter after `site.main()` (one interpreter start a program, and
site's pages belong to the program's process: copy-on-write faults at exit stay few).

When the parent is root (our CI and GPU machines), the bootstrap, before anything of the program runs:
- enters new mount, network, IPC and pid namespaces. The network has only a loopback that is down: every
  connect fails, 127.0.0.1 and abstract Unix sockets included. The program's process descends from a
  small init (pid 1, root, our code) that reports how it ended and then exits, and the kernel kills
  every process left in the namespace: grandchildren die when the program ends, setsid() or not, and
  none is left as a zombie. A fresh /proc shows only the namespace's processes;
- makes every mount read-only and nosuid, then mounts a fresh size-capped tmpfs on the working folder
  (and on /dev/shm): the only writable places, gone with the namespace;
- lays a tmpfs over directories the program could not traverse that shows only the Python install below
  them (Python under /root, which is 0700, on our machines), so the stdlib stays importable;
- sets rlimits (CPU seconds, address space = `memory_mb`, file size, open files, processes, no core)
  and oom_score_adj 1000: memory is bounded per process, so up to `_NPROC` x `memory_mb` in all, and
  should that exhaust the host, the OOM killer takes the program's processes first;
- drops to a uid/gid unique to the call (no passwd entry, no groups, no capabilities, no_new_privs): file
  permissions keep it from our files, it cannot signal our processes, and RLIMIT_NPROC counts only this
  program's processes, so concurrent calls do not share the limit;
- installs a seccomp filter (`seccomp.py`): no `socket()` of any family (no Unix-socket connection to a
  host path, no AF_VSOCK, no network), only anonymous AF_UNIX stream pairs.
The parent kills the process group (bootstrap and init) at the timeout, at an output overflow, or once
the run ended; the init's death ends the namespace.

Scoring (`tests`). The program's exit status proves nothing: it is the program's to choose (`exit()`,
`os._exit(0)` in an atexit handler, an excepthook, a signal, closing stdout...), and so is everything in its
address space: it can rebind builtins, patch modules, trace or skip the code that runs after it, read its
memory, fds, argv and files. So the tests never run there. The init's child forks the program's process and
becomes the test process, a second uid of the call's own and non-dumpable: the program can neither signal it
nor read or write its memory and fds. Only the test process receives the tests, on a pipe of its own, behind a
per-run nonce. It waits until the program ran to its end and sent the names of its functions, then runs the
tests (standard library only: no site-packages, no per-run `site` cost); a function call in the tests goes
over a pipe to the program's process, which runs it and sends the result back, plain data only (None, bool,
int, float, complex, str, bytes, list, tuple, dict, set, frozenset), decoded in the test process without
running any of the program's code: no object of the program's reaches the tests, so no `__eq__` of its own
answers an assertion. Names of the builtins stay the builtins' in the tests. Only once the last test returned
does the test process write `pass <nonce>` on the status pipe, which the program's process closed before the
program started: that line, and nothing else, makes `passed`. A program that ends, hangs or breaks the link
first fails. Still the program's: functions it defines that the tests call (the prompt's helpers too, which it
may redefine); arguments go to it as copies (it cannot change the tests' values), and the tests see only what
it returns or raises (builtin exception types; others as RuntimeError).

Not contained: the program can read world-readable files of the host. Root without CAP_SYS_ADMIN (e.g. a
default Docker container) cannot create the namespaces: `SandboxError`, no program runs uncontained.
When the parent is not root, there is no uid to drop to and no mount namespace: the program runs as the
calling user with the same rlimits, seccomp filter (so no network) and a fresh working folder, and can write
wherever that user can; leftover processes are contained where unprivileged user namespaces are allowed
(else not). Its own user namespace keeps it from our /proc entries; without one, it could write on our
status pipe, yet pass only if it also read the nonce from our memory (ptrace rules permitting). A warning
says so once.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from evoforge.errors import EvoforgeError
from evoforge.evaluate.seccomp import socket_filter

_log = logging.getLogger(__name__)

# Per-stream cap on captured output; a program that writes more is killed.
_OUTPUT_LIMIT = 256 * 1024
# RLIMIT_FSIZE and the size of the tmpfs working folder (and /dev/shm).
_FILE_MB = 16
_DISK_MB = 64
_NPROC = 32  # processes and threads
_NOFILE = 256
# Each call runs as a fresh uid drawn from this range (far above any account's uid); its test process as
# that uid + _UID_SPAN.
_UID_BASE = 0x5E000000
_UID_SPAN = 1 << 24
# How long to wait for output still in the pipes after the program ended.
_DRAIN_S = 1.0

# The bootstrap's command: its module imported by path (cached bytecode), the path dropped again.
_BOOT = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import sandbox_boot; del sys.path[0]; "
    "sandbox_boot.boot(sys.argv[1:])"
)
_FILTER = socket_filter(platform.machine())


class SandboxError(EvoforgeError):
    """The sandbox itself could not be set up (not a failure of the program): scores would be wrong."""


SETUP_RETRIES = 1
"""A failed setup is tried again once with a fresh bootstrap: with seven evoforge processes on one machine
(the H200 machine, 2026-12-04), one bootstrap failed its first import ("No module named 'sandbox_boot'"; cause
not found) and, raised through lm-eval, failed a whole evaluation. The program had not run, so running it
again is safe; a setup that fails twice is the SandboxError it was."""


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `stdout`/`stderr` hold at most `_OUTPUT_LIMIT` bytes each (decoded)."""

    passed: bool  # its tests ran to their end (the test process said so); never without tests
    returncode: int | None  # the program's exit status; -9 when killed here; None while it ran on
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float


_warned: set[str] = set()
_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


@contextmanager
def _call_uid() -> Iterator[int]:
    """A uid for one call, never one a concurrent call of this process holds (a shared uid would share
    RLIMIT_NPROC: one program's fork bomb would fail another's threads)."""
    with _uids_lock:
        while (uid := _UID_BASE + secrets.randbelow(_UID_SPAN)) in _uids_in_use:
            pass
        _uids_in_use.add(uid)
    try:
        yield uid
    finally:
        with _uids_lock:
            _uids_in_use.remove(uid)


def run_python(
    source: str, timeout_s: float = 5.0, memory_mb: int = 512, *, tests: str | None = None
) -> SandboxResult:
    """Run `source` as `__main__` in the sandbox, wall-clock `timeout_s`, address space `memory_mb` MiB.

    With `tests` (Python code; the program's functions by their names), `passed` says whether they ran to
    their end in the test process once the program had run (see the module docstring)."""
    if not sys.platform.startswith("linux"):
        raise SandboxError("the code sandbox needs Linux (namespaces, rlimits, pidfd)")
    privileged = os.geteuid() == 0
    if not privileged:
        _warn_once(
            "code sandbox runs without root: programs can write wherever this user can; leftover "
            "processes are contained only where unprivileged user namespaces are allowed"
        )
    if _FILTER is None:
        _warn_once(
            f"code sandbox has no seccomp filter for {platform.machine()}: programs can open any socket"
        )
    data = source.encode(errors="surrogatepass")  # a lone surrogate fails the program, not the caller
    test_data = None if tests is None else tests.encode(errors="surrogatepass")

    def attempt() -> SandboxResult:
        if not privileged:
            return _run(data, test_data, 0, timeout_s, memory_mb)
        with _call_uid() as uid:
            return _run(data, test_data, uid, timeout_s, memory_mb)

    for _ in range(SETUP_RETRIES):
        try:
            return attempt()
        except SandboxError:
            continue
    return attempt()


def _run(data: bytes, tests: bytes | None, uid: int, timeout_s: float, memory_mb: int) -> SandboxResult:
    """One bootstrap child running `data` (and `tests`) as `uid` (0: unprivileged fallback): `run_python`."""
    nonce = secrets.token_hex(16).encode()
    workdir = tempfile.mkdtemp(prefix="evoforge-sandbox-")
    stdin_r, stdin_w = os.pipe()
    status_r, status_w = os.pipe()
    ours = {stdin_w: data}  # our ends of the input pipes, and what to write there
    theirs = [stdin_r, status_w]
    tests_fd = -1
    if tests is not None:  # a pipe only the test process keeps
        tests_fd, tests_w = os.pipe()
        ours[tests_w] = nonce + b"\n" + tests
        theirs.append(tests_fd)
    # In the order `sandbox_boot.boot` reads them.
    limits = [math.ceil(timeout_s) + 1, memory_mb, _FILE_MB, _DISK_MB, _NPROC, _NOFILE]
    args = [status_w, tests_fd, uid, uid and uid + _UID_SPAN, *limits, (_FILTER or b"").hex()]
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, *map(str, args)],
            stdin=stdin_r,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env={},
            start_new_session=True,
            pass_fds=theirs[1:],
        )
    except BaseException:
        for fd in (*ours, status_r):
            os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    try:
        stdout, stderr, status, timed_out, overflow = _communicate(proc, ours, status_r, timeout_s)
    finally:
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()  # type: ignore[union-attr]
        os.close(status_r)
        shutil.rmtree(workdir, ignore_errors=True)
    duration = time.monotonic() - start
    lines = status.split(b"\n")
    if not (b"prog" in lines and (tests is None or b"tests" in lines)) and not timed_out:
        last_line = stderr.decode(errors="replace").strip().rsplit("\n", 1)[-1]
        raise SandboxError(f"code sandbox setup failed: {last_line or f'exit status {proc.returncode}'}")
    exits = [int(line[5:]) for line in lines if line.startswith(b"exit ")]
    returncode = exits[0] if exits else -9 if timed_out or overflow else None
    passed = tests is not None and b"pass " + nonce in lines
    note = ""
    if timed_out:
        note = f"\n[sandbox: killed after the {timeout_s:g} s timeout]"
    elif overflow:
        note = f"\n[sandbox: killed for writing more than {_OUTPUT_LIMIT} bytes]"
    elif tests is not None and not passed and returncode == 0:
        note = "\n[sandbox: the program exited with status 0 before its tests finished]"
    return SandboxResult(
        passed=passed,
        returncode=returncode,
        timed_out=timed_out,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace") + note,
        duration_s=duration,
    )


def run_many(
    sources: Sequence[str],
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    jobs: int | None = None,
    *,
    tests: Sequence[str | None] | None = None,
) -> list[SandboxResult]:
    """`run_python` on every source (with `tests[i]` if given), `jobs` at a time, results in order.

    Why: a task's programs spend their time in their own processes, so they run side by side, each with its
    own uids, working folder and namespaces (nothing shared but the host). `jobs` defaults to
    `EVOFORGE_SANDBOX_JOBS`, else the CPUs this process may use: one program a CPU, so a program that
    passes alone does not hit its wall-clock timeout here for want of CPU time.
    """
    if not sources:
        return []
    all_tests = [None] * len(sources) if tests is None else list(tests)
    if len(all_tests) != len(sources):
        raise ValueError(f"run_many: {len(sources)} sources but {len(all_tests)} tests")
    workers = min(_default_jobs() if jobs is None else jobs, len(sources))

    def run(source: str, source_tests: str | None) -> SandboxResult:
        return run_python(source, timeout_s, memory_mb, tests=source_tests)

    # A child's PR_SET_PDEATHSIG fires when the thread that started it ends: the pool's threads outlive
    # every run. A SandboxError from one run cancels the runs not started yet.
    with ThreadPoolExecutor(workers, thread_name_prefix="evoforge-sandbox") as pool:
        return list(pool.map(run, sources, all_tests))


def _default_jobs() -> int:
    value = os.environ.get("EVOFORGE_SANDBOX_JOBS")
    if value is None:
        return len(os.sched_getaffinity(0))
    if not value.isdigit() or int(value) < 1:
        raise SandboxError(f"EVOFORGE_SANDBOX_JOBS: expected a positive number of programs, got {value!r}")
    return int(value)


def _communicate(
    proc: subprocess.Popen[bytes], inputs: dict[int, bytes], status_fd: int, timeout_s: float
) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Feed the inputs (closing each once written), read the output up to the cap, stop at
    exit/timeout/overflow, kill all, drain.

    Returns (stdout, stderr, status lines, timed_out, overflow). The end is seen through a pidfd, not
    through EOF on the pipes, and whatever is left is killed at once: a grandchild holding the pipes open
    must not stretch the run.
    """
    assert proc.stdout and proc.stderr
    deadline = time.monotonic() + timeout_s
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_fd: bytearray()}
    pending = {fd: memoryview(data) for fd, data in inputs.items()}
    timed_out = exited = False

    def read(fd: int) -> None:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            sel.unregister(fd)
        else:  # keep one byte past the limit: that is how overflow shows
            out[fd] += chunk[: _OUTPUT_LIMIT + 1 - len(out[fd])]

    def write(fd: int) -> None:
        try:
            pending[fd] = pending[fd][os.write(fd, pending[fd][: 1 << 16]) :]
        except BrokenPipeError:
            pending[fd] = pending[fd][:0]
        if not pending[fd]:
            close(fd)

    def close(fd: int) -> None:
        sel.unregister(fd)
        os.close(fd)
        del pending[fd]

    def overflow() -> bool:
        return any(len(buf) > _OUTPUT_LIMIT for buf in out.values())

    with selectors.DefaultSelector() as sel:
        pidfd = os.pidfd_open(proc.pid)
        try:
            for fd in [*out, pidfd]:
                sel.register(fd, selectors.EVENT_READ)
            for fd in pending:
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_WRITE)
            while not (exited or overflow()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(remaining):
                    if key.fd == pidfd:
                        exited = True
                    elif key.fd in pending:
                        write(key.fd)
                    else:
                        read(key.fd)
        finally:
            # The bootstrap, its init and whatever stayed in the group; the init's death ends the pid
            # namespace. The main process is unreaped here, so its pid (the group id) is not reused.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            sel.unregister(pidfd)
            os.close(pidfd)
            for fd in list(pending):
                close(fd)
        drain_end = time.monotonic() + _DRAIN_S
        while sel.get_map() and (remaining := drain_end - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                read(key.fd)
    stdout, stderr, status = (bytes(buf[:_OUTPUT_LIMIT]) for buf in out.values())
    return stdout, stderr, status, timed_out, overflow()
