"""Run model-written Python programs, each in a contained child process, and report how they ended.

Why so much machinery: code-scoring tasks execute whatever a candidate model wrote, so a program must not
reach the host (files, network, our secrets, our processes) and must not take it down (memory, disk,
processes, output, time). Each call starts `sys.executable -I -S` (isolated: no user site, no PYTHON*
variables) with an empty environment, in its own session, under a short bootstrap that sets up the
containment, forks, and runs the program in the same interpreter after `site.main()` (one interpreter
start a program, and site's pages belong to the program's process: copy-on-write faults at exit stay few).

When the parent is root (our CI and GPU machines), the bootstrap, before anything of the program runs:
- enters new mount, network, IPC and pid namespaces. The network has only a loopback that is down: every
  connect fails, 127.0.0.1 and abstract Unix sockets included. The program's process is a child of a
  small init (pid 1, root, our code) that reports its exit status and then exits, and the kernel kills
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
  program's processes, so concurrent calls do not share the limit.
The parent kills the process group (bootstrap and init) at the timeout, at an output overflow, or once
the program ended; the init's death ends the namespace.

Not contained: the program can read world-readable files of the host. Root without CAP_SYS_ADMIN (e.g. a
default Docker container) cannot create the namespaces: `SandboxError`, no program runs uncontained.
When the parent is not root, there is no uid to drop to and no mount namespace: the program runs as the
calling user with the same rlimits and a fresh working folder, and can write wherever that user can; the
network and leftover processes are contained where unprivileged user namespaces are allowed (else not).
A warning says so once.
"""

from __future__ import annotations

import logging
import math
import os
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
from functools import partial

from evoforge.errors import EvoforgeError

_log = logging.getLogger(__name__)

# Per-stream cap on captured output; a program that writes more is killed.
_OUTPUT_LIMIT = 256 * 1024
# RLIMIT_FSIZE and the size of the tmpfs working folder (and /dev/shm).
_FILE_MB = 16
_DISK_MB = 64
_NPROC = 32  # processes and threads
_NOFILE = 256
# Each call runs as a fresh uid drawn from this range (far above any account's uid).
_UID_BASE = 0x5E000000
_UID_SPAN = 1 << 24
# How long to wait for output still in the pipes after the program ended.
_DRAIN_S = 1.0

