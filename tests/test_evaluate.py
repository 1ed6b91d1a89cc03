"""Scoring: task discovery, the oracle and random-model sanity checks, fitness, weight swapping.

The oracle is an lm-eval model that answers every prompt with its gold completion; it must score 1.0 on
every task through evoforge's Scorer and through lm-eval's own CLI, which holds the tasks, their filters and
metrics, and evoforge's split selection and aggregation together.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from evoforge.config import DOMAINS, EvaluationConfig
from evoforge.errors import ConfigError, IncompatibleModelsError
from evoforge.evaluate import DEFAULT_TASKS_DIR, Scorer, TaskError, TaskSuite, compute_fitness

REAL_TASKS = DEFAULT_TASKS_DIR
needs_real_tasks = pytest.mark.skipif(
    not any(REAL_TASKS.glob("**/*.yaml")),
    reason=f"{REAL_TASKS} has no task YAML yet (the data is built apart)",
)
WRONG = "\N{REPLACEMENT CHARACTER}"


def gold_completion(task, doc: dict) -> str:
    """What a perfect model writes after the prompt: the target, or for code the canonical solution."""
    if "canonical_solution" in doc:
        return doc["canonical_solution"]
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    return task.config.target_delimiter + str(target)


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


def _write_task(root: Path, name: str, domain: str | list[str], rows: dict[str, list[dict]], **extra) -> Path:
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
        _write_task(root, name, domain, {s: _rows(make, *span) for s, span in splits.items()})
    path = _write_task(
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


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and two OpenMP threads spin-wait badly on shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mini_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_tasks(tmp_path_factory.mktemp("mini_tasks"))


MINI_WEIGHTS = {"math": 1.0, "multilingual": 1.0, "structured_data": 1.0}


def _oracle(tasks_dir: Path, wrong: str = "") -> OracleLM:
    return OracleLM(tasks_dir=str(tasks_dir), wrong=wrong)


def _scores(result) -> dict:
    """Everything a candidate's result says except the wall time."""
    return result.model_dump(exclude={"wall_s"})


# ---------------------------------------------------------------------- discovery


def test_suite_groups_tasks_by_domain_with_item_counts(mini_tasks: Path) -> None:
    suite = TaskSuite.discover(mini_tasks)
    assert suite.errors == {}
    assert {d: [t.name for t in ts] for d, ts in suite.domains.items()} == {
        "math": ["arith", "arith_fr"],
        "multilingual": ["arith_fr", "numwords"],
        "structured_data": ["json_field"],
    }
    assert suite.tasks["json_field"].primary_metric == "similarity,strict"
    assert suite.tasks["arith"].primary_metric == "exact_match,strict"
    assert suite.item_counts()["arith"] == {"validation": 6, "test": 4}


