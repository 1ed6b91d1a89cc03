"""The evaluation data in tasks/: YAMLs lm-eval accepts, disjoint splits (from each other and from the demo
trios' adapters' training items), no echo items, a reproducible build, scorers that tell a right answer from a wrong
one, training items outside the evaluated splits."""

from __future__ import annotations

import importlib.util
import os
import re
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


sys.path.insert(0, str(ROOT / "scripts"))  # build_tasks.py imports its sibling task_* modules
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


# (validation, test) items: 100 fitness items bound the standard error of a task score by 0.05; HumanEval has
# only 151 problems short enough to be scored, so it stays at 40 + 100.
SIZES = dict.fromkeys(build_tasks.TASKS, (100, 100)) | {"code_humaneval": (40, 100)}


def _keys(name: str, doc: dict) -> set[str]:
    spec = build_tasks.TASKS.get(name)
    return spec.item_keys(doc) if spec else {build_tasks.prompt_key(doc)}


def test_splits_have_the_planned_sizes_and_share_no_item(configs: dict[str, dict]) -> None:
    assert {n: (t.n_validation, t.n_test) for n, t in build_tasks.TASKS.items()} == SIZES
    for name, cfg in configs.items():
        splits = _splits(cfg)
        if name in SIZES:
            assert (len(splits["validation"]), len(splits["test"])) == SIZES[name], name
        seen: dict[str, str] = {}
        for split, docs in splits.items():
            for doc in docs:
                for key in _keys(name, doc):  # by prompt and by what the item asks
                    assert key not in seen, f"{name}: {key!r} in {seen.get(key)} and {split}"
                    seen[key] = split
                if "prompt" not in doc:  # question tasks: the gold answer is one short line
                    assert "\n" not in doc["answer"] and doc["answer"].strip() == doc["answer"], (name, doc)


def test_no_split_item_is_a_trained_item(configs: dict[str, dict]) -> None:
    """recipes/training/ holds what the trios' adapters are trained on: the specialists' and their merges'
    scores are on unseen items only if no split item is one of them, in any wording."""
    folder = ROOT / "recipes" / "training"
    assert sum(len(p.read_text().splitlines()) for p in folder.glob("*.jsonl")) == 10900
    trained = build_tasks.trained_keys()
    assert trained == build_tasks.trained_keys(folder)
    for name, cfg in configs.items():
        for split, docs in _splits(cfg).items():
            found = [d for d in docs if _keys(name, d) & trained]
            assert not found, f"{name} {split}: {len(found)} trained items, e.g. {found[0]}"


def test_trained_keys_name_a_file_that_is_no_task(tmp_path: Path) -> None:
    (tmp_path / "mathematics.jsonl").write_text('{"prompt": "Question: What is 1 + 1?\\nAnswer:"}\n')
    with pytest.raises(SystemExit, match=r"mathematics\.jsonl"):
        build_tasks.trained_keys(tmp_path)


def test_item_keys_name_the_question_not_its_wording() -> None:
    arith, ml_math, numbers = (
        build_tasks.TASKS[n] for n in ("math_arith", "math_multilingual", "multilingual_numbers")
    )

    def key(task, question: str, answer: str) -> str:
        return task.key({"question": question, "answer": answer})

    plus = key(arith, "What is 37 + 48?", "85")
    assert plus == key(arith, "What is 48 + 37?", "85") == key(ml_math, "Was ist 48 plus 37?", "85")
    assert plus == key(ml_math, "¿Cuánto es 37 más 48?", "85") != key(arith, "What is 37 + 49?", "86")
    assert key(arith, "What is 48 - 37?", "11") != key(ml_math, "Combien font 37 moins 48 ?", "-11")
    assert key(ml_math, "Was ist 7 mal 9?", "63") == key(ml_math, "Combien font 9 fois 7 ?", "63")
    word_problem = "Anna hat 12 Äpfel und kauft 5 dazu. Wie viele Äpfel hat Anna jetzt?"
    assert key(ml_math, word_problem, "17") == build_tasks.prompt_key({"question": word_problem})
    # the demo's training items read numbers in an older wording: the same item
    read = key(numbers, 'What number is "dix-sept" in French?', "17")
    trained = {
        "prompt": 'Question: Which number is "dix-sept" in French? Answer with digits.\nAnswer:',
        "answer": "17",
    }
    assert read == numbers.key(trained)
    assert read != key(numbers, "How do you write the number 17 in French?", "dix-sept")
    assert read != key(numbers, 'What number is "diecisiete" in Spanish?', "17")


_TERM = re.compile(
    r"What is the \w+ (?:name of the country|name of the language|word for the month|word for) (.+)\?"
)


def test_multilingual_terms_has_no_echo_item(configs: dict[str, dict]) -> None:
    """An answer that is the question's English word, or part of it, scores for a model that copies it."""
    assert build_tasks.is_echo("Togo", "Togo") and build_tasks.is_echo("Guinea", "Guiné")
    assert build_tasks.is_echo("January", "Januar") and build_tasks.is_echo("Åland Islands", "Åland")
    assert build_tasks.is_echo("Timor-Leste", "timor leste")
    assert not build_tasks.is_echo("Germany", "Allemagne") and not build_tasks.is_echo("Korea", "Corea")
    assert not build_tasks.is_echo("Guinea", "Guinea Ecuatorial")
    for split, docs in _splits(configs["multilingual_terms"]).items():
        for doc in docs:
            english = _TERM.fullmatch(doc["question"])
            assert english, doc
            assert not build_tasks.is_echo(english[1], doc["answer"]), (split, doc)


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


def test_training_items_avoid_every_split() -> None:
    held = build_tasks.split_keys()
    for name in ("math_arith", "multilingual_numbers", "code_simple", "structured_json"):
        items = build_tasks.training_items(name, 100, seed=3)
        keys = [build_tasks.TASKS[name].item_keys(i) for i in items]
        assert len(set().union(*keys)) == sum(map(len, keys)), name  # no two share a key
        assert len(items) == 100 and not set().union(*keys) & held, name
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
