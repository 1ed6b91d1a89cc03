"""Scoring: task discovery, the oracle and random-model sanity checks, fitness, weight swapping."""

from __future__ import annotations

import json
import random
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_support import (
    MINI_WEIGHTS,
    REAL_TASKS,
    WRONG,
    OracleLM,
    needs_real_tasks,
    one_torch_thread,
    oracle,
    write_mini_tasks,
    write_task,
)
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from evoforge.config import DOMAINS, EvaluationConfig
from evoforge.errors import ConfigError, IncompatibleModelsError
from evoforge.evaluate import Scorer, TaskError, TaskSuite, compute_fitness
from evoforge.evaluate.stats import bootstrap


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def mini_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_tasks(tmp_path_factory.mktemp("mini_tasks"))


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
    write_task(tmp_path / "tasks" / "poetry", "rhymes", "poetry", {"validation": rows, "test": rows[:1]})
    suite = TaskSuite.discover(tmp_path / "tasks")
    assert [t.name for t in suite.domains["poetry"]] == ["rhymes"]
    assert "poetry" not in DOMAINS
    scorer = Scorer(oracle(tmp_path / "tasks"), weights={"poetry": 1.0}, tasks_dir=tmp_path / "tasks")
    result = scorer.score("validation", limit=2)  # every task runs: keep the sandboxed code items few
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
        Scorer(oracle(mini_tasks), weights=MINI_WEIGHTS, tasks_dir=tmp_path / "tasks")


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
        Scorer(oracle(mini_tasks), tasks_dir=mini_tasks)  # default weights include code


def test_run_file_task_selection(mini_tasks: Path) -> None:
    """`evaluation.tasks` picks tasks per domain and decides their domains."""
    evaluation = EvaluationConfig(tasks={"math": ["arith"], "structured_data": ["json_field"]})
    weights = {"math": 1, "structured_data": 1}
    scorer = Scorer(oracle(mini_tasks), evaluation=evaluation, weights=weights, tasks_dir=mini_tasks)
    assert sorted(scorer.score().tasks) == ["arith", "json_field"]
    with pytest.raises(ConfigError, match=r"evaluation\.tasks\.math: unknown task 'nope'"):
        Scorer(
            oracle(mini_tasks), evaluation=EvaluationConfig(tasks={"math": ["nope"]}), tasks_dir=mini_tasks
        )


# ---------------------------------------------------------------------- the oracle and fitness


def test_oracle_scores_one_on_every_mini_task_and_split(mini_tasks: Path) -> None:
    scorer = Scorer(oracle(mini_tasks), weights=MINI_WEIGHTS, tasks_dir=mini_tasks)
    for split, n in (("validation", 6), ("test", 4)):
        result = scorer.score(split)
        assert {t: (s.value, s.n_items) for t, s in result.tasks.items()} == {
            t: (1.0, n) for t in result.tasks
        }
        assert result.fitness == 1.0 and result.split == split


def test_fitness_is_the_weighted_mean_of_domain_means(mini_tasks: Path) -> None:
    """A cross-domain task counts in both domains; an unweighted domain is reported, not counted."""
    weights = {"math": 1.0, "structured_data": 3.0}
    result = Scorer(oracle(mini_tasks, wrong="arith_fr"), weights=weights, tasks_dir=mini_tasks).score()
    assert result.tasks["arith_fr"].value == 0.0 and result.tasks["arith"].value == 1.0
    assert result.domains == {"math": 0.5, "multilingual": 0.5, "structured_data": 1.0}
    assert result.fitness == pytest.approx((1.0 * 0.5 + 3.0 * 1.0) / 4.0)
    assert compute_fitness({"a": 0.2, "b": 0.8, "c": 1.0}, {"a": 1, "b": 3}) == pytest.approx(0.65)


class _OddDocsWrong(OracleLM):
    """The oracle, wrong on every odd-numbered document."""

    def generate_until(self, requests) -> list[str]:
        answers = super().generate_until(requests)
        return [WRONG if req.doc_id % 2 else answer for req, answer in zip(requests, answers)]


def test_per_item_scores_are_in_document_order_and_give_the_standard_errors(mini_tasks: Path) -> None:
    perfect = Scorer(oracle(mini_tasks), weights=MINI_WEIGHTS, tasks_dir=mini_tasks).score("validation")
    assert perfect.fitness_se == 0.0 and perfect.domain_se == dict.fromkeys(perfect.domains, 0.0)
    lm = _OddDocsWrong(tasks_dir=str(mini_tasks))
    result = Scorer(lm, weights=MINI_WEIGHTS, tasks_dir=mini_tasks).score("validation")
    assert result.tasks["arith"].items == [1.0, 0.0] * 3
    for task in result.tasks.values():
        assert sum(task.items) / len(task.items) == pytest.approx(task.value)
    spread = bootstrap(result.item_scores(), result.task_domains(), MINI_WEIGHTS)
    assert result.fitness_se == spread.fitness.se > 0.05
    assert result.domain_se == {d: iv.se for d, iv in spread.domains.items()}


