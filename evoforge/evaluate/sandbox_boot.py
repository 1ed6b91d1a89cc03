"""The code sandbox's child side: the bootstrap, its init, the program's process and the test process.

`sandbox.py` starts `python -I -S`, imports this module by its path (its cached bytecode: no compiling
per run) and calls `boot` with the arguments it lists; it says why each step is there. Only the stdlib is
importable here (no site-packages before `site.main()`, so no evoforge), and each import costs every run:
values cross the link as JSON through json's C scanner, without the json package (whose `re` alone would
cost ~10 ms a run). The bootstrap reads the program from stdin, enters the namespaces and forks an init
(pid 1 of a new pid namespace, root there), whose child runs the program, or, when there are tests, forks
the program's process and becomes the test process. Status lines on `status_fd` tell the parent what exit
codes cannot: `prog` once the program's process is set up (a setup failure is not a failing program),
`tests` once the test process is, `exit <code>` when the program ended, `pass <nonce>` once the tests ran
to their end.
"""

import _json
import atexit
import builtins
import ctypes
import os
import resource
import stat
import sys

_libc = ctypes.CDLL(None, use_errno=True)
_FRAME = 1 << 26  # longest message between the test process and the program


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(what, *args):
    _check(_libc.prctl(*args, *[0] * (5 - len(args))), what)


def _mount(src, target, fstype, flags, opts=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(
        _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(opts)), f"mount {target}"
    )


def boot(argv):
    status_fd, tests_fd, uid, tester_uid, cpu_s, memory_mb, file_mb, disk_mb, nproc, nofile = map(
        int, argv[:10]
    )
    bpf = bytes.fromhex(argv[10])
    _prctl("pdeathsig", 1, 9)  # PR_SET_PDEATHSIG SIGKILL: die with the parent
    with open("/proc/self/oom_score_adj", "w") as f:  # inherited: the OOM killer takes us, not the host
        f.write("1000")
    source = sys.stdin.buffer.read()
    if uid:
        _contain(os.getcwd(), uid, disk_mb)
    else:
        _libc.unshare(0x10000000 | 0x40000000 | 0x20000000)  # USER NET PID where allowed; the parent warned
    init = os.fork()
    if init:  # the bootstrap stays outside the new pid namespace until its init ends
        os.waitpid(init, 0)
        os._exit(0)
    # init: pid 1 of the namespace. When it exits, the kernel kills and reaps every process left in it.
    _prctl("pdeathsig", 1, 9)
    if uid:
        _mount("proc", "/proc", "proc", 0x1 | 0x2 | 0x4 | 0x8)  # this namespace's processes only, read-only
    child = os.fork()
    if not child:
        for res, value in [
            (resource.RLIMIT_CPU, cpu_s),
            (resource.RLIMIT_AS, memory_mb << 20),
            (resource.RLIMIT_FSIZE, file_mb << 20),
            (resource.RLIMIT_NOFILE, nofile),
            (resource.RLIMIT_NPROC, nproc),
            (resource.RLIMIT_CORE, 0),
        ]:
            resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))
        if tests_fd < 0:
            _program(source, uid, bpf, status_fd, None)
        _split(source, uid, tester_uid, bpf, status_fd, tests_fd)
    if tests_fd >= 0:
        os.close(tests_fd)  # only the test process keeps the tests (and the nonce)
    while True:
        pid, status = os.wait()  # reaps orphans too, until our child ends
        if pid == child:
            if tests_fd < 0:  # with tests, the program is the test process's child: it reports
                os.write(status_fd, b"exit %d\n" % os.waitstatus_to_exitcode(status))
            os._exit(0)


