"""The committed search records (bench/records) reproduce recipes/demo/SEARCH.md's figures."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "bench" / "records" / "search-demo-2026-12-06.tar.gz"


def _search_proof(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "search_proof.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_records_reproduce_the_search_table_and_the_calibration(tmp_path: Path) -> None:
    with tarfile.open(RECORDS) as tar:
        tar.extractall(tmp_path, filter="data")
    table = _search_proof(tmp_path, "summarize", "proof/ga-42", "proof/cmaes-7")
    assert "Best specialist on held-out: model multilingual 0.2054" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0.3054 | -0.0029 [-0.0154, +0.0100] |" in rows["ga-42"]
    assert "| 0.3071 | -0.0012 [-0.0129, +0.0108] |" in rows["cmaes-7"]
    search_md = (ROOT / "recipes" / "demo" / "SEARCH.md").read_text()
    assert "| 0.3071 | −0.0012 [−0.0129, +0.0108] |" in search_md
    calibration = _search_proof(tmp_path, "calibration", "proof/ga-7")
    held_out = calibration.split("test (accuracy, held out)")[1]
    assert "| seed slerp-ties-frankenmerge | 0.490 | 0.260 | 0.083 | **0.400** | 0.3083 |" in held_out
    assert "| model multilingual | 0.270 | 0.057 | **0.100** | 0.395 | 0.2054 |" in held_out
