"""Two run folders of the same run file and run seed side by side: each generation's wall time, whether the
search took the same path (candidates, parents, recipes), chose the same best, and scored bit for bit alike.
Used by bench/ray_share.sh (1 vs 2 Ray actors) and the device queue's run-twice job (run-to-run bits).

    python bench/compare_runs.py RUN_DIR_A RUN_DIR_B
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]


def best_of(run: Path) -> str:
    """The confirmed best of a likelihood run, else the last generation's fittest."""
    confirmation = run / "confirmation.json"
    if confirmation.exists():
        return json.loads(confirmation.read_text())["chosen"]
    return rows(run, "generations.jsonl")[-1]["best_id"]


def main() -> None:
    runs = [Path(arg) for arg in sys.argv[1:3]]
    for run in runs:
        walls = ", ".join(f"{g['wall_s']:.1f}" for g in rows(run, "generations.jsonl"))
        print(f"{run}: wall s per generation: {walls}")
    one, two = (
        sorted(rows(run, "evaluations.jsonl"), key=lambda r: (r["generation"], r["id"], r["split"]))
        for run in runs
    )

    def path(r: dict) -> tuple:
        return r["generation"], r["id"], r["split"], r["genome_hash"], r["recipe"], r["parents"]

    print("same candidates, parents and recipes:", list(map(path, one)) == list(map(path, two)))
    bests = [best_of(run) for run in runs]
    print("same best:", bests[0] == bests[1], bests[0])
    # on a GPU two processes' scores differed in the last bits (1.7e-9 on an H100: bench/RESULTS.md "GPU Q")
    if len(one) == len(two):
        difference = max((abs(a["fitness"] - b["fitness"]) for a, b in zip(one, two)), default=0.0)
        same = [r["fitness"] for r in one] == [r["fitness"] for r in two]
        print("same fitness bits:", same, "; largest difference:", difference)


if __name__ == "__main__":
    main()
