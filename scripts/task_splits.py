"""Drawing a task's items so that none is seen twice: the validation and test splits (outside the demo
trios' training items in recipes/training/) and training items (outside every task's committed splits).

Apart from scripts/build_tasks.py (which writes the splits) because scripts/train_adapters.py and the tests
draw training items and read the held keys without building anything.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from task_prompts import ROOT, TASKS_DIR, Doc, render_prompt, tasklib
from task_registry import TASKS, TaskData

TRAINING_DIR = (
    ROOT / "recipes" / "training"
)  # the items every trio's adapters are trained on, a file per task

_MAX_MISSES = 20_000


def _unique(task: TaskData, items: Iterator[Doc], exclude: set[str], n: int, what: str) -> list[Doc]:
    """The first `n` items none of whose keys (`TaskData.item_keys`) was seen or is in `exclude` (a source
    that ends, or yields nothing new for `_MAX_MISSES` draws in a row, counts as exhausted)."""
    seen = set(exclude)
    out: list[Doc] = []
    misses = 0
    for doc in items:
        if len(out) == n or misses == _MAX_MISSES:
            break
        keys = task.item_keys(doc)
        if keys & seen:
            misses += 1
            continue
        seen |= keys
        out.append(doc)
        misses = 0
    if len(out) < n:
        raise ValueError(f"{what}: only {len(out)} distinct items available, {n} asked")
    return out


def trained_keys(*folders: Path) -> set[str]:
    """Keys of the items the demo trios' adapters are trained on (`folders`, by default recipes/training/
    with its <task>.jsonl files): no split holds one, so held-out scores of the specialists and their merges
    are on unseen items."""
    keys: set[str] = set()
    for folder in folders or (TRAINING_DIR,):
        for path in sorted(folder.glob("*.jsonl")):
            if path.stem not in TASKS:
                raise SystemExit(
                    f"{path}: file name is no task of scripts/build_tasks.py ({', '.join(TASKS)})"
                )
            for doc in tasklib.read_jsonl(path):
                keys |= TASKS[path.stem].item_keys(doc)
    return keys


def split_keys(tasks_dir: Path = TASKS_DIR) -> set[str]:
    """Keys of every item in every task's committed splits."""
    return {
        key
        for task in TASKS.values()
        for split in tasklib.SPLITS
        for doc in tasklib.read_jsonl(tasks_dir / task.data_dir / f"{split}.jsonl")
        for key in task.item_keys(doc)
    }


def build_splits(task: TaskData, trained: set[str]) -> dict[str, list[Doc]]:
    """Validation and test items of `task`: no two share a key, none has a key in `trained` (`trained_keys`)."""
    n = task.n_validation + task.n_test
    docs = _unique(task, task.items(random.Random(task.seed)), trained, n, task.name)
    return {"validation": docs[: task.n_validation], "test": docs[task.n_validation :]}


def training_items(task: str, n: int, seed: int, tasks_dir: Path = TASKS_DIR) -> list[dict[str, str]]:
    """`n` items of `task` for fine-tuning, none of which is in a committed split of any task (`item_keys`).

    Each item: `prompt` (what the model sees at evaluation), `answer` (the gold answer as scored) and
    `completion` (the text to train on after the prompt, ending with the stop sequence lm-eval cuts at).
    Finite sources (HumanEval, terms, number words) raise ValueError when fewer than `n` items are left
    outside the splits.
    """
    spec = TASKS[task]
    docs = _unique(
        spec, spec.items(random.Random(f"train/{task}/{seed}")), split_keys(tasks_dir), n, f"{task} training"
    )
    is_code = spec.folder == "code"
    return [
        {
            "prompt": render_prompt(d),
            "answer": str(d["answer"]),
            "completion": f"{d['answer']}\n\n" if is_code else f" {d['answer']}\n",
        }
        for d in docs
    ]
