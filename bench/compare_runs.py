"""Two run folders of the same run file and run seed side by side: each generation's wall time, whether the
search took the same path (candidates, parents, recipes), chose the same best, and scored bit for bit alike.
Used by bench/ray_share.sh (1 vs 2 Ray actors) and the qwen device queue (overlapped merges on and off).

    python bench/compare_runs.py RUN_DIR_A RUN_DIR_B [--generations N]

With --generations N only the first N generations of each are compared (a short run against a long one of
the same run file and seed, e.g. overlapped merges off for 3 generations against the 50-generation run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


def best_of(run: Path, generations: int | None) -> str:
    """The confirmed best of a whole likelihood run, else the fittest of the last generation compared."""
    confirmation = run / "confirmation.json"
    if generations is None and confirmation.exists():
        return json.loads(confirmation.read_text())["chosen"]
    return rows(run, "generations.jsonl")[:generations][-1]["best_id"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs=2, type=Path, metavar="RUN_DIR")
    parser.add_argument("--generations", type=int, help="compare only the first N generations of each")
    args = parser.parse_args()
    runs, first = args.runs, args.generations
    for run in runs:
        walls = ", ".join(f"{g['wall_s']:.1f}" for g in rows(run, "generations.jsonl")[:first])
        print(f"{run}: wall s per generation: {walls}")
    one, two = (
        sorted(
            (r for r in rows(run, "evaluations.jsonl") if first is None or r["generation"] < first),
            key=lambda r: (r["generation"], r["id"], r["split"]),
        )
        for run in runs
    )

    def path(r: dict) -> tuple:
        return r["generation"], r["id"], r["split"], r["genome_hash"], r["recipe"], r["parents"]

    print("same candidates, parents and recipes:", list(map(path, one)) == list(map(path, two)))
    bests = [best_of(run, first) for run in runs]
    print("same best:", bests[0] == bests[1], bests[0])
    # two processes on a GPU: 1.7e-9 apart while teacher_forced summed with CUDA atomics (bench/RESULTS.md
    # "GPU Q"), the same bits since it sums on the host ("GPU Q2")
    if len(one) == len(two):
        difference = max((abs(a["fitness"] - b["fitness"]) for a, b in zip(one, two)), default=0.0)
        same = [r["fitness"] for r in one] == [r["fitness"] for r in two]
        print("same fitness bits:", same, "; largest difference:", difference)


if __name__ == "__main__":
    main()
