"""Support for the evaluation tests: an oracle lm-eval model and a small task folder.

The oracle answers every prompt with its gold completion, looked up among the task docs: scored through
evoforge or lm-eval's own CLI it must get 1.0 on every task, which holds the tasks (prompts, filters,
metrics) and the scoring code together. Importing this module registers it with lm-eval as
`evoforge-oracle`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager

from evoforge.resources import tasks_dir

REAL_TASKS = tasks_dir()
needs_real_tasks = pytest.mark.skipif(
    not any(REAL_TASKS.glob("**/*.yaml")),
    reason=f"{REAL_TASKS} has no task YAML yet (the data is built apart)",
)
WRONG = "\N{REPLACEMENT CHARACTER}"


def gold_completion(task, doc: dict) -> str:
    """What a perfect model writes after the prompt: the target, after the target delimiter (" 19" after
    "Answer:") unless the prompt already ends in whitespace (a code prompt ends inside the function)."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    prompt = task.doc_to_text(doc)
    return ("" if prompt[-1:].isspace() else task.config.target_delimiter) + str(target)


@register_model("evoforge-oracle")
class OracleLM(LM):
    """Looks every prompt up among the task docs (all splits) and answers with its gold completion;
    tasks named in `wrong` ("a+b") get a wrong answer instead."""

    def __init__(self, tasks_dir: str, wrong: str = "", **_lm_eval_settings: object) -> None:
        super().__init__()
        self.wrong = set(filter(None, wrong.split("+")))
        manager = TaskManager(include_path=tasks_dir, include_defaults=False)
        self.gold: dict[tuple[str, str], str] = {}
        for name, task in manager.load(manager.all_subtasks)["tasks"].items():
            process = task.config.process_docs
            for docs in task.dataset.values():
                for doc in process(docs) if process else docs:
                    self.gold[(name, task.doc_to_text(doc))] = gold_completion(task, doc)

    def generate_until(self, requests) -> list[str]:
        answers = []
        for req in requests:
            gold = self.gold[(req.task_name, req.args[0])]  # KeyError = a prompt the docs do not make
            answers.append(WRONG if req.task_name in self.wrong else gold)
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("the oracle answers generate_until tasks only")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("the oracle answers generate_until tasks only")


# ---------------------------------------------------------------------- a small task folder of our own

_UTILS = '''
import difflib


def similarity(doc, results):
    """Exact match and a continuous string similarity (moves with every change of the output)."""
    answer = results[0].strip()
    return {"exact_match": float(answer == doc["answer"]),
            "similarity": difflib.SequenceMatcher(None, answer, doc["answer"]).ratio()}
'''


def write_task(root: Path, name: str, domain: str | list[str], rows: dict[str, list[dict]], **extra) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for split, items in rows.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str(folder / f"{s}.jsonl") for s in rows}},
        "output_type": "generate_until",
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 12},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "filter_list": [
            {"name": "strict", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}
        ],
        "metadata": {"domain": domain, "primary_metric": "exact_match", "level": "easy"},
        **extra,
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def _rows(make, start: int, n: int) -> list[dict]:
    return [make(i) for i in range(start, start + n)]


def write_mini_tasks(root: Path) -> Path:
    """Four tasks, splits of 6 (validation) and 4 (test) items: math, multilingual, a cross-domain task
    tagged [math, multilingual], and a structured-data task scored by a continuous similarity."""
    french = "zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze seize".split()

    def arith(i):
        return {"question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)}

    def words(i):
        return {"question": f"How do you write {i} in French?", "answer": french[i]}

    def cross(i):
        return {"question": f"What is {i} + 2? Answer in French.", "answer": french[i + 2]}

    def record(i):
        return {"question": f'In {{"id": {i}, "name": "item{i}x"}}, what is "name"?', "answer": f"item{i}x"}

    splits = {"validation": (0, 6), "test": (6, 4)}
    for name, domain, make in (
        ("arith", "math", arith),
        ("numwords", "multilingual", words),
        ("arith_fr", ["math", "multilingual"], cross),
    ):
        write_task(root, name, domain, {s: _rows(make, *span) for s, span in splits.items()})
    path = write_task(
        root,
        "json_field",
        "structured_data",
        {s: _rows(record, *span) for s, span in splits.items()},
        process_results="!function utils.similarity",
        metric_list=[
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "similarity", "aggregation": "mean", "higher_is_better": True},
        ],
        metadata={"domain": "structured_data", "primary_metric": "similarity,strict", "level": "medium"},
    )
    path.write_text(path.read_text().replace('"!function utils.similarity"', "!function utils.similarity"))
    (path.parent / "utils.py").write_text(_UTILS)
    return root


def oracle(tasks_dir: Path, wrong: str = "") -> OracleLM:
    return OracleLM(tasks_dir=str(tasks_dir), wrong=wrong)


MINI_WEIGHTS = {"math": 1.0, "multilingual": 1.0, "structured_data": 1.0}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and two OpenMP threads spin-wait badly on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