# The bootstrap runs as `python -I -S -c _BOOT status_fd uid cpu_s memory_mb file_mb disk_mb nproc nofile`
# (uid 0: the parent is not root, fallback mode). It reads the program from stdin, enters the namespaces,
# forks an init (pid 1 of a new pid namespace, stays root there) that forks the program's process. Status
# lines on status_fd tell the parent what the exit code alone cannot: b"1" once the program's process is
# set up (so a setup failure is not mistaken for a failing program), b"=<code>" when it ended.
_BOOT = r"""
import atexit, ctypes, os, resource, stat, sys

def boot(status_fd, uid, cpu_s, memory_mb, file_mb, disk_mb, nproc, nofile):
    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret, what):
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src, target, fstype, flags, opts=None):
        enc = lambda s: None if s is None else s.encode()
        check(libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(opts)), f"mount {target}")

    check(libc.prctl(1, 9, 0, 0, 0), "pdeathsig")  # PR_SET_PDEATHSIG SIGKILL: die with the parent
    with open("/proc/self/oom_score_adj", "w") as f:  # inherited: the OOM killer takes us, not the host
        f.write("1000")
    source = sys.stdin.buffer.read()
    if uid:
        work = os.getcwd()
        check(libc.unshare(0x00020000 | 0x40000000 | 0x08000000 | 0x20000000), "unshare")  # NS NET IPC PID
        mount(None, "/", None, 1 << 14 | 1 << 18)  # MS_REC | MS_PRIVATE: nothing propagates back
        # Python's own files must stay readable once we are nobody in particular: over a directory that
        # others cannot traverse (e.g. /root), lay a tmpfs holding only the Python directories below it.
        plan = {}
        for path in {os.path.realpath(p) for p in [sys.prefix, sys.base_prefix, *sys.path] if p}:
            parts = path.split("/")
            for i in range(2, len(parts) if os.path.isdir(path) else 0):
                ancestor = "/".join(parts[:i])
                if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                    plan.setdefault(ancestor, set()).add(path)
                    break
        for hidden, paths in plan.items():
            fds = {p: os.open(p, os.O_PATH) for p in paths}
            mount("tmpfs", hidden, "tmpfs", 0, "size=1m,mode=0755")
            for p, fd in sorted(fds.items()):
                os.makedirs(p, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", p, None, 4096 | 1 << 14)  # MS_BIND | MS_REC
                os.close(fd)

        class MountAttr(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]

        attr = MountAttr(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
        # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, ...): every mount read-only, in one syscall.
        check(libc.syscall(ctypes.c_long(442), ctypes.c_long(-100), b"/", ctypes.c_long(0x8000),
                           ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr))), "mount_setattr")
        mount("tmpfs", work, "tmpfs", 0x2 | 0x4, f"size={disk_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
        if os.path.isdir("/dev/shm"):
            mount("tmpfs", "/dev/shm", "tmpfs", 0x2 | 0x4, f"size={disk_mb}m,nr_inodes=1024,mode=1777")
        os.chdir(work)
    else:
        libc.unshare(0x10000000 | 0x40000000 | 0x20000000)  # USER NET PID where allowed; the parent warned
    init = os.fork()
    if init:  # the bootstrap stays outside the new pid namespace until its init ends
        os.waitpid(init, 0)
        os._exit(0)
    # init: pid 1 of the namespace. When it exits, the kernel kills and reaps every process left in it.
    check(libc.prctl(1, 9, 0, 0, 0), "pdeathsig")
    if uid:
        mount("proc", "/proc", "proc", 0x1 | 0x2 | 0x4 | 0x8)  # this namespace's processes only, read-only
    prog = os.fork()
    while prog:
        pid, status = os.wait()  # reaps orphans too, until the program's own process ends
        if pid == prog:
            os.write(status_fd, b"=%d" % os.waitstatus_to_exitcode(status))
            os._exit(0)
    for res, value in [(resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory_mb << 20),
                       (resource.RLIMIT_FSIZE, file_mb << 20), (resource.RLIMIT_NOFILE, nofile),
                       (resource.RLIMIT_NPROC, nproc), (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
    if uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing
    import site  # only now (the interpreter ran with -S): its pages are this process's own, not copied

    site.main()
    with open("main.py", "wb") as f:
        f.write(source)
    # Run as `python main.py` would: in a fresh __main__ module (the bootstrap's own names stay out).
    main = type(sys)("__main__")
    main.__file__ = sys.argv[0] = "main.py"
    del sys.argv[1:]
    sys.modules["__main__"] = main
    os.write(status_fd, b"1")
    os.close(status_fd)
    try:
        exec(compile(source, "main.py", "exec", dont_inherit=True), vars(main))
        code = 0
    except SystemExit as exc:  # the interpreter's rules: None is 0, an int is itself, else printed and 1
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int | None):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:
        exc.with_traceback(exc.__traceback__.tb_next)  # from main.py down, as `python main.py` shows it
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    # Exit as multiprocessing's forked children do: threads joined, atexit run, streams flushed, then
    # os._exit. The interpreter's own teardown would fault in a copy of every inherited page, for nothing.
    if "threading" in sys.modules:
        sys.modules["threading"]._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            code = 120
    os._exit(code & 0xFF)

boot(*map(int, sys.argv[1:]))
"""


class SandboxError(EvoforgeError):
    """The sandbox itself could not be set up (not a failure of the program): scores would be wrong."""


@dataclass(frozen=True)
class SandboxResult:
    """How one program ended. `stdout`/`stderr` hold at most `_OUTPUT_LIMIT` bytes each (decoded)."""

    passed: bool  # exit code 0 and not timed out / killed
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    duration_s: float


_warned_unprivileged = False
_uids_in_use: set[int] = set()
_uids_lock = threading.Lock()


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


def run_python(source: str, timeout_s: float = 5.0, memory_mb: int = 512) -> SandboxResult:
    """Run `source` as `__main__` in the sandbox, wall-clock `timeout_s`, address space `memory_mb` MiB."""
    global _warned_unprivileged
    if not sys.platform.startswith("linux"):
        raise SandboxError("the code sandbox needs Linux (namespaces, rlimits, pidfd)")
    privileged = os.geteuid() == 0
    if not privileged and not _warned_unprivileged:
        _warned_unprivileged = True
        _log.warning(
            "code sandbox runs without root: programs can write wherever this user can; network and "
            "leftover processes are contained only where unprivileged user namespaces are allowed"
        )
    data = source.encode(errors="surrogatepass")  # a lone surrogate fails the program, not the caller
    if not privileged:
        return _run(data, 0, timeout_s, memory_mb)
    with _call_uid() as uid:
        return _run(data, uid, timeout_s, memory_mb)


