"""Malformed merge recipes and broken model folders (config, architecture, weights, tokenizer, a context
too short for the prompts): one line naming file and field, exit status 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_errors_support import assert_refused, edit, error_line, good_run, runner, write
from eval_support import write_mini_tasks

from evoforge.cli import app

_STAGE = (
    "name: {name}\nmerge_method: linear\nmodels:\n  - model: {{alpha}}\n    parameters: {{{{weight: 1.0}}}}\n"
    "---\nmerge_method: passthrough\nslices:\n  - sources: [{{{{model: {name}, layer_range: [0, 6]}}}}]\n"
)
"""A two-stage recipe whose stage is called `name` (mergekit writes it to <intermediate dir>/<name>)."""

RECIPE_CASES = {
    "not yaml": ("merge_method: [linear\n", "not valid YAML (line 2)"),
    "unknown method": ("merge_method: lineer\nmodels:\n  - model: {alpha}\n", "merge_method"),
    "missing model": (
        "merge_method: linear\nmodels:\n  - model: /nonexistent/m\n    parameters: {{weight: 1.0}}\n",
        "/nonexistent/m",
    ),
    "bad layer range": (
        "merge_method: passthrough\nslices:\n  - sources: [{{model: {alpha}, layer_range: [0, 99]}}]\n",
        "layer_range",
    ),
    "NaN weight": (
        "merge_method: linear\nmodels:\n  - model: {alpha}\n    parameters: {{weight: .nan}}\n",
        "field models.0.parameters.weight: not a finite number",
    ),
    "infinite density": (
        "merge_method: ties\nbase_model: {alpha}\nmodels:\n  - model: {alpha}\n    parameters: {{weight: 1.0, density: -.inf}}\n",
        "field models.0.parameters.density: not a finite number",
    ),
    "NaN in a gradient": (
        "merge_method: linear\nmodels:\n  - model: {alpha}\n    parameters: {{weight: [1.0, .NaN]}}\n",
        "field models.0.parameters.weight.1: not a finite number",
    ),
    "duplicate key": (
        "merge_method: linear\nmerge_method: ties\nmodels:\n  - model: {alpha}\n    parameters: {{weight: 1.0}}\n",
        "key 'merge_method' appears twice",
    ),
    "duplicate parameter": (
        "merge_method: linear\nmodels:\n  - model: {alpha}\n    parameters: {{weight: 1.0, weight: 0.0}}\n",
        "key 'weight' appears twice",
    ),
    "stage name with ..": (_STAGE.format(name="../escaped"), "name: '../escaped' is not a plain name"),
    "stage name with a slash": (_STAGE.format(name="a/b"), "name: 'a/b' is not a plain name"),
    "absolute stage name": (_STAGE.format(name="/tmp/evoforge-stage"), "is not a plain name"),
    "stage name that is a number": (_STAGE.format(name="7"), "document 1: name: 7 is not a plain name"),
    "stage name .": (_STAGE.format(name="."), "is not a plain name"),
    "stage name collides": (
        "name: ties\nmerge_method: linear\nmodels:\n  - model: {alpha}\n    parameters: {{weight: 1.0}}\n---\n"
        "merge_method: ties\nbase_model: {alpha}\nmodels:\n  - model: ties\n    parameters: {{weight: 1.0, density: 0.5}}\n",
        "ties",
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES), ids=list(RECIPE_CASES))
def test_malformed_recipe(case, qwen_family, tmp_path):
    text, fragment = RECIPE_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    recipe = write(work, "recipe.yaml", text.format(alpha=qwen_family["alpha"]))
    out = work / "merged"
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    error_line(result, str(recipe), fragment)
    assert [p.name for p in tmp_path.rglob("*")] == ["work", "recipe.yaml"]  # nothing written anywhere


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "binary"])
def test_recipe_that_is_not_utf8_text(encoding, qwen_family, tmp_path):
    text = RECIPE_CASES["NaN weight"][0].format(alpha=qwen_family["alpha"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(bytes(range(256)) if encoding == "binary" else text.encode(encoding))
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    error_line(result, str(recipe), "not UTF-8 text")
    assert not out.exists()


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


# ------------------------------------------------------------------ model folders: weights, tokenizer, config


def test_model_folder_without_config(qwen_family, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    run = edit(good_run(qwen_family), "base_models.1.path", str(empty))
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(run))
    result = runner.invoke(app, ["validate", str(run_file)])
    assert result.exit_code == 2 and "config.json" in result.stderr and "beta" in result.stderr


def test_mismatched_architectures(qwen_family, llama_family, tmp_path):
    run = edit(good_run(qwen_family), "base_models.2.path", str(llama_family["gamma"]))
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(run))
    result = runner.invoke(app, ["validate", str(run_file)])
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "gamma" in result.stderr


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def _garbage_header(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)


def _missing_shard(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


MODEL_CASES = {
    # id: (break the folder, fragments)
    "truncated safetensors": (_truncate, ["model.safetensors is", "truncated"]),
    "not a safetensors file": (_garbage_header, ["model.safetensors is truncated or not a safetensors file"]),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), ["no weights"]),
    "missing shard": (_missing_shard, ["model-00002-of-00002.safetensors is listed", "missing"]),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), ["no tokenizer"]),
    "binary config.json": (
        lambda f: (f / "config.json").write_bytes(b"\x00\xff" * 8),
        ["config.json: not UTF-8"],
    ),
    "config.json with a duplicate key": (
        lambda f: (f / "config.json").write_text('{"model_type": "qwen2", "model_type": "llama"}'),
        ["key 'model_type' appears twice"],
    ),
}


def broken_copy(family: dict[str, Path], tmp_path: Path, breaker) -> Path:
    folder = tmp_path / "broken_beta"
    shutil.copytree(family["beta"], folder)
    breaker(folder)
    return folder


@pytest.mark.parametrize("case", list(MODEL_CASES), ids=list(MODEL_CASES))
def test_broken_model_folder_is_one_line_before_any_compute(case, qwen_family, tmp_path):
    breaker, fragments = MODEL_CASES[case]
    folder = broken_copy(qwen_family, tmp_path, breaker)
    run_file = write(
        tmp_path, "run.yaml", yaml.safe_dump(edit(good_run(qwen_family), "base_models.1.path", str(folder)))
    )
    assert_refused(run_file, tmp_path, str(run_file), "base_models[1] (beta)", *fragments)


@pytest.mark.parametrize("case", ["truncated safetensors", "not a safetensors file", "no tokenizer"])
def test_eval_refuses_a_broken_model_folder(case, qwen_family, tmp_path):
    breaker, fragments = MODEL_CASES[case]
    folder = broken_copy(qwen_family, tmp_path, breaker)
    json_out = tmp_path / "result.json"
    result = runner.invoke(app, ["eval", str(folder), "--device", "cpu", "--json", str(json_out)])
    error_line(result, str(folder), *fragments)
    assert not json_out.exists()


def test_merge_refuses_a_truncated_input_model(qwen_family, tmp_path):
    folder = broken_copy(qwen_family, tmp_path, _truncate)
    text = (
        f"merge_method: linear\nmodels:\n  - model: {qwen_family['alpha']}\n    parameters: {{weight: 1.0}}\n"
    )
    text += f"  - model: {folder}\n    parameters: {{weight: 1.0}}\n"
    recipe = write(tmp_path, "recipe.yaml", text)
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    error_line(result, str(recipe), "field models.1.model", "truncated")
    assert not out.exists()


# ------------------------------------------------------------------ model context vs prompts


@pytest.fixture(scope="module")
def mini_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_tasks(tmp_path_factory.mktemp("mini_tasks"))


@pytest.mark.parametrize(
    ("context", "fragment"),
    [
        (
            12,
            "prompt of 21 tokens + max_gen_toks 12 exceed the model's context of 12 tokens",
        ),  # lm-eval asserted
        (
            40,
            "prompt of 36 tokens + max_gen_toks 12 exceed the model's context of 40 tokens",
        ),  # prompt was cut
    ],
    ids=["budget reaches the context", "prompt plus budget exceed it"],
)
def test_a_model_context_shorter_than_prompt_plus_budget_is_one_line(
    context, fragment, qwen_family, mini_tasks, tmp_path
):
    folder = broken_copy(qwen_family, tmp_path, lambda f: None)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    json_out = tmp_path / "result.json"
    args = ["eval", str(folder), "--tasks-dir", str(mini_tasks), "--device", "cpu", "--weight", "math=1"]
    line = error_line(runner.invoke(app, [*args, "--json", str(json_out)]), fragment)
    assert str(mini_tasks) in line and "max_position_embeddings" in line and "split validation" in line
    assert not json_out.exists()
