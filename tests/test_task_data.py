"""The evaluation data in tasks/: YAMLs lm-eval accepts, disjoint splits, a reproducible build, scorers that
tell a right answer from a wrong one, training items outside the evaluated splits."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tasks"
TASK_YAMLS = sorted(p for p in TASKS.rglob("*.yaml") if "data" not in p.parts)


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


build_tasks = _load(ROOT / "scripts" / "build_tasks.py", "build_tasks")
tasklib = build_tasks.tasklib


@pytest.fixture(scope="module")
def configs() -> dict[str, dict]:
    """Task name → its YAML config with `!function` resolved (lm-eval's own loader)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    loaded = {}
    for path in TASK_YAMLS:
        cfg = load_yaml(path, resolve_func=True)
        loaded[cfg["task"]] = cfg | {"_path": path}
    return loaded


def _splits(cfg: dict) -> dict[str, list[dict]]:
    folder = cfg["_path"].parent / cfg["dataset_kwargs"]["data_dir"]
    return {split: tasklib.read_jsonl(folder / f"{split}.jsonl") for split in tasklib.SPLITS}


def _score(cfg: dict, doc: dict, completion: str) -> float:
    (value,) = cfg["process_results"](doc, [completion]).values()
    return value


def test_every_task_has_a_yaml_with_metadata_and_the_prompt_convention(configs: dict[str, dict]) -> None:
    assert set(build_tasks.TASKS) <= set(configs)
    domains: set[str] = set()
    for name, cfg in configs.items():
        meta = cfg["metadata"]
        task_domains = meta["domain"] if isinstance(meta["domain"], list) else [meta["domain"]]
        domains.update(task_domains)
        assert meta["level"] in ("easy", "hard"), name
        assert [m["metric"] for m in cfg["metric_list"]] == [meta["primary_metric"]], name
        assert cfg["output_type"] == "generate_until", name
        gen = cfg["generation_kwargs"]
        assert gen["do_sample"] is False and "Question:" in gen["until"], name
        assert gen["max_gen_toks"] <= (128 if "code" in task_domains else 64), name
        assert (cfg["validation_split"], cfg["test_split"]) == ("validation", "test"), name
    assert configs["math_multilingual"]["metadata"]["domain"] == ["math", "multilingual"]
    assert domains == {"code", "math", "multilingual", "structured_data"}
    for domain in domains:  # each domain folder has an easy and a hard task
        levels = {c["metadata"]["level"] for c in configs.values() if c["_path"].parent.name == domain}
        assert levels == {"easy", "hard"}, domain


def test_splits_have_the_planned_sizes_and_share_no_prompt(configs: dict[str, dict]) -> None:
    for name, cfg in configs.items():
        splits = _splits(cfg)
        if name in build_tasks.TASKS:
            spec = build_tasks.TASKS[name]
            assert (len(splits["validation"]), len(splits["test"])) == (spec.n_validation, spec.n_test), name
        keys = {split: [build_tasks.prompt_key(d) for d in docs] for split, docs in splits.items()}
        assert len(set(keys["validation"])) == len(keys["validation"]), (
            f"{name}: duplicate validation prompts"
        )
        assert len(set(keys["test"])) == len(keys["test"]), f"{name}: duplicate test prompts"
        assert not set(keys["validation"]) & set(keys["test"]), name
        for doc in splits["validation"] + splits["test"]:
            if "prompt" not in doc:  # question tasks: the gold answer is one short line
                assert "\n" not in doc["answer"] and doc["answer"].strip() == doc["answer"], (name, doc)


def test_rebuild_is_byte_identical(tmp_path: Path) -> None:
    written = build_tasks.build(tmp_path)
    assert len(written) == 2 * len(build_tasks.TASKS)
    for path in written:
        committed = TASKS / path.relative_to(tmp_path)
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed} is stale: run scripts/build_tasks.py"
        )


def test_build_refuses_other_source_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(build_tasks.SOURCE_VERSIONS, "faker", "0.0.1")
    with pytest.raises(SystemExit, match="faker"):
        build_tasks.check_versions()


WRONG = {
    "code_simple": " None",
    "code_humaneval": "    return None\n",
    "structured_json": ' {"name": "nobody"}',
}


@pytest.mark.parametrize("name", sorted(build_tasks.TASKS))
def test_scorer_accepts_gold_and_rejects_a_wrong_answer(name: str, configs: dict[str, dict]) -> None:
    cfg = configs[name]
    docs = _splits(cfg)["validation"][:3]
    for doc in docs:
        gold = doc["answer"] if "prompt" in doc else " " + doc["answer"]
        assert _score(cfg, doc, gold) == 1.0, (name, doc)
        assert _score(cfg, doc, WRONG.get(name, " 123456789 zzz")) == 0.0, (name, doc)


def test_answer_matching_rules() -> None:
    assert tasklib.normalize_text(" Quatre-Vingt-Onze. ") == tasklib.normalize_text("quatre vingt  onze")
    assert tasklib.normalize_text("Allemagne") != tasklib.normalize_text("Alemania")
    assert tasklib.numbers_equal("18 + 21 = 39", "39")
    assert tasklib.numbers_equal("The total is 1,234.", "1234")
    assert not tasklib.numbers_equal("39 apples, or 40", "39")
    assert not tasklib.numbers_equal("no idea", "39")
    structured = _load(TASKS / "structured_data" / "utils.py", "structured_utils")
    doc = {"answer": '{"age": 54, "job": "Farm manager"}'}
    assert (
        structured.score_json(doc, [' Sure: {"job": "Farm manager", "age": "54"} done'])["json_match"] == 1.0
    )
    assert structured.score_json(doc, [' {"job": "Farm manager", "age": 54, "id": 1}'])["json_match"] == 0.0
    assert structured.score_json(doc, [' {"job": "Farm manager", "age": 55'])["json_match"] == 0.0


def test_training_items_avoid_both_splits(configs: dict[str, dict]) -> None:
    for name in ("math_arith", "multilingual_numbers", "code_simple", "structured_json"):
        items = build_tasks.training_items(name, 100, seed=3)
        held = {build_tasks.prompt_key(d) for docs in _splits(configs[name]).values() for d in docs}
        keys = {tasklib.normalize_prompt(i["prompt"]) for i in items}
        assert len(keys) == 100 and not keys & held, name
        assert build_tasks.training_items(name, 5, seed=3) == items[:5]
        assert build_tasks.training_items(name, 5, seed=4) != items[:5]
    with pytest.raises(ValueError, match="code_humaneval training"):
        build_tasks.training_items("code_humaneval", 100, seed=0)


def test_lm_eval_builds_every_task_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    names = sorted(build_tasks.TASKS)
    tasks = manager.load(names)["tasks"]
    assert sorted(tasks) == names
    for name, task in tasks.items():
        spec = build_tasks.TASKS[name]
        assert len(list(task.validation_docs())) == spec.n_validation
        eval_docs = list(task.eval_docs)
        assert len(eval_docs) == spec.n_test
        # what lm-eval shows the model is what training_items renders
        assert task.doc_to_text(eval_docs[0]) == build_tasks.render_prompt(eval_docs[0])
    assert os.getcwd() == str(tmp_path)
