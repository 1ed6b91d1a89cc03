"""Malformed run files and recipes: one line naming file and field, exit status 2, nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from eval_support import write_mini_tasks
from typer.testing import CliRunner

from evoforge.cli import app, forge_app
from evoforge.userfile import load_yaml

runner = CliRunner()
INF, NAN = float("inf"), float("nan")


def error_line(result, *fragments: str) -> str:
    """Exit status 2 and exactly one line on stderr, `error: ...`, holding every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


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


def assert_refused(run_file: Path, tmp_path: Path, *fragments: str) -> None:
    """validate, seeds and run each refuse the run file in one line holding `fragments`; nothing written."""
    seeds_out, run_out = tmp_path / "seeds_out", tmp_path / "run_out"
    for args in (
        ["validate", str(run_file)],
        ["seeds", str(run_file), "--out", str(seeds_out)],
        ["run", str(run_file), "--output-dir", str(run_out)],
    ):
        error_line(runner.invoke(app, args), *fragments)
    assert not seeds_out.exists() and not run_out.exists()


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


# ------------------------------------------------------------------ model folders: weights, tokenizer, config


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


# ------------------------------------------------------------------ output folders


def _commands(run_file: Path, recipe: Path, model: Path, out: Path) -> dict[str, list[str]]:
    return {
        "validate": ["validate", str(run_file)],  # the run file's own output_dir is `out`
        "run": ["run", str(run_file), "--output-dir", str(out)],
        "seeds": ["seeds", str(run_file), "--out", str(out)],
        "merge": ["merge", str(recipe), "--out", str(out), "--device", "cpu"],
        "eval": ["eval", str(model), "--device", "cpu", "--json", str(out)],
    }


def _linear_recipe(family: dict[str, Path]) -> str:
    return "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {family[n]}\n    parameters: {{weight: 1.0}}\n" for n in ("alpha", "beta")
    )


OUTPUT_CASES = {
    # id: (command, where the output goes, given a file `taken` and a folder `folder`; fragments)
    "validate output_dir is a file": ("validate", "taken", ["output_dir", "exists and is not a folder"]),
    "run output_dir is a file": ("run", "taken", ["output_dir", "exists and is not a folder"]),
    "run output_dir below a file": ("run", "taken/run", ["output_dir", "is a file, not a folder"]),
    "seeds --out is a file": ("seeds", "taken", ["--out", "exists and is not a folder"]),
    "merge --out is a file": ("merge", "taken", ["--out", "exists and is not a folder"]),
    "merge --out below a file": ("merge", "taken/model", ["--out", "is a file, not a folder"]),
    "eval --json is a folder": ("eval", "folder", ["--json", "is a folder, not a file"]),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES), ids=list(OUTPUT_CASES))
def test_unusable_output_path_is_one_line(case, qwen_family, tmp_path):
    command, where, fragments = OUTPUT_CASES[case]
    run = {**good_run(qwen_family), "output_dir": str(tmp_path / where)}
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(run))
    recipe = write(tmp_path, "recipe.yaml", _linear_recipe(qwen_family))
    write(tmp_path, "taken", "the user's file")
    (tmp_path / "folder").mkdir()
    before = sorted(tmp_path.rglob("*"))
    args = _commands(run_file, recipe, qwen_family["alpha"], tmp_path / where)[command]
    error_line(runner.invoke(app, args), *fragments)
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "taken").read_text() == "the user's file"


needs_mounts = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root to mount a tmpfs in a namespace"
)


def in_mount_namespace(mount_options: str, fill: bool, args: list[str], mount_point: Path):
    """`python -m evoforge ARGS` with a fresh tmpfs (`mount_options`) on `mount_point`, in a private mount
    namespace (nothing leaks to the host), optionally filled up first; returns (process, listing after)."""
    script = (
        f"mount -t tmpfs -o {mount_options} tmpfs {mount_point}"
        + (f" && (dd if=/dev/zero of={mount_point}/fill bs=4k 2>/dev/null; true)" if fill else "")
        + f' && {sys.executable} -m evoforge "$@"; status=$?; echo "LISTING $(ls -A {mount_point})"; exit $status'
    )
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        timeout=120,
    )
    listing = proc.stdout.rpartition("LISTING ")[2].split()
    return proc, listing


@needs_mounts
@pytest.mark.parametrize(
    ("options", "fill"), [("size=1m,ro", False), ("size=64k", True)], ids=["read-only", "full disk"]
)
@pytest.mark.parametrize("command", ["run", "merge"])
def test_read_only_or_full_output_disk_is_one_line(options, fill, command, qwen_family, tmp_path):
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(good_run(qwen_family)))
    recipe = write(tmp_path, "recipe.yaml", _linear_recipe(qwen_family))
    disk = tmp_path / "disk"
    disk.mkdir()
    target = disk / ("result.json" if command == "eval" else "out")
    proc, listing = in_mount_namespace(
        options, fill, _commands(run_file, recipe, qwen_family["alpha"], target)[command], disk
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    reason = "Read-only file system" if "ro" in options else "No space left on device"
    assert lines[0].startswith("error: ") and str(disk) in lines[0] and reason in lines[0], lines
    assert listing == (["fill"] if fill else []), listing  # no output, no probe left behind


def test_run_needs_room_for_a_merged_model(qwen_family, tmp_path, monkeypatch):
    """Free space below one base model's weights is refused up front (a best model would not fit)."""
    run_file = write(tmp_path, "run.yaml", yaml.safe_dump(good_run(qwen_family)))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1024))
    result = runner.invoke(app, ["run", str(run_file), "--output-dir", str(tmp_path / "out")])
    error_line(result, str(run_file), "output_dir", "MiB free on its disk", "needed")
    assert not (tmp_path / "out").exists()


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
