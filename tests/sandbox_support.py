"""Support for the code-sandbox tests (tests/test_sandbox_*.py): the root-only marker, the uid-printing prelude
and the lookup of a uid's processes.

The code sandbox: hostile programs fail and leave the host, this test process and its files untouched,
and tests run apart from the program pass only when they ran to their end.

Every hostile program first prints its uid (unique to the call), so each test can check afterwards that no
process of that uid (or of its test process's) is left, zombies included.
"""

from __future__ import annotations

import os
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
