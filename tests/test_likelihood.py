"""Likelihood fitness: the gold answer's teacher-forced probability, checked against a hand computation, a
steered model, the real tasks' scorers, the run file and the records of a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from eval_support import (
    MINI_WEIGHTS,
    REAL_TASKS,
    needs_real_tasks,
    one_torch_thread,
    write_mini_tasks,
    write_task,
)
from evolution_support import run_config, write_mc_tasks
from lm_eval.api.model import LM
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from evoforge import EvolutionConfig, EvoMergePipeline
from evoforge.cli import app
from evoforge.config import EvaluationConfig
from evoforge.evaluate import Scorer, TaskSuite
from evoforge.evaluate.likelihood import encode_gold, gold_requests, teacher_forced
from evoforge.evolve.records import Baselines, EvaluationRecord, read_records
from evoforge.evolve.run_dir import RunDir

LIKELIHOOD = EvaluationConfig(fitness_metric="likelihood")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The mini tasks plus a code-like one: its prompt ends in a newline and its target carries its own
    indentation (`target_delimiter: ""`), the case where lm-eval moves the prompt's trailing whitespace into
    the continuation."""
    root = write_mini_tasks(tmp_path_factory.mktemp("likelihood_tasks"))
    rows = {
        split: [{"question": f"def add_{i}(x):", "answer": f"    return x + {i}"} for i in span]
        for split, span in (("validation", range(4)), ("test", range(4, 7)))
    }
    write_task(root, "body", "code", rows, doc_to_text="{{question}}\n", target_delimiter="")
    return root


WEIGHTS = {**MINI_WEIGHTS, "code": 1.0}


def _prompt_and_gold(task: str, row: dict) -> tuple[str, str]:
    """The prompt and gold continuation as the task YAMLs above write them (`doc_to_text`, the delimiter)."""
    if task == "body":
        return f"{row['question']}\n", row["answer"]
    return f"Question: {row['question']}\nAnswer:", " " + row["answer"]