def _run(data: bytes, uid: int, timeout_s: float, memory_mb: int) -> SandboxResult:
    """One bootstrap child running `data` as `uid` (0: unprivileged fallback); see `run_python`."""
    limits = [uid, math.ceil(timeout_s) + 1, memory_mb, _FILE_MB, _DISK_MB, _NPROC, _NOFILE]
    workdir = tempfile.mkdtemp(prefix="evoforge-sandbox-")
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _BOOT, str(status_w), *map(str, limits)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env={},
            start_new_session=True,
            pass_fds=(status_w,),
        )
    except BaseException:
        os.close(status_r)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    finally:
        os.close(status_w)
    try:
        stdout, stderr, status, timed_out, overflow = _communicate(proc, data, status_r, timeout_s)
    finally:
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()  # type: ignore[union-attr]
        os.close(status_r)
        shutil.rmtree(workdir, ignore_errors=True)
    duration = time.monotonic() - start
    if not status.startswith(b"1") and not timed_out:
        last_line = stderr.decode(errors="replace").strip().rsplit("\n", 1)[-1]
        raise SandboxError(f"code sandbox setup failed: {last_line or f'exit status {proc.returncode}'}")
    returncode = int(status[2:]) if status.startswith(b"1=") else proc.returncode
    note = ""
    if timed_out:
        note = f"\n[sandbox: killed after the {timeout_s:g} s timeout]"
    elif overflow:
        note = f"\n[sandbox: killed for writing more than {_OUTPUT_LIMIT} bytes]"
    return SandboxResult(
        passed=returncode == 0 and not timed_out and not overflow,
        returncode=returncode,
        timed_out=timed_out,
        stdout=stdout.decode(errors="replace"),
        stderr=stderr.decode(errors="replace") + note,
        duration_s=duration,
    )


def run_many(
    sources: Sequence[str], timeout_s: float = 5.0, memory_mb: int = 512, jobs: int | None = None
) -> list[SandboxResult]:
    """`run_python` on every source, `jobs` at a time, results in the sources' order.

    Why: a task's programs spend their time in their own processes, so they run side by side, each with its
    own uid, working folder and namespaces (nothing shared but the host). `jobs` defaults to
    `EVOFORGE_SANDBOX_JOBS`, else the CPUs this process may use: one program a CPU, so a program that
    passes alone does not hit its wall-clock timeout here for want of CPU time.
    """
    if not sources:
        return []
    workers = min(_default_jobs() if jobs is None else jobs, len(sources))
    # A child's PR_SET_PDEATHSIG fires when the thread that started it ends: the pool's threads outlive
    # every run. A SandboxError from one run cancels the runs not started yet.
    with ThreadPoolExecutor(workers, thread_name_prefix="evoforge-sandbox") as pool:
        return list(pool.map(partial(run_python, timeout_s=timeout_s, memory_mb=memory_mb), sources))


def _default_jobs() -> int:
    value = os.environ.get("EVOFORGE_SANDBOX_JOBS")
    if value is None:
        return len(os.sched_getaffinity(0))
    if not value.isdigit() or int(value) < 1:
        raise SandboxError(f"EVOFORGE_SANDBOX_JOBS: expected a positive number of programs, got {value!r}")
    return int(value)


def _communicate(
    proc: subprocess.Popen[bytes], data: bytes, status_fd: int, timeout_s: float
) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Feed the program, read its output up to the cap, stop at exit/timeout/overflow, kill all, drain.

    Returns (stdout, stderr, status lines, timed_out, overflow). The end is seen through a pidfd, not
    through EOF on the pipes, and whatever is left is killed at once: a grandchild holding the pipes open
    must not stretch the run.
    """
    assert proc.stdin and proc.stdout and proc.stderr
    deadline = time.monotonic() + timeout_s
    out = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_fd: bytearray()}
    stdin = proc.stdin.fileno()
    os.set_blocking(stdin, False)
    pending = memoryview(data)
    timed_out = exited = False

    def read(fd: int) -> None:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            sel.unregister(fd)
        else:  # keep one byte past the limit: that is how overflow shows
            out[fd] += chunk[: _OUTPUT_LIMIT + 1 - len(out[fd])]

    def overflow() -> bool:
        return any(len(buf) > _OUTPUT_LIMIT for buf in out.values())

    with selectors.DefaultSelector() as sel:
        pidfd = os.pidfd_open(proc.pid)
        try:
            for fd in [*out, pidfd]:
                sel.register(fd, selectors.EVENT_READ)
            sel.register(stdin, selectors.EVENT_WRITE)
            while not (exited or overflow()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                for key, _ in sel.select(remaining):
                    if key.fd == pidfd:
                        exited = True
                    elif key.fd == stdin:
                        try:
                            pending = pending[os.write(stdin, pending[: 1 << 16]) :]
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            sel.unregister(stdin)
                            proc.stdin.close()
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
        if not proc.stdin.closed:
            sel.unregister(stdin)
        drain_end = time.monotonic() + _DRAIN_S
        while sel.get_map() and (remaining := drain_end - time.monotonic()) > 0:
            for key, _ in sel.select(remaining):
                read(key.fd)
    stdout, stderr, status = (bytes(buf[:_OUTPUT_LIMIT]) for buf in out.values())
    return stdout, stderr, status, timed_out, overflow()
