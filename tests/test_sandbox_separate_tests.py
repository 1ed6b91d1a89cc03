"""Tests run apart from the program in the code sandbox: they pass only once they ran to their end, only
plain data crosses between the two, and the program can neither read nor tamper with its tests."""

from __future__ import annotations

import textwrap
import uuid
from unittest import mock

import pytest
from sandbox_support import needs_root

from evoforge.evaluate import sandbox
from evoforge.evaluate.sandbox import SandboxResult, run_python

pytestmark = needs_root


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