def _hand_likelihood(model, tokenizer, prompt: str, gold: str) -> float:
    """exp(mean log p(gold token | prefix)) from one forward pass, on lm-eval's token boundary: trailing
    whitespace of the prompt belongs to the continuation, and the continuation's tokens are those of
    prompt+gold after the prompt's own tokens."""
    stripped = prompt.rstrip()
    gold = prompt[len(stripped) :] + gold
    whole = tokenizer(stripped + gold, add_special_tokens=False)["input_ids"]
    n_prompt = len(tokenizer(stripped, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    targets = whole[n_prompt:]
    picked = [logprobs[n_prompt - 1 + i, t].item() for i, t in enumerate(targets)]
    return math.exp(sum(picked) / len(picked))


def test_gold_likelihood_equals_a_hand_computed_forward_pass(qwen_family: dict[str, Path], tasks_dir: Path):
    scorer = Scorer.from_pretrained(
        qwen_family["alpha"], device="cpu", evaluation=LIKELIHOOD, weights=WEIGHTS, tasks_dir=tasks_dir
    )
    result = scorer.score()
    assert result.metric == "likelihood" and result.split == "validation"
    model = AutoModelForCausalLM.from_pretrained(qwen_family["alpha"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(qwen_family["alpha"])
    for task, score in result.tasks.items():
        rows = [json.loads(line) for line in (tasks_dir / task / "validation.jsonl").read_text().splitlines()]
        expected = [_hand_likelihood(model, tokenizer, *_prompt_and_gold(task, r)) for r in rows]
        assert score.items == pytest.approx(expected, rel=1e-4), task
        assert score.metric == "likelihood" and score.value == pytest.approx(sum(expected) / len(expected))
        assert all(0.0 < p <= 1.0 for p in score.items)
    domains = {d: sum(result.tasks[t].value for t in ts) / len(ts) for d, ts in _domain_tasks(result).items()}
    assert result.domains == pytest.approx(domains)
    assert result.fitness == pytest.approx(
        sum(WEIGHTS[d] * v for d, v in domains.items()) / sum(WEIGHTS.values())
    )
    assert scorer.score("test").metric == "accuracy", "the held-out split is always scored by accuracy"


@pytest.mark.parametrize("family", ["qwen_family", "llama_family"])
def test_teacher_forced_scores_equal_lm_evals_loglikelihood(
    family: str, tasks_dir: Path, request, monkeypatch
):
    """The fast path (left-padded rows, logits only where the answers are) gives lm-eval's per-item
    log-probabilities at any batch size, for models with and without `logits_to_keep`, and truncates a row
    longer than the model's context as lm-eval does (its last max_length + 1 tokens)."""
    folder = request.getfixturevalue(family)["alpha"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tasks = TaskSuite.discover(tasks_dir).build("validation")
    reference = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    gold = encode_gold(reference, tasks)
    items = gold.flat
    lengths = sorted({len(ctx) + len(cont) for _, ctx, cont in items})
    assert len(items) >= 10 and len(lengths) > 3, "items of several lengths, so batches pad"
    expected = [logprob for logprob, _ in reference._loglikelihood_tokens(items)]
    for batch_size in (1, 3, 64):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        assert teacher_forced(lm, gold) == pytest.approx(expected, rel=1e-5, abs=1e-5), batch_size
    whole = type(model).forward  # a model whose forward takes no `logits_to_keep`: all logits, then sliced
    with monkeypatch.context() as patch:
        patch.setattr(
            model,
            "forward",
            lambda input_ids, attention_mask, position_ids: whole(
                model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ),
        )
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3)
        assert teacher_forced(lm, gold) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    monkeypatch.setattr(HFLM, "max_length", property(lambda self: lengths[len(lengths) // 2] - 2))
    short = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    truncated = [logprob for logprob, _ in short._loglikelihood_tokens(items)]
    assert truncated != pytest.approx(expected), "the monkeypatched context truncates some rows"
    assert teacher_forced(short, gold) == pytest.approx(truncated, rel=1e-5, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_teacher_forced_gives_the_same_bits_on_every_call_on_cuda(
    qwen_family: dict[str, Path], tasks_dir: Path
):
    """Fitness is compared across processes (Ray actors, resumed runs): each item's sum must not depend on the
    order in which the device's threads add (CUDA's index_add_ uses atomics)."""
    model = AutoModelForCausalLM.from_pretrained(qwen_family["alpha"]).eval().to("cuda")
    tokenizer = AutoTokenizer.from_pretrained(qwen_family["alpha"])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64)
    gold = encode_gold(lm, TaskSuite.discover(tasks_dir).build("validation"))
    first = teacher_forced(lm, gold)
    assert all(teacher_forced(lm, gold) == first for _ in range(20))


def _domain_tasks(result) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, task in result.tasks.items():
        for domain in task.domains:
            out.setdefault(domain, []).append(name)
    return out


def _steered(family: dict[str, Path], tasks_dir: Path, answers: dict[str, list[str]]) -> dict:
    """The tiny model after a few optimizer steps on the validation prompts followed by `answers`."""
    model = AutoModelForCausalLM.from_pretrained(family["alpha"])
    tokenizer = AutoTokenizer.from_pretrained(family["alpha"])
    texts = []
    for task, golds in answers.items():
        rows = [json.loads(line) for line in (tasks_dir / task / "validation.jsonl").read_text().splitlines()]
        for row, answer in zip(rows, golds, strict=True):
            prompt, _ = _prompt_and_gold(task, row)
            texts.append(prompt + " " + answer + "\n")
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    return model.state_dict()


def test_a_model_steered_to_the_gold_answers_scores_higher(qwen_family: dict[str, Path], tmp_path: Path):
    tasks = write_mini_tasks(tmp_path / "tasks")
    gold = {
        t: [json.loads(line)["answer"] for line in (tasks / t / "validation.jsonl").read_text().splitlines()]
        for t in ("arith", "numwords", "arith_fr", "json_field")
    }
    away = {t: [a[::-1] + "x" for a in answers] for t, answers in gold.items()}
    scorer = Scorer.from_pretrained(
        qwen_family["alpha"], device="cpu", evaluation=LIKELIHOOD, weights=MINI_WEIGHTS, tasks_dir=tasks
    )
    before = scorer.score()
    scorer.load_weights(_steered(qwen_family, tasks, gold))
    towards = scorer.score()
    scorer.load_weights(_steered(qwen_family, tasks, away))
    against = scorer.score()
    assert towards.fitness > before.fitness + 0.1 and towards.fitness > against.fitness + 0.1
    for task in gold:
        assert towards.tasks[task].value > against.tasks[task].value, task


class _EchoLM(LM):
    """Generates, for each prompt, the gold continuation the likelihood path scores for it."""

    def __init__(self, gold: dict[str, str]) -> None:
        super().__init__()
        self.gold = gold

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.gold[req.args[0]] for req in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@needs_real_tasks
@pytest.mark.parametrize("split", ["validation", "test"])
def test_gold_continuation_is_a_correct_generation_on_every_real_task(split: str) -> None:
    """Generating exactly the scored gold continuation gets full marks from each task's own scorer (code runs
    in the sandbox), and a code task's continuation is its canonical solution, unchanged."""
    limit = 3
    tasks = TaskSuite.discover(REAL_TASKS).build(split)
    echo = _EchoLM({})
    for name, task in tasks.items():
        for req in gold_requests(task, echo, limit):
            context, continuation = req.args
            echo.gold[context] = continuation
            if "entry_point" in req.doc:
                assert continuation == req.doc["answer"], name
    result = Scorer(echo, evaluation=EvaluationConfig(limit=limit), tasks_dir=REAL_TASKS).score(split)
    assert result.metric == "accuracy"
    assert {n: t.items for n, t in result.tasks.items()} == {n: [1.0] * limit for n in tasks}


def test_unknown_metric_is_one_line_naming_the_field(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    run = {
        "name": "tiny",
        "base_models": [{"name": n, "path": str(qwen_family[n])} for n in ("alpha", "beta")],
        "evaluation": {"fitness_metric": "perplexity"},
    }
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(run))
    result = CliRunner().invoke(app, ["validate", str(run_file)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(run_file) in lines[0], lines
    assert "evaluation.fitness_metric" in lines[0] and "'accuracy' or 'likelihood'" in lines[0], lines[0]


def test_a_likelihood_run_records_its_metric(qwen_family: dict[str, Path], tmp_path: Path) -> None:
    tasks = write_mc_tasks(tmp_path / "tasks", items=6)
    data = run_config(qwen_family, tasks, tmp_path / "run", max_generations=1, wandb_mode="disabled")
    data["evaluation"]["fitness_metric"] = "likelihood"
    EvoMergePipeline(EvolutionConfig(**data)).run()
    records = list(read_records(tmp_path / "run" / "evaluations.jsonl", EvaluationRecord))
    fit = [r for r in records if r.split == "validation"]
    held = [r for r in records if r.split == "test"]
    assert len(fit) == 8 and held
    assert {r.scores.metric for r in fit} == {"likelihood"} and {r.scores.metric for r in held} == {
        "accuracy"
    }
    assert len({r.fitness for r in fit}) > 1 and all(0.0 < r.fitness <= 1.0 for r in fit)
    baselines = Baselines.model_validate_json((tmp_path / "run" / "baselines.json").read_text())
    assert {s["validation"].metric for s in baselines.models.values()} == {"likelihood"}
    assert {s["test"].metric for s in baselines.models.values()} == {"accuracy"}
    assert all(r.scores.fitness_se > 0 for r in fit)  # likelihood varies item to item
    items = RunDir(tmp_path / "run").read_items()
    assert items.metric == "accuracy" and set(items.base_models) == set(baselines.models)
