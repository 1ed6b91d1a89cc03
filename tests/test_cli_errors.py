"""Malformed run files and recipes: one line naming file and field, exit status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evoforge.cli import app

runner = CliRunner()


def good_run(family: dict[str, Path]) -> dict:
    return {
        "name": "tiny",
        "base_models": [{"name": n, "path": str(family[n])} for n in ("alpha", "beta", "gamma")],
        "dtype": "float32",
    }


def edit(run: dict, dotted: str, value) -> dict:
    """Set (or delete, for value=...) a dotted key such as `merge_operators.slerp_t` or `base_models.0.path`."""
    run = json.loads(json.dumps(run))
    *parents, last = dotted.split(".")
    node = run
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is ...:
        del node[int(last) if isinstance(node, list) else last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return run


RUN_CASES = {
    # id: (edit, expected fragments of the one-line message)
    "unknown top-level key": (("mutaton_rate", 0.1), ["mutaton_rate", "unknown key"]),
    "unknown operator key": (
        ("merge_operators.ties_treshold", 0.2),
        ["merge_operators.ties_treshold", "unknown key"],
    ),
    "unknown model key": (("base_models.0.weigth", 2.0), ["base_models[0].weigth", "unknown key"]),
    "missing base_models": (("base_models", ...), ["base_models", "missing"]),
    "one base model": (("base_models", [{"name": "a", "path": "/x"}]), ["base_models", "at least 2"]),
    "model without path": (("base_models.1.path", ...), ["base_models[1].path", "missing"]),
    "wrong type": (("mutation_rate", "high"), ["mutation_rate", "number"]),
    "out of range": (
        ("merge_operators.slerp_t", 1.5),
        ["merge_operators.slerp_t", "less than or equal to 1"],
    ),
    "negative weight": (("base_models.0.weight", -1), ["base_models[0].weight", "greater than 0"]),
    "duplicate names": (
        ("base_models.1.name", "alpha"),
        ["base_models", "duplicate base model name 'alpha'"],
    ),
    "reserved name": (("base_models.2.name", "crossover"), ["base_models", "reserved"]),
    "bad layer source": (("merge_operators.frankenmerge_layers", [0, 7]), ["frankenmerge_layers[1]"]),
    "empty layer plan": (("merge_operators.frankenmerge_layers", []), ["frankenmerge_layers", "at least 1"]),
    "population too small": (("population_size", 2), ["population_size", "greater than or equal to 5"]),
    "zero weights": (("evaluation_weights", {"math": 0.0}), ["evaluation_weights", "positive"]),
    "bad device": (("device", "tpu"), ["device", "'cpu'"]),
    "bad dtype": (("dtype", "int8"), ["dtype"]),
    "ancestor clash": (("ancestor", {"name": "alpha", "path": "/x"}), ["ancestor.name 'alpha'"]),
    "missing model folder": (
        ("base_models.2.path", "/nonexistent/model"),
        ["base_models[2]", "no such folder"],
    ),
    "bad evaluation key": (("evaluation.split", "dev"), ["evaluation.split", "unknown key"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES), ids=list(RUN_CASES))
def test_malformed_run_file(case, qwen_family, tmp_path):
    (key, value), fragments = RUN_CASES[case]
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(edit(good_run(qwen_family), key, value)))
    out = tmp_path / "seeds_out"
    for args in (["validate", str(run_file)], ["seeds", str(run_file), "--out", str(out)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: ") and str(run_file) in lines[0]
        for f in fragments:
            assert f in lines[0], (f, lines[0])
    assert not out.exists()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_unreadable_and_unparsable_run_files(tmp_path):
    cases = {
        tmp_path / "absent.yaml": "cannot read",
        write(tmp_path, "broken.yaml", "base_models: [\n  - {name: a\n"): "not valid YAML (line",
        write(tmp_path, "broken.json", '{"base_models": [}'): "not valid JSON (line 1)",
        write(tmp_path, "list.yaml", "- a\n- b\n"): "expected a mapping",
    }
    for path, fragment in cases.items():
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 2
        assert (
            result.stderr.strip().count("\n") == 0
            and fragment in result.stderr
            and str(path) in result.stderr
        )


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


def test_good_run_file_validates_and_writes_eight_seeds(qwen_family, tmp_path):
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(good_run(qwen_family)))
    assert runner.invoke(app, ["validate", str(run_file)]).exit_code == 0
    result = runner.invoke(app, ["seeds", str(run_file), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in (tmp_path / "s").glob("*.yaml")) == sorted(
        f"{a}-{b}-{c}" for a in ("linear", "slerp") for b in ("ties", "dare") for c in ("frankenmerge", "dfs")
    )


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
    "stage name collides": (
        "name: ties\nmerge_method: linear\nmodels:\n  - model: {alpha}\n    parameters: {{weight: 1.0}}\n---\n"
        "merge_method: ties\nbase_model: {alpha}\nmodels:\n  - model: ties\n    parameters: {{weight: 1.0, density: 0.5}}\n",
        "ties",
    ),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES), ids=list(RECIPE_CASES))
def test_malformed_recipe(case, qwen_family, tmp_path):
    text, fragment = RECIPE_CASES[case]
    recipe = write(tmp_path, "recipe.yaml", text.format(alpha=qwen_family["alpha"]))
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(recipe) in lines[0] and fragment in lines[0], lines
    assert not out.exists()


def test_missing_recipe_file(tmp_path):
    result = runner.invoke(app, ["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "cannot read" in result.stderr


def test_error_message_is_printed_as_text_not_markup(tmp_path):
    """`[data]` in a path (or in the demo's `pip install 'evoforge[data]'` hint) must reach the user intact."""
    path = tmp_path / "run[data].yaml"
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and f"{path}: cannot read" in result.stderr, result.stderr
