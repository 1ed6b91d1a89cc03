"""What every task item is built on: `Doc`, the text the model sees (`render_prompt`), an item's default key
(`prompt_key`) and tasks/_shared/tasklib.py, whose normalization the keys share with the scorers.

A module of its own because the item generators (their `key` functions), the task registry and the split
drawing all need it, and the generators must not import the registry that lists them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = ROOT / "tasks"


def _load_tasklib() -> ModuleType:
    """tasks/_shared/tasklib.py (the loader and scorers the tasks use), imported by path."""
    spec = importlib.util.spec_from_file_location("evoforge_tasklib", TASKS_DIR / "_shared" / "tasklib.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tasklib = _load_tasklib()

Doc = dict[str, object]


def render_prompt(doc: Doc) -> str:
    """The text the model sees, as the task templates in tasks/_shared render it."""
    return str(doc["prompt"]) if "prompt" in doc else f"Question: {doc['question']}\nAnswer:"


def prompt_key(doc: Doc) -> str:
    return tasklib.normalize_prompt(render_prompt(doc))