def _contain(work, uid, disk_mb):
    """New mount, network, IPC and pid namespaces; every mount read-only; tmpfs on `work` and /dev/shm."""
    _check(_libc.unshare(0x00020000 | 0x40000000 | 0x08000000 | 0x20000000), "unshare")  # NS NET IPC PID
    _mount(None, "/", None, 1 << 14 | 1 << 18)  # MS_REC | MS_PRIVATE: nothing propagates back
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
        _mount("tmpfs", hidden, "tmpfs", 0, "size=1m,mode=0755")
        for p, fd in sorted(fds.items()):
            os.makedirs(p, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", p, None, 4096 | 1 << 14)  # MS_BIND | MS_REC
            os.close(fd)

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("set", "clr", "propagation", "userns_fd")]

    attr = MountAttr(0x1 | 0x2, 0, 0, 0)  # MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID
    # mount_setattr(AT_FDCWD, "/", AT_RECURSIVE, ...): every mount read-only, in one syscall.
    _check(
        _libc.syscall(
            ctypes.c_long(442),
            ctypes.c_long(-100),
            b"/",
            ctypes.c_long(0x8000),
            ctypes.byref(attr),
            ctypes.c_long(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
    )
    _mount("tmpfs", work, "tmpfs", 0x2 | 0x4, f"size={disk_mb}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", 0x2 | 0x4, f"size={disk_mb}m,nr_inodes=1024,mode=1777")
    os.chdir(work)


def _drop(uid, bpf):
    """Become `uid` (0: stay who we are, the unprivileged fallback), no new privileges, seccomp filter."""
    if uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    _prctl("no_new_privs", 38, 1)  # PR_SET_NO_NEW_PRIVS: setuid binaries give nothing; allows seccomp
    if bpf:

        class Prog(ctypes.Structure):
            _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

        _prctl("seccomp", 22, 2, ctypes.byref(Prog(len(bpf) // 8, bpf)))  # PR_SET_SECCOMP, MODE_FILTER


def _split(source, uid, tester_uid, bpf, status_fd, tests_fd):
    """Fork the program's process, linked by two pipes, and become the test process (never returns)."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    # PR_SET_DUMPABLE 0 before the fork: no moment when the program could read our memory or fds through
    # /proc or ptrace (it would need CAP_SYS_PTRACE; setuid alone would clear the flag too, but not as root).
    _prctl("dumpable", 4, 0)
    program = os.fork()
    if not program:
        for fd in (tests_fd, req_w, rep_r):
            os.close(fd)
        _program(source, uid, bpf, status_fd, (req_r, rep_w))
    for fd in (req_r, rep_w):
        os.close(fd)
    _tests(program, tester_uid, bpf, status_fd, tests_fd, req_w, rep_r)


def _program(source, uid, bpf, status_fd, link):
    """Run the program as `python main.py` would; with a link, then answer the tests' calls. Never returns."""
    _drop(uid, bpf)
    import site  # only now (the interpreter ran with -S): its pages are this process's own, not copied

    site.main()
    with open("main.py", "wb") as f:
        f.write(source)
    # Run as `python main.py` would: in a fresh __main__ module (the bootstrap's own names stay out).
    main = type(sys)("__main__")
    main.__file__ = sys.argv[0] = "main.py"
    del sys.argv[1:]
    sys.modules["__main__"] = main
    os.write(status_fd, b"prog\n")
    os.close(status_fd)
    if link:
        requests, replies = open(link[0], "rb"), open(link[1], "wb")
        if not requests.readline():  # the test process's go: its setup is done before ours can be touched
            os._exit(1)
    try:
        exec(compile(source, "main.py", "exec", dont_inherit=True), vars(main))
        if link:
            _serve(vars(main), requests, replies)
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


def _serve(namespace, requests, replies):
    """Answer the test process's calls with the program's functions, until it closes the link."""
    sys.set_int_max_str_digits(0)

    def send(line):
        for stream in (sys.stdout, sys.stderr):  # its output so far: the tests' end may end this process
            try:
                stream.flush()
            except Exception:
                pass
        replies.write(line.encode() + b"\n")
        replies.flush()

    send(dumps(["ready", [name for name, value in namespace.items() if callable(value)]]))
    for line in requests:
        name, args, kwargs = loads(line)
        try:
            reply = dumps(["ok", namespace[name](*args, **kwargs)])  # a result that is not data raises too
        except Exception as exc:
            reply = dumps(["raise", type(exc).__name__, str(exc)])
        send(reply)


def _tests(program, uid, bpf, status_fd, tests_fd, req_w, rep_r):
    """The test process: run the tests, the program's functions called through the link (never returns)."""
    _drop(uid, bpf)
    os.chdir("/")
    os.write(status_fd, b"tests\n")
    with open(tests_fd, "rb") as f:
        nonce, _, tests = f.read().partition(b"\n")
    sys.set_int_max_str_digits(0)
    link = _Link(req_w, rep_r)
    passed = False
    try:
        namespace = link.namespace()
        exec(compile(tests, "tests.py", "exec", dont_inherit=True), namespace)
        passed = not link.ended  # a test that swallowed the program's end has not seen the program answer
    except _ProgramEnded:
        pass  # its own output, or the parent's note, says how it ended
    except BaseException as exc:
        import linecache
        import traceback  # not sys.excepthook: it reads source lines from files, and tests.py is none

        text = tests.decode(errors="surrogateescape")
        linecache.cache["tests.py"] = (len(text), None, text.splitlines(True), "tests.py")
        traceback.print_exception(exc.with_traceback(exc.__traceback__.tb_next))
    if passed:
        os.write(status_fd, b"pass " + nonce + b"\n")
    elif link.ended:
        os.write(status_fd, b"exit %d\n" % os.waitstatus_to_exitcode(os.waitpid(program, 0)[1]))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0 if passed else 1)


class _ProgramEnded(BaseException):
    """The program closed its end of the link (it ended) before its tests finished: no test catches this."""


class _Link:
    """The test process's end of the link: calls go out and results come back, one JSON line each."""

    def __init__(self, req_fd, rep_fd):
        self.requests, self.replies = open(req_fd, "wb"), open(rep_fd, "rb")
        self.ended = False
        self._send([])  # the go: the program's process waits for it before running the program

    def namespace(self):
        """The tests' globals: a caller for each function the program defined, once it ran to its end.

        A name of the builtins stays the builtin's: a program that defines `abs` does not change the tests."""
        kind, names = self._receive()
        if kind != "ready":
            raise ValueError(f"the program sent {kind!r} instead of its names")
        keep = [n for n in names if isinstance(n, str) and n.isidentifier() and not hasattr(builtins, n)]
        calls = {name: self._caller(name) for name in keep if name[:2] != "__"}
        return {**calls, "__name__": "__main__", "__builtins__": builtins}

    def _caller(self, name):
        def call(*args, **kwargs):
            if self.ended:
                raise _ProgramEnded
            self._send([name, list(args), kwargs])
            reply = self._receive()
            if reply[0] == "ok":
                return reply[1]
            raise _exception(str(reply[1]), str(reply[2]))

        call.__name__ = call.__qualname__ = name
        return call

    def _send(self, message):
        line = dumps(message).encode() + b"\n"  # first: a value that is not data fails here, link intact
        try:
            self.requests.write(line)
            self.requests.flush()
        except BrokenPipeError:
            self.ended = True
            raise _ProgramEnded from None

    def _receive(self):
        line = self.replies.readline(_FRAME)
        if len(line) >= _FRAME:
            raise ValueError(f"the program's reply is over {_FRAME} bytes")
        if not line.endswith(b"\n"):
            self.ended = True
            raise _ProgramEnded
        return loads(line)


def _exception(name, message):
    """The exception a call raised in the program, as a builtin exception type if it is one."""
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        try:
            return kind(message)
        except Exception:  # a type that wants other arguments (UnicodeDecodeError)
            pass
    return RuntimeError(f"{name}: {message}")


# Values cross the link as JSON: lists, str, int, float, bool and None as themselves, other types tagged
# ({"tuple": [...]}; a dict as {"dict": [[key, value], ...]}): every JSON object is a tag.
_TAGS = {
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "dict": dict,
    "bytes": bytes.fromhex,
    "complex": lambda parts: complex(*parts),
}
_INF = float("inf")
_CONSTANTS = {"NaN": float("nan"), "Infinity": _INF, "-Infinity": -_INF}


def _tagged(obj):
    """A tagged value back: whatever the program sent, plain data or an exception."""
    ((tag, payload),) = obj.items()
    return _TAGS[tag](payload)


class _Decoding:
    """What json's C scanner reads from a decoder: strict strings, tags decoded, JSON's constants."""

    strict = True
    object_hook = staticmethod(_tagged)
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


_scan = _json.make_scanner(_Decoding())


def loads(line):
    """The value on one line of JSON (bytes): plain data, or ValueError (or what a tag raised)."""
    text = line.decode()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not a JSON value") from None
    if text[end:] != "\n":
        raise ValueError("not one JSON value on one line")
    return value


def dumps(value):
    """`value` as one line of JSON; plain data only (subclasses as their base type), else TypeError."""
    if value is None or value is True or value is False:
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        if value != value:
            return "NaN"
        return float.__repr__(value) if abs(value) < _INF else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value)
    if isinstance(value, list):
        return "[" + ",".join(map(dumps, value)) + "]"
    if isinstance(value, dict):
        return '{"dict":[' + ",".join(f"[{dumps(k)},{dumps(v)}]" for k, v in value.items()) + "]}"
    if isinstance(value, bytes):
        return f'{{"bytes":"{value.hex()}"}}'
    if isinstance(value, complex):
        return f'{{"complex":[{dumps(value.real)},{dumps(value.imag)}]}}'
    for kind in (tuple, set, frozenset):
        if isinstance(value, kind):
            return f'{{"{kind.__name__}":[' + ",".join(map(dumps, value)) + "]}"
    raise TypeError(
        f"a {type(value).__name__} cannot pass between the program and its tests (plain data only)"
    )
