"""Every task scripts/build_tasks.py builds (`TASKS`): its folder, seed, split sizes, item generator and key.

A module of its own so that one table says which tasks exist, apart from the generators it lists and from
the split drawing that reads it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from task_items_code import code_humaneval, code_simple
from task_items_math import arith_key, math_arith, math_gsm, math_multilingual
from task_items_multilingual import multilingual_numbers, multilingual_terms, numbers_key
from task_items_structured import structured_json, structured_lookup
from task_prompts import Doc, prompt_key


@dataclass(frozen=True)
class TaskData:
    """One task's data: where it lives, how many items each split gets, the seed, the item source, and
    `key`: what an item asks, so that two wordings of one question count as one item (default: the prompt).
    Keys are comparable across tasks (math_multilingual's "37 plus 48" is math_arith's "37 + 48")."""

    name: str
    folder: str
    seed: int
    n_validation: int
    n_test: int
    items: Callable[[random.Random], Iterator[Doc]]
    key: Callable[[Doc], str] = prompt_key

    @property
    def data_dir(self) -> Path:
        return Path(self.folder) / "data" / self.name

    def item_keys(self, doc: Doc) -> set[str]:
        """The keys under which `doc` counts as seen: its normalized prompt and what it asks."""
        return {prompt_key(doc), self.key(doc)}


# 100 fitness (validation) items per task, as many held out; HumanEval's 151 short problems give 40 + 100.
TASKS: dict[str, TaskData] = {
    t.name: t
    for t in [
        TaskData("code_simple", "code", 101, 100, 100, code_simple),
        TaskData("code_humaneval", "code", 102, 40, 100, code_humaneval),
        TaskData("math_arith", "math", 201, 100, 100, math_arith, arith_key),
        TaskData("math_gsm", "math", 202, 100, 100, math_gsm),
        TaskData("multilingual_numbers", "multilingual", 301, 100, 100, multilingual_numbers, numbers_key),
        TaskData("multilingual_terms", "multilingual", 302, 100, 100, multilingual_terms),
        TaskData("structured_lookup", "structured_data", 401, 100, 100, structured_lookup),
        TaskData("structured_json", "structured_data", 402, 100, 100, structured_json),
        TaskData("math_multilingual", "math_multilingual", 501, 100, 100, math_multilingual, arith_key),
    ]
}
