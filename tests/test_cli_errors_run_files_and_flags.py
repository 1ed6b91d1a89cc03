"""Malformed run files (keys, types, ranges, non-finite numbers, encodings, duplicate keys) and bad flags:
one line naming file or flag and field, exit status 2, nothing written."""

from __future__ import annotations

import json

import pytest
import yaml
from cli_errors_support import assert_refused, edit, error_line, good_run, runner, write

from evoforge.cli import app, forge_app
from evoforge.userfile import load_yaml

INF, NAN = float("inf"), float("nan")


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
    # Non-finite numbers: YAML `.inf`/`.nan` passed every `gt`/`ge` bound before.
    "infinite model weight": (("base_models.0.weight", INF), ["base_models[0].weight", "finite number"]),
    "NaN model weight": (("base_models.1.weight", NAN), ["base_models[1].weight", "finite number"]),
    "infinite dare_amplification": (
        ("merge_operators.dare_amplification", INF),
        ["merge_operators.dare_amplification", "finite number"],
    ),
    "NaN linear_weight": (
        ("merge_operators.linear_weight", NAN),
        ["merge_operators.linear_weight", "finite"],
    ),
    "infinite evaluation weight": (("evaluation_weights.math", INF), ["evaluation_weights.math", "finite"]),
    "NaN evaluation weight": (("evaluation_weights.code", NAN), ["evaluation_weights.code", "finite"]),
    "infinite plateau_threshold": (("plateau_threshold", INF), ["plateau_threshold", "finite number"]),
    "NaN mutation_rate": (("mutation_rate", NAN), ["mutation_rate", "finite number"]),
    "zero generations in the file": (
        ("max_generations", 0),
        ["max_generations", "greater than or equal to 1"],
    ),
    "run name is a path": (("name", "../elsewhere"), ["name", "should match pattern"]),
}


@pytest.mark.parametrize("case", list(RUN_CASES), ids=list(RUN_CASES))
def test_malformed_run_file(case, qwen_family, tmp_path):
    (key, value), fragments = RUN_CASES[case]
    run_file = tmp_path / "run.yaml"
    run_file.write_text(yaml.safe_dump(edit(good_run(qwen_family), key, value)))
    assert_refused(run_file, tmp_path, str(run_file), *fragments)


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


def test_good_run_file_validates_and_writes_eight_seeds(qwen_family, tmp_path):
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(good_run(qwen_family)))
    assert runner.invoke(app, ["validate", str(run_file)]).exit_code == 0
    result = runner.invoke(app, ["seeds", str(run_file), "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert sorted(p.stem for p in (tmp_path / "s").glob("*.yaml")) == sorted(
        f"{a}-{b}-{c}" for a in ("linear", "slerp") for b in ("ties", "dare") for c in ("frankenmerge", "dfs")
    )


def test_error_message_is_printed_as_text_not_markup(tmp_path):
    """`[data]` in a path (or in the demo's `pip install 'evoforge[data]'` hint) must reach the user intact."""
    path = tmp_path / "run[data].yaml"
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and f"{path}: cannot read" in result.stderr, result.stderr


# ------------------------------------------------------------------ run files as bytes: encodings, duplicates


def _yaml(run: dict) -> bytes:
    return yaml.safe_dump(run, sort_keys=False).encode()


RAW_RUN_CASES = {
    # id: (file name, run dict → file bytes, fragments)
    "UTF-16 YAML": ("run.yaml", lambda run: yaml.safe_dump(run).encode("utf-16"), ["not UTF-8 text"]),
    "binary file": ("run.yaml", lambda run: bytes(range(256)) * 4, ["not UTF-8 text", "byte 128"]),
    "UTF-16 JSON": ("run.json", lambda run: json.dumps(run).encode("utf-16-le"), ["not UTF-8 text"]),
    "duplicate top-level YAML key": (
        "run.yaml",
        lambda run: _yaml(run) + b"dtype: bfloat16\n",
        ["key 'dtype' appears twice", "line "],
    ),
    "duplicate nested YAML key": (
        "run.yaml",
        lambda run: _yaml(run) + b"merge_operators:\n  slerp_t: 0.2\n  slerp_t: 0.9\n",
        ["key 'slerp_t' appears twice"],
    ),
    "duplicate JSON key": (
        "run.json",
        lambda run: json.dumps(run)[:-1].encode() + b', "seed": 1, "seed": 2}',
        ["key 'seed' appears twice"],
    ),
    "JSON NaN": (
        "run.json",
        lambda run: json.dumps(edit(run, "merge_operators.slerp_t", NAN)).encode(),
        ["merge_operators.slerp_t", "finite number"],
    ),
    "JSON Infinity": (
        "run.json",
        lambda run: json.dumps(edit(run, "base_models.2.weight", INF)).encode(),
        ["base_models[2].weight", "finite number"],
    ),
    "duplicate key in a flow mapping": (
        "run.yaml",
        lambda run: _yaml(run) + b"evaluation: {batch_size: 4, batch_size: 8}\n",
        ["key 'batch_size' appears twice"],
    ),
}


@pytest.mark.parametrize("case", list(RAW_RUN_CASES), ids=list(RAW_RUN_CASES))
def test_run_file_bytes_are_read_strictly(case, qwen_family, tmp_path):
    name, make, fragments = RAW_RUN_CASES[case]
    run_file = tmp_path / name
    run_file.write_bytes(make(good_run(qwen_family)))
    assert_refused(run_file, tmp_path, str(run_file), *fragments)


def test_a_utf8_bom_and_yaml_merge_keys_are_still_read(qwen_family, tmp_path):
    """What the strict reader must not refuse: a BOM (Windows editors) and `<<:` merges that override."""
    run_file = tmp_path / "run.yaml"
    run_file.write_bytes("\ufeff".encode() + _yaml(good_run(qwen_family)))
    assert runner.invoke(app, ["validate", str(run_file), "--no-models"]).exit_code == 0
    merged = "base: &b {name: a, weight: 2.0}\nm: {<<: *b, weight: 3.0}\n"
    assert load_yaml(merged, "m.yaml")["m"] == {"name": "a", "weight": 3.0}


# ------------------------------------------------------------------ flags


FLAG_CASES = {
    "--gens 0": (["--gens", "0"], ["--gens: max_generations", "greater than or equal to 1"]),
    "--gens -3": (["--gens", "-3"], ["--gens: max_generations", "greater than or equal to 1"]),
}


@pytest.mark.parametrize("case", list(FLAG_CASES), ids=list(FLAG_CASES))
@pytest.mark.parametrize("command", ["run", "forge evo"])
def test_a_bad_flag_is_blamed_on_the_flag_not_the_run_file(case, command, qwen_family, tmp_path):
    flags, fragments = FLAG_CASES[case]
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(good_run(qwen_family)))
    out = tmp_path / "out"
    if command == "run":
        result = runner.invoke(app, ["run", str(run_file), *flags, "--output-dir", str(out)])
    else:
        result = runner.invoke(
            forge_app, ["evo", "--config", str(run_file), *flags, "--output-dir", str(out)]
        )
    line = error_line(result, *fragments)
    assert str(run_file) not in line and not out.exists()


@pytest.mark.parametrize("spec", ["math=inf", "math=nan", "code=-inf", "math=1e999"])
def test_eval_weight_must_be_finite(spec, tmp_path):
    json_out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", str(tmp_path), "--weight", spec, "--json", str(json_out)])
    error_line(result, "--weight", "finite number", spec)
    assert not json_out.exists()
