"""The loader and scorers shared by evoforge's tasks, and the helpers scripts/build_tasks.py reuses.

It lives in tasks/ (not in the evoforge package) so the folder works with plain `lm_eval --include_path`:
the templates next to this file reference it with `!function tasklib.<fn>`, which lm-eval resolves against
the template's folder. Only code scoring needs evoforge installed (its sandbox runs the programs).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import datasets

SPLITS = ("validation", "test")

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_SPACES = re.compile(r"\s+")


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object a line, UTF-8."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_splits(config_source: str, data_dir: str, **_: object) -> datasets.DatasetDict:
    """lm-eval `custom_dataset`: `<data_dir>/{validation,test}.jsonl`, resolved against the task YAML's folder.

    lm-eval passes the task's metadata (including `config_source`, the YAML path) and `dataset_kwargs` as
    keyword arguments; relative `data_files` would resolve against the working directory instead.
    """
    folder = Path(config_source).parent / data_dir
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(read_jsonl(folder / f"{split}.jsonl")) for split in SPLITS}
    )


def normalize_text(text: str) -> str:
    """Casefold, NFC, hyphens as spaces, whitespace collapsed, surrounding quotes and final period dropped."""
    text = unicodedata.normalize("NFC", text).casefold().replace("-", " ")
    text = _SPACES.sub(" ", text).strip()
    return text.strip("\"'`").rstrip(".").strip()


def normalize_prompt(prompt: str) -> str:
    """Key under which two prompts count as the same item (split disjointness, training exclusion)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", prompt).casefold()).strip()


def last_number(text: str) -> float | None:
    """The last number in `text` (thousands separators removed), or None."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def numbers_equal(completion: str, gold: str) -> bool:
    """The completion's last number equals the gold number."""
    value = last_number(completion)
    return value is not None and abs(value - float(gold.replace(",", ""))) < 1e-6


def score_numeric(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results`: the completion's last number equals the gold number."""
    return {"numeric_match": float(numbers_equal(results[0], doc["answer"]))}


def score_text(doc: dict, results: list[str]) -> dict[str, float]:
    """lm-eval `process_results`: the completion equals the gold answer once both are normalized."""
    return {"exact_match": float(normalize_text(results[0]) == normalize_text(doc["answer"]))}


def program_and_tests(doc: dict, completion: str) -> tuple[str, str]:
    """What a code item runs: the program (prompt + completion) and, apart from it, its tests (the item's
    `check` on the entry point). The sandbox runs the tests in a process of their own that calls the
    program's functions: the program's exit status, hooks or patches cannot pass them."""
    return f"{doc['prompt']}{completion}\n", f"{doc['test']}\n\ncheck({doc['entry_point']})\n"


def run_programs(resps: list[list[str]], docs: list[dict]) -> list[dict]:
    """lm-eval filter: each document's program (its first completion) runs in evoforge's sandbox, all side by
    side. lm-eval filters a task's responses all at once, before it scores any: one program at a time in
    `process_results` would cost a task seconds. The outcome (kept in logged samples) is what it scores."""
    from evoforge.evaluate.sandbox import run_many

    completions = [resp[0] for resp in resps]
    runs = [program_and_tests(doc, c) for doc, c in zip(docs, completions, strict=True)]
    results = run_many([program for program, _ in runs], tests=[tests for _, tests in runs])
    return [
        {
            "completion": c,
            "passed": r.passed,
            "error": "" if r.passed else r.stderr.strip().rsplit("\n", 1)[-1],
        }
        for c, r in zip(completions, results, strict=True)
    ]


def score_program(doc: dict, results: list[dict | str]) -> dict[str, float]:
    """lm-eval `process_results`: the completed function passes the item's unit tests in evoforge's sandbox.

    Reads what `run_programs` found; a bare completion (a task with its own filter_list, a direct call) runs
    here."""
    outcome = results[0]
    if isinstance(outcome, str):
        (outcome,) = run_programs([[outcome]], [doc])
    return {"pass_at_1": float(outcome["passed"])}
