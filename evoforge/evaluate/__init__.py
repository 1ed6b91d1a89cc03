"""Scoring: lm-eval tasks in a folder → per-task metrics, per-domain scores, one fitness.

The offline switches are set before anything imports `datasets`/`huggingface_hub` (they read them at
import time): without them every local `load_dataset("json")` waits on a network probe. They are defaults
a user may override; models are read only from a folder or the local HF cache either way (evoforge.models).
The public names load lazily, so importing the CLI or `evoforge.evaluate.sandbox` does not pay for
lm-eval's import (1-4 s).
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_var, "1")

if TYPE_CHECKING:
    from evoforge.evaluate.scorer import (
        EvalResult,
        Scorer,
        TaskScore,
        check_weights,
        load_model,
    )
    from evoforge.evaluate.stats import compute_fitness
    from evoforge.evaluate.suite import TaskError, TaskInfo, TaskSuite, resolve_tasks_dir

_EXPORTS = {
    "EvalResult": "scorer",
    "Scorer": "scorer",
    "TaskScore": "scorer",
    "check_weights": "scorer",
    "compute_fitness": "stats",
    "load_model": "scorer",
    "TaskError": "suite",
    "TaskInfo": "suite",
    "TaskSuite": "suite",
    "resolve_tasks_dir": "suite",
}
__all__ = [
    "EvalResult",
    "Scorer",
    "TaskError",
    "TaskInfo",
    "TaskScore",
    "TaskSuite",
    "check_weights",
    "compute_fitness",
    "load_model",
    "resolve_tasks_dir",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