def test_split_selection_does_not_leak(mini_tasks: Path) -> None:
    """Validation and test are separate task objects; the YAML as lm-eval reads it is untouched."""
    scorer = Scorer(oracle(mini_tasks, wrong="numwords"), weights=MINI_WEIGHTS, tasks_dir=mini_tasks)
    first = _scores(scorer.score("validation"))
    assert _scores(scorer.score("test"))["n_items"] == 16
    assert _scores(scorer.score("validation")) == first and first["n_items"] == 24
    manager = TaskManager(include_path=str(mini_tasks), include_defaults=False)
    assert manager.load("arith")["tasks"]["arith"].config.test_split == "test"


@pytest.mark.slow
@needs_real_tasks
def test_oracle_scores_one_on_every_real_task() -> None:
    """The shipped suite through evoforge on the fitness split (the lm-eval CLI test covers the test split:
    each code item runs a sandboxed program, so each split is scored once)."""
    suite = TaskSuite.discover(REAL_TASKS)
    assert suite.errors == {}
    assert set(DOMAINS) <= set(suite.domains)
    assert any(len(t.domains) > 1 for t in suite.tasks.values()), "no cross-domain task"
    result = Scorer(oracle(REAL_TASKS), tasks_dir=REAL_TASKS).score("validation")
    assert {t: s.value for t, s in result.tasks.items()} == dict.fromkeys(suite.tasks, 1.0)
    assert result.fitness == 1.0 and result.n_items == sum(
        suite.item_counts()[t]["validation"] for t in suite.tasks
    )


@pytest.mark.slow
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


def test_generation_budget_from_the_run_file(qwen_family: dict[str, Path], mini_tasks: Path) -> None:
    """The tasks' own max_gen_toks (12) by default; an explicit `max_new_tokens` replaces it."""

    def budgets(evaluation: EvaluationConfig) -> set[int]:
        scorer = Scorer.from_pretrained(
            qwen_family["alpha"],
            device="cpu",
            evaluation=evaluation,
            weights=MINI_WEIGHTS,
            tasks_dir=mini_tasks,
        )
        scorer.score(limit=2)
        return {
            i.args[1]["max_gen_toks"] for task in scorer.tasks("validation").values() for i in task.instances
        }

    assert budgets(EvaluationConfig()) == {12}
    assert budgets(EvaluationConfig(max_new_tokens=3)) == {3}


@pytest.mark.parametrize("metric", ["accuracy", "likelihood"])
def test_scoring_draws_nothing_from_the_global_generators_once_seeded(
    qwen_family: dict[str, Path], mini_tasks: Path, metric: str
) -> None:
    """What lets the next candidate's merge run beside scoring (`overlap_merges`): DARE draws its masks from
    torch's global generator, and a merge restores python's, numpy's and torch's when it ends."""

    def states() -> tuple:
        return random.getstate(), np.random.get_state()[1].tobytes(), torch.get_rng_state().numpy().tobytes()

    scorer = Scorer.from_pretrained(
        qwen_family["alpha"], device="cpu", weights=MINI_WEIGHTS, tasks_dir=mini_tasks
    )
    seeded: list[tuple] = []
    scorer.score(limit=3, metric=metric, seeded=lambda: seeded.append(states()))
    assert len(seeded) == 1 and states() == seeded[0]


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


def test_candidate_with_another_config_gets_a_rebuilt_model(
    qwen_family: dict[str, Path], llama_family: dict[str, Path], mini_tasks: Path
) -> None:
    """A folder whose config differs beyond depth (here Llama, untied embeddings) is still scored right."""
    kwargs = {"weights": MINI_WEIGHTS, "tasks_dir": mini_tasks}
    scorer = Scorer.from_pretrained(qwen_family["alpha"], device="cpu", **kwargs)
    scorer.load_weights(llama_family["alpha"])
    assert type(scorer.model).__name__ == "LlamaForCausalLM" and scorer.lm.model is scorer.model
    assert _scored(scorer) == _scored(Scorer.from_pretrained(llama_family["alpha"], device="cpu", **kwargs))


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
    with pytest.raises(ConfigError, match="nope: no such folder"):
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
    result = Scorer(oracle(tmp_path / "tasks"), weights={"math": 1}, tasks_dir=tmp_path / "tasks").score()
    assert result.tasks["hand_written"].value == 1.0
