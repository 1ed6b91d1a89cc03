"""The confirmation (`evolve.confirm`) of a finished likelihood run, after the fact: for runs made before it
existed (recipes/demo/SEARCH.md's seed-7 runs), or to see what another `--top` would choose.

    python bench/confirm_replay.py RUN_DIR --top 3 --device cpu [--limit N]

Reads RUN_DIR/config.yaml (the run's resolved config; `--device`, `--limit`, `--batch-size` override it),
scores the `--top` fittest distinct candidates and the best seed on the fitness split by accuracy, and writes
RUN_DIR/confirmation.json as a run would (the chosen candidate, if not the fittest, is scored on the held-out
split too; its model is not written). Prints each candidate's fitness and accuracy, and the choice. Work on a
copy of the run directory: the replay makes the confirmation the run's best.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fitness_metrics import log

from evoforge.config import load_config
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.confirm import confirm
from evoforge.evolve.run_dir import RunDir
from evoforge.quiet import quiet_libraries


def _no_model(*_: object) -> None:
    raise RuntimeError("not written by bench/confirm_replay.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--limit", type=int, help="first N items per task (a smoke test; default: all)")
    parser.add_argument("--batch-size", type=int)
    args = parser.parse_args()
    cfg = load_config(args.run_dir / "config.yaml", **({"device": args.device} if args.device else {}))
    evaluation = {"confirm_top": args.top, "limit": args.limit or cfg.evaluation.limit}
    if args.batch_size:
        evaluation["batch_size"] = args.batch_size
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update=evaluation)})
    run_dir = RunDir(args.run_dir.resolve())
    t0 = time.perf_counter()
    with quiet_libraries(), tempfile.TemporaryDirectory() as scratch:
        evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), Path(scratch) / "work")
        done = confirm(cfg, run_dir, evaluator, _no_model, threading.Event(), log)
    if done is None:
        sys.exit(f"{run_dir.root}: not a likelihood run (fitness_metric {cfg.evaluation.fitness_metric})")
    print(
        f"\n{run_dir.root.name}: confirmation of the {args.top} fittest and the best seed ({time.perf_counter() - t0:.0f} s)\n"
    )
    print(f"| candidate | fitness ({cfg.evaluation.fitness_metric}) | accuracy on {done.split} |")
    print("|---|---|---|")
    for c in done.candidates:
        acc = f"{c.scores.fitness:.4f} ± {c.scores.fitness_se:.4f}" if c.scores else f"failed: {c.error}"
        mark = " **chosen**" if c.id == done.chosen else ""
        print(f"| `{c.id}`{mark} | {c.fitness:.4f} | {acc} |")
    if done.heldout is not None:
        print(
            f"\nchosen on {cfg.evaluation.heldout_split}: {done.heldout.fitness:.4f} ± {done.heldout.fitness_se:.4f}"
        )


if __name__ == "__main__":
    main()