def test_new_domain_is_picked_up_from_a_dropped_yaml(tmp_path: Path) -> None:
    """Adding a task is adding a YAML: a new domain name becomes a domain, scored with no code change."""
    if any(REAL_TASKS.glob("**/*.yaml")):
        shutil.copytree(REAL_TASKS, tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    else:
        write_mini_tasks(tmp_path / "tasks")
    rows = [
        {"question": f"Which word rhymes with {w}?", "answer": r}
        for w, r in (("cat", "hat"), ("moon", "june"))
    ]
    _write_task(tmp_path / "tasks" / "poetry", "rhymes", "poetry", {"validation": rows, "test": rows[:1]})
    suite = TaskSuite.discover(tmp_path / "tasks")
    assert [t.name for t in suite.domains["poetry"]] == ["rhymes"]
    assert "poetry" not in DOMAINS
    scorer = Scorer(_oracle(tmp_path / "tasks"), weights={"poetry": 1.0}, tasks_dir=tmp_path / "tasks")
    result = scorer.score("validation")
    assert result.domains["poetry"] == 1.0 and result.tasks["rhymes"].n_items == 2
    assert result.fitness == 1.0


def test_broken_yaml_is_named_with_file_and_line(mini_tasks: Path, tmp_path: Path) -> None:
    """lm-eval would drop these two files silently; evoforge names them and refuses to score without them."""
    shutil.copytree(mini_tasks, tmp_path / "tasks")
    bad = tmp_path / "tasks" / "broken" / "broken.yaml"
    bad.parent.mkdir()
    bad.write_text(
        "task: broken\noutput_type: generate_until\ndoc_to_text: Question: x\nmetadata: {domain: math}\n"
    )
    nodomain = tmp_path / "tasks" / "numwords" / "numwords.yaml"
    nodomain.write_text(nodomain.read_text().replace('"domain": "multilingual",', ""))
    suite = TaskSuite.discover(tmp_path / "tasks")
    assert set(suite.errors) == {bad, nodomain}
    assert suite.errors[bad].startswith(f"{bad}:3: invalid YAML: mapping values are not allowed")
    assert suite.errors[nodomain] == f"{nodomain}: metadata.domain: expected a domain name or a list of them"
    assert sorted(suite.tasks) == ["arith", "arith_fr", "json_field"]  # the good files still load
    with pytest.raises(TaskError, match=r"broken\.yaml:3: invalid YAML.*\(and 1 more broken task files\)"):
        Scorer(_oracle(mini_tasks), weights=MINI_WEIGHTS, tasks_dir=tmp_path / "tasks")


def test_bad_metric_or_function_reference_is_named(mini_tasks: Path, tmp_path: Path) -> None:
    shutil.copytree(mini_tasks, tmp_path / "tasks")
    arith = tmp_path / "tasks" / "arith" / "arith.yaml"
    arith.write_text(arith.read_text().replace('"primary_metric": "exact_match"', '"primary_metric": "acc"'))
    field = tmp_path / "tasks" / "json_field" / "json_field.yaml"
    field.write_text(field.read_text().replace("utils.similarity", "utils.nope"))
    errors = TaskSuite.discover(tmp_path / "tasks").errors
    assert errors[arith] == f"{arith}: metadata.primary_metric: 'acc' is not in metric_list ['exact_match']"
    assert errors[field].startswith(f"{field}: ") and "nope" in errors[field]


def test_weighted_domain_without_tasks_is_an_error(mini_tasks: Path) -> None:
    with pytest.raises(ConfigError, match=r"evaluation_weights\.code: no task .* has this domain"):
        Scorer(_oracle(mini_tasks), tasks_dir=mini_tasks)  # default weights include code


def test_run_file_task_selection(mini_tasks: Path) -> None:
    """`evaluation.tasks` picks tasks per domain and decides their domains."""
    evaluation = EvaluationConfig(tasks={"math": ["arith"], "structured_data": ["json_field"]})
    weights = {"math": 1, "structured_data": 1}
    scorer = Scorer(_oracle(mini_tasks), evaluation=evaluation, weights=weights, tasks_dir=mini_tasks)
    assert sorted(scorer.score().tasks) == ["arith", "json_field"]
    with pytest.raises(ConfigError, match=r"evaluation\.tasks\.math: unknown task 'nope'"):
        Scorer(
            _oracle(mini_tasks), evaluation=EvaluationConfig(tasks={"math": ["nope"]}), tasks_dir=mini_tasks
        )


# ---------------------------------------------------------------------- the oracle and fitness


def test_oracle_scores_one_on_every_mini_task_and_split(mini_tasks: Path) -> None:
    scorer = Scorer(_oracle(mini_tasks), weights=MINI_WEIGHTS, tasks_dir=mini_tasks)
    for split, n in (("validation", 6), ("test", 4)):
        result = scorer.score(split)
        assert {t: (s.value, s.n_items) for t, s in result.tasks.items()} == {
            t: (1.0, n) for t in result.tasks
        }
        assert result.fitness == 1.0 and result.split == split


def test_fitness_is_the_weighted_mean_of_domain_means(mini_tasks: Path) -> None:
    """A cross-domain task counts in both domains; an unweighted domain is reported, not counted."""
    weights = {"math": 1.0, "structured_data": 3.0}
    result = Scorer(_oracle(mini_tasks, wrong="arith_fr"), weights=weights, tasks_dir=mini_tasks).score()
    assert result.tasks["arith_fr"].value == 0.0 and result.tasks["arith"].value == 1.0
    assert result.domains == {"math": 0.5, "multilingual": 0.5, "structured_data": 1.0}
    assert result.fitness == pytest.approx((1.0 * 0.5 + 3.0 * 1.0) / 4.0)
    assert compute_fitness({"a": 0.2, "b": 0.8, "c": 1.0}, {"a": 1, "b": 3}) == pytest.approx(0.65)


def test_split_selection_does_not_leak(mini_tasks: Path) -> None:
    """Validation and test are separate task objects; the YAML as lm-eval reads it is untouched."""
    scorer = Scorer(_oracle(mini_tasks, wrong="numwords"), weights=MINI_WEIGHTS, tasks_dir=mini_tasks)
    first = _scores(scorer.score("validation"))
    assert _scores(scorer.score("test"))["n_items"] == 16
    assert _scores(scorer.score("validation")) == first and first["n_items"] == 24
    manager = TaskManager(include_path=str(mini_tasks), include_defaults=False)
    assert manager.load("arith")["tasks"]["arith"].config.test_split == "test"


@needs_real_tasks
def test_oracle_scores_one_on_every_real_task() -> None:
    suite = TaskSuite.discover(REAL_TASKS)
    assert suite.errors == {}
    assert set(DOMAINS) <= set(suite.domains)
    assert any(len(t.domains) > 1 for t in suite.tasks.values()), "no cross-domain task"
    scorer = Scorer(_oracle(REAL_TASKS), tasks_dir=REAL_TASKS)
    for split in ("validation", "test"):
        result = scorer.score(split)
        assert {t: s.value for t, s in result.tasks.items()} == dict.fromkeys(suite.tasks, 1.0), split
        assert result.fitness == 1.0


@needs_real_tasks
def test_oracle_scores_one_through_lm_eval_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's own entry point (test split, its own TaskManager) agrees with the tasks' gold answers."""
    from lm_eval.__main__ import cli_evaluate

    names = sorted(TaskSuite.discover(REAL_TASKS).tasks)
    argv = ["lm-eval", "run", "--model", "evoforge-oracle", "--model_args", f"tasks_dir={REAL_TASKS}"]
    argv += ["--include_path", str(REAL_TASKS), "--tasks", ",".join(names), "--output_path", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", [*argv, "--confirm_run_unsafe_code"])
    cli_evaluate()
    (out,) = tmp_path.glob("**/results_*.json")
    results = json.loads(out.read_text())["results"]
    suite = TaskSuite.discover(REAL_TASKS)
    assert {n: results[n][suite.tasks[n].primary_metric] for n in names} == dict.fromkeys(names, 1.0)


# ---------------------------------------------------------------------- real models


def test_random_tiny_model_scores_near_chance(qwen_family: dict[str, Path], mini_tasks: Path) -> None:
    scorer = Scorer.from_pretrained(
        qwen_family["alpha"], device="cpu", weights=MINI_WEIGHTS, tasks_dir=mini_tasks
    )
    result = scorer.score()
    exact = {t: s.value for t, s in result.tasks.items() if s.metric.startswith("exact_match")}
    assert exact == dict.fromkeys(exact, 0.0)
    assert 0.0 <= result.tasks["json_field"].value < 0.5  # a similarity, not exact: noise, not answers
    expected = sum(MINI_WEIGHTS[d] * v for d, v in result.domains.items()) / sum(MINI_WEIGHTS.values())
    assert result.fitness == pytest.approx(expected) and result.fitness < 0.2


def _shallow_copy(src: Path, dst: Path, depth: int) -> Path:
    """The model at `src` with its first `depth` layers only (what a shorter frankenmerge looks like)."""
    model = AutoModelForCausalLM.from_pretrained(src)
    del model.model.layers[depth:]
    model.config.num_hidden_layers = depth
    model.config.layer_types = model.config.layer_types[:depth]
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def _scored(scorer: Scorer) -> tuple[dict, dict]:
    """A candidate's result (less wall time) and what the model wrote for every request of that run."""
    result = _scores(scorer.score())
    outputs = {name: [i.resps for i in task.instances] for name, task in scorer.tasks("validation").items()}
    return result, outputs


def test_weight_swapping_reproduces_scores(
    qwen_family: dict[str, Path], mini_tasks: Path, tmp_path: Path
) -> None:
    """A then B then A under one Scorer: A's results and generations come back exactly, B's equal a fresh
    Scorer's; a candidate of another depth is swapped in and out too."""
    kwargs = {"weights": MINI_WEIGHTS, "tasks_dir": mini_tasks}
    scorer = Scorer.from_pretrained(qwen_family["alpha"], device="cpu", **kwargs)
    a = _scored(scorer)
    scorer.load_weights(qwen_family["beta"])
    b = _scored(scorer)
    assert b[1] != a[1]  # the two models write different things
    assert b == _scored(Scorer.from_pretrained(qwen_family["beta"], device="cpu", **kwargs))
    scorer.load_weights(AutoModelForCausalLM.from_pretrained(qwen_family["alpha"]).state_dict())
    assert _scored(scorer) == a
    shallow = _shallow_copy(qwen_family["gamma"], tmp_path / "shallow", depth=4)
    scorer.load_weights(shallow)
    assert scorer.model.config.num_hidden_layers == 4 and len(scorer.model.model.layers) == 4
    assert _scored(scorer) == _scored(Scorer.from_pretrained(shallow, device="cpu", **kwargs))
    scorer.load_weights(qwen_family["alpha"])
    assert len(scorer.model.model.layers) == 6 and _scored(scorer) == a


def test_incompatible_candidate_is_refused(
    qwen_family: dict[str, Path], llama_family, mini_tasks: Path
) -> None:
    scorer = Scorer.from_pretrained(
        qwen_family["alpha"], device="cpu", weights=MINI_WEIGHTS, tasks_dir=mini_tasks
    )
    state = dict(scorer.model.state_dict())
    state["model.norm.weight"] = torch.ones(7)
    with pytest.raises(IncompatibleModelsError, match=r"'model.norm.weight' has shape \(7,\)"):
        scorer.load_weights(state)
    del state["model.norm.weight"]
    with pytest.raises(IncompatibleModelsError, match=r"candidate has no tensor 'model\.norm\.weight'"):
        scorer.load_weights(state)
    with pytest.raises(ConfigError, match="not a model folder"):
        scorer.load_weights(mini_tasks)


def test_bad_model_source_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model folder not found"):
        Scorer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"not a model folder \(no config.json\)"):
        Scorer.from_pretrained(tmp_path)


def test_yaml_written_by_a_user_is_accepted_as_is(tmp_path: Path) -> None:
    """A hand-written YAML (block style, one domain as a string, no primary_metric) is a valid task."""
    folder = tmp_path / "tasks" / "t"
    folder.mkdir(parents=True)
    (folder / "data.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    (folder / "t.yaml").write_text(
        textwrap.dedent(f"""\
            task: hand_written
            dataset_path: json
            dataset_kwargs:
              data_files:
                validation: {folder / "data.jsonl"}
                test: {folder / "data.jsonl"}
            test_split: test
            output_type: generate_until
            target_delimiter: ""
            doc_to_text: "{{{{q}}}}="
            doc_to_target: "{{{{a}}}}"
            metric_list:
              - metric: exact_match
            metadata:
              domain: math
            """)
    )
    suite = TaskSuite.discover(tmp_path / "tasks")
    assert suite.errors == {}
    assert suite.tasks["hand_written"].primary_metric == "exact_match,none"
    result = Scorer(_oracle(tmp_path / "tasks"), weights={"math": 1}, tasks_dir=tmp_path / "tasks").score()
    assert result.tasks["hand_written"].value == 1.0
