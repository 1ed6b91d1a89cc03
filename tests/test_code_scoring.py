"""The code tasks run a candidate's programs side by side and score exactly what one program at a time would.

The completions mix every way a program ends (passes, fails its tests, exits non-zero, is killed, does not
parse), so a score that moved with concurrency (a crossed-over outcome, a lost or reordered item) shows.
"""

from __future__ import annotations

import json
import os
import time

import pytest
from eval_support import REAL_TASKS, needs_real_tasks
from lm_eval.api.model import LM
from lm_eval.tasks._yaml_loader import load_yaml

from evoforge.config import EvaluationConfig
from evoforge.evaluate import Scorer, TaskSuite

pytestmark = [
    needs_real_tasks,
    pytest.mark.skipif(os.geteuid() != 0, reason="the contained mode needs root (as in CI)"),
]
CODE_TASKS = ("code_simple", "code_humaneval")
N = 16  # validation items of each task

# Appended to the gold completion: the program then runs module-level code after the function.
ENDINGS = {
    "passes": "\n",
    "prints and passes": "\nprint('fine')\n",
    "is killed": "\nimport os\nos.kill(os.getpid(), 9)\n",
    "fails an assertion": "\nassert False, 'wrong'\n",
    "exits 3": "\nraise SystemExit(3)\n",
    "does not parse": "\n)\n",
    "segfaults": "\nimport ctypes\nctypes.string_at(0)\n",
}
PASSING = {"passes", "prints and passes"}


def kind(i: int) -> str:
    return list(ENDINGS)[i % len(ENDINGS)]


def docs(task: str) -> list[dict]:
    lines = (REAL_TASKS / "code" / "data" / task / "validation.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines[:N]]


# The functions the code tasks' YAML wires in (the shared template's filter and process_results).
CONFIG = load_yaml(REAL_TASKS / "code" / "code_simple.yaml", resolve_func=True)
((FILTER,),) = [[f["filter_fn"] for f in entry["filter"]] for entry in CONFIG["filter_list"]]
score_program = CONFIG["process_results"]


class MixedLM(LM):
    """Answers the i-th item of each code task with its gold completion followed by ENDINGS[kind(i)]."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = {
            doc["prompt"]: doc["answer"] + ENDINGS[kind(i)]
            for task in CODE_TASKS
            for i, doc in enumerate(docs(task))
        }

    def generate_until(self, requests) -> list[str]:
        return [self.answers[req.args[0]] for req in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_scores_through_lm_eval_equal_one_program_at_a_time() -> None:
    lm = MixedLM()
    evaluation = EvaluationConfig(tasks={"code": list(CODE_TASKS)}, limit=N)
    result = Scorer(lm, evaluation=evaluation, weights={"code": 1.0}, tasks_dir=REAL_TASKS).score(
        "validation"
    )
    suite = TaskSuite.discover(REAL_TASKS)
    for task in CODE_TASKS:
        items = docs(task)
        completions = [lm.answers[doc["prompt"]] for doc in items]
        serial = [score_program(doc, [c])["pass_at_1"] for doc, c in zip(items, completions)]
        assert serial == [float(kind(i) in PASSING) for i in range(N)], task
        outcomes = FILTER([[c] for c in completions], items)
        assert [o["passed"] for o in outcomes] == [bool(v) for v in serial], task
        assert [o["completion"] for o in outcomes] == completions
        assert outcomes[list(ENDINGS).index("fails an assertion")]["error"] == "AssertionError: wrong"
        score = result.tasks[task]
        assert (score.metric, score.value, score.n_items) == (
            suite.tasks[task].primary_metric,
            sum(serial) / N,
            N,
        )
        assert score.metric == "pass_at_1,none"  # the key results and run files already use


def test_a_tasks_programs_run_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's filter step runs them together: 6 programs sleeping 0.5 s take far less than 3 s."""
    monkeypatch.setenv("EVOFORGE_SANDBOX_JOBS", "6")  # sleeping needs no CPU: overlap even on one core
    items = docs("code_simple")[:6]
    start = time.monotonic()
    outcomes = FILTER([[doc["answer"] + "\nimport time\ntime.sleep(0.5)\n"] for doc in items], items)
    assert time.monotonic() - start < 6 * 0.5 / 2
    assert all(o["passed"] for o in outcomes)
