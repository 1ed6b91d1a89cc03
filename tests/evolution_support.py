"""Support for the evolution tests: a small multiple-choice task suite and a run file over tiny models.

Loglikelihood tasks keep a candidate's evaluation under a second on CPU while still giving random tiny
models fitness values that differ from candidate to candidate (selection has something to select on).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from evoforge.genome import GenomeSpace

TASKS = {"tiny_math_mc": "math", "tiny_words_mc": "multilingual"}
NAMES = ("alpha", "beta", "gamma")


def space_of(family: dict[str, Path], ancestor: bool) -> GenomeSpace:
    """The genome space over a tiny family's three children (6 layers), optionally with its ancestor."""
    return GenomeSpace(
        models=NAMES,
        paths=tuple(str(family[n]) for n in NAMES),
        num_layers=6,
        ancestor=str(family["ancestor"]) if ancestor else None,
        dtype="float32",
    )


def write_mc_tasks(root: Path, items: int = 12) -> Path:
    """Two 4-choice tasks (domains math and multilingual) with validation and test splits."""
    rng = random.Random(0)
    for task, domain in TASKS.items():
        folder = root / domain
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for split in ("validation", "test"):
            rows = []
            for _ in range(items):
                a, b = rng.randint(1, 49), rng.randint(1, 49)
                answer = a + b
                choices = [str(answer + d) for d in (0, 1, -1, 10)]
                rng.shuffle(choices)
                rows.append(
                    {
                        "question": f"What is {a} + {b}?",
                        "choices": choices,
                        "answer": choices.index(str(answer)),
                    }
                )
            files[split] = folder / f"{task}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
            "validation_split": "validation",
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "Question: {{question}}\nAnswer:",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"domain": domain, "primary_metric": "acc,none", "level": "easy", "version": 1},
        }
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def run_config(family: dict[str, Path], tasks_dir: Path, out: Path, **overrides) -> dict:
    return {
        "name": "tiny",
        "base_models": [{"name": n, "path": str(family[n])} for n in ("alpha", "beta", "gamma")],
        "ancestor": {"name": "ancestor", "path": str(family["ancestor"])},
        "population_size": 8,
        "max_generations": 3,
        "mutation_rate": 0.2,
        "dtype": "float32",
        "device": "cpu",
        "merge_path": "memory",
        "evaluation_weights": {"math": 0.5, "multilingual": 0.5},
        "evaluation": {"tasks_dir": str(tasks_dir), "batch_size": 16},
        "output_dir": str(out),
        "wandb_mode": "offline",
        **overrides,
    }
