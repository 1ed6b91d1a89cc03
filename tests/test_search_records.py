"""The committed search records (bench/records) reproduce the figures of recipes/demo/SEARCH.md and
recipes/qwen2-1.5b/README.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "bench" / "records"


def _bench(script: str, cwd: Path, *args: str) -> str:
    """The stdout of `python bench/<script> args...` run in `cwd`."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def _search_proof(cwd: Path, *args: str) -> str:
    return _bench("search_proof.py", cwd, *args)


def _compare_runs(cwd: Path, *args: str) -> str:
    return _bench("compare_runs.py", cwd, *args)


def _extract(name: str, into: Path) -> None:
    with tarfile.open(RECORDS / name) as tar:
        tar.extractall(into, filter="data")


def test_records_reproduce_the_search_table_and_the_calibration(tmp_path: Path) -> None:
    _extract("search-demo-2026-12-06.tar.gz", tmp_path)
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


def test_qwen_records_reproduce_the_readme_run_table_and_calibration(tmp_path: Path) -> None:
    _extract("search-qwen2-1.5b-2026-12-06.tar.gz", tmp_path)
    readme = (ROOT / "recipes" / "qwen2-1.5b" / "README.md").read_text()
    table = _search_proof(tmp_path, "summarize", "proof/ga-42", "proof/ga-7", "proof/random-7")
    assert "Best specialist on held-out: model multilingual 0.7546" in table
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| 0.7729 | +0.0017 [-0.0092, +0.0117] | +0.0004 [-0.0108, +0.0108] |" in rows["ga-42"]
    assert "| 0.7688 | -0.0025 [-0.0146, +0.0092] | -0.0038 [-0.0163, +0.0083] |" in rows["ga-7"]
    assert "| 152 | 0.7987 → 0.8033 |" in rows["random-7"]
    assert "| 0.7729 | +0.0017 [−0.0092, +0.0117] | +0.0004 [−0.0108, +0.0108] |" in readme
    calibration = _search_proof(tmp_path, "calibration", "proof/ga-42")
    validation, held_out = calibration.split("test (accuracy, held out)")
    for row in (
        "| model structured | 0.713 | 0.691 | 0.620 | 0.996 | 0.7547 |",
        "| model qwen2.5-coder | 0.710 | 0.585 | 0.367 | 0.883 | 0.6363 |",
    ):
        assert row in validation and row in readme
    row = "| model multilingual | 0.745 | 0.640 | 0.633 | **1.000** | 0.7546 |"
    assert row in held_out and row in readme


def test_overlap_records_reproduce_gpu_q2_same_bits_in_two_processes(tmp_path: Path) -> None:
    """bench/RESULTS.md "GPU Q2": overlapped merges on and off, two processes, the same search bit for bit."""
    _extract("bench-qwen2-1.5b-2026-12-06b.tar.gz", tmp_path)
    runs = tmp_path / "queue" / "out"
    got = _compare_runs(runs, "q3", "q3off")
    assert "q3: wall s per generation: 37.9, 10.8, 37.1" in got
    assert "q3off: wall s per generation: 54.4, 10.1, 32.5" in got
    assert "same candidates, parents and recipes: True" in got and "same best: True g002-c4-23c63453" in got
    assert "same fitness bits: True ; largest difference: 0.0" in got
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    assert "| on (default on a GPU) | 37.9 | **10.8** | 37.1 |" in results
    assert "| off | 54.4 | **10.1** | 32.5 |" in results


def test_q3_records_reproduce_gpu_q3_20_generations_capped_and_static_cache(tmp_path: Path) -> None:
    """bench/RESULTS.md "GPU Q3": the 50-generation run cut off after 20 (its report from the mirrored records),
    the capped generation and the static-cache row, each as its job's log printed it."""
    _extract("bench-qwen2-1.5b-2026-12-06c.tar.gz", tmp_path)
    queue = tmp_path / "queue"
    report = subprocess.run(
        [sys.executable, "-m", "evoforge", "report", str(queue / "out" / "q50")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "- Generations: 20 (gen 0–19)" in report
    assert "160 candidates merged and scored in 370 s of generations, 1557 an hour" in report
    assert (
        "| **+0.0258** | **[+0.0100, +0.0417]** | **yes, B higher** |" in report
    )  # against the best base model
    assert "| **+0.0092** | **[-0.0021, +0.0204]** | **no** |" in report  # against the best seed
    generations = [json.loads(line) for line in (queue / "out" / "q50" / "generations.jsonl").open()]
    assert round(sum(g["wall_s"] for g in generations), 1) == 369.9
    capped, static = (queue / "04.log").read_text(), (queue / "05.log").read_text()
    assert "| memory | 8 | 1.857 | 3.744 | 5.601 | 63.69 | 2.14 | 7.42 |" in capped
    assert "| slerp-dare-dfs | 2.478 | 4.05 | True | 0 / 1 (dare_ties 1) |" in capped
    _extract("bench-qwen2-1.5b-2026-12-06.tar.gz", tmp_path / "q")  # GPU Q: the uncapped loops, same seeds
    uncapped = _seed_fitness((tmp_path / "q" / "gpu-q" / "queue" / "04.log").read_text())
    assert uncapped[:8] == uncapped[8:] == _seed_fitness(capped)  # memory and overlap loops, then capped
    assert "| PooledHFLM + static cache | 207 | 29.93 | 2.73 | 2.16 | 0.7826 | 206/207 |" in static
    assert (
        "| dare_ties | chunked, cuda, cap 8.0 GiB | 0.06 | 2.190 | True |" in (queue / "03.log").read_text()
    )
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    assert "| memory, capped | 8 | 1.857 | 3.744 | 5.601 | **63.69** | 2.14 | 7.42 |" in results
    assert "| PooledHFLM + static cache | 207 | 29.93 | **2.73** | 2.16 | 0.7826 | 206/207 |" in results
    assert "| **all 20** | 20 | | **369.9** |" in results


def _seed_fitness(log: str) -> list[str]:
    """The fitness of each seed a merge_bench loop printed, in order."""
    return re.findall(r"validation: merge .* fitness (\d\.\d+)", log)


def test_compare_runs_compares_the_first_generations_of_a_longer_run(tmp_path: Path) -> None:
    """--generations N: a short run against the start of a long one of the same run file and seed."""
    _extract("search-qwen2-1.5b-2026-12-06.tar.gz", tmp_path)
    whole = _compare_runs(tmp_path, "proof/ga-42", "proof/ga-42")
    first = _compare_runs(tmp_path, "proof/ga-42", "proof/ga-42", "--generations", "2")
    assert "wall s per generation: 15.5, 10.5, 15.3, 14.3" in whole
    assert "wall s per generation: 15.5, 10.5\n" in first and "same best: True g001-" in first
    other = _compare_runs(tmp_path, "proof/ga-42", "proof/ga-7", "--generations", "1")
    assert "same candidates, parents and recipes: False" in other  # another run seed
