"""Support for the code-sandbox tests (tests/test_sandbox_*.py): the root-only marker, the uid-printing prelude
and the lookup of a uid's processes.

The code sandbox: hostile programs fail and leave the host, this test process and its files untouched,
and tests run apart from the program pass only when they ran to their end.

Every hostile program first prints its uid (unique to the call), so each test can check afterwards that no
process of that uid (or of its test process's) is left, zombies included.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

SHOW_UID = "import os, sys\nprint(os.getuid(), flush=True)\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the contained mode needs root (as in CI)")


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


def left_behind(*uids: int, grace_s: float = 5.0) -> list[int]:
    """Pids of processes of `uids` still there after up to `grace_s`: when the sandbox's init dies the
    kernel kills and reaps the rest of its pid namespace, but not at once (a fork bomb's processes on a
    loaded 2-core machine: 4 still listed right after the run returned, 2026-12-06)."""
    deadline = time.monotonic() + grace_s
    while (pids := [pid for uid in uids for pid in processes_of(uid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return pids
