"""`evoforge tasks` and `evoforge eval` on tiny models: tables, JSON, and one-line errors with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from eval_support import REAL_TASKS, needs_real_tasks, one_torch_thread, write_mini_tasks
from typer.testing import CliRunner

from evoforge.cli import app
from evoforge.evaluate import TaskSuite

runner = CliRunner()
MINI = ["--weight", "math=1", "--weight", "multilingual=1", "--weight", "structured_data=2"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables as a wide terminal shows them (not cut at 80 columns), so cells can be read back. Through
    COLUMNS, which rich reads on every use: setting a console's `width` would pin it, and undoing that
    pins the width it had (80), which cut later tests' tables (test_compare after this file)."""
    monkeypatch.setenv("COLUMNS", "300")


@pytest.fixture(scope="module")
def mini_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_tasks(tmp_path_factory.mktemp("mini_tasks"))


def error_line(result) -> str:
    """The one line a user error prints (exit 2, nothing else on stderr)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_tasks_lists_domains_counts_and_levels(mini_tasks: Path) -> None:
    result = runner.invoke(app, ["tasks", "--tasks-dir", str(mini_tasks)])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:-1] for line in result.stdout.splitlines() if line.startswith("│")]
    cells = [[c.strip() for c in row] for row in rows]
    assert ["math", "arith", "easy", "exact_match,strict", "6", "4"] in cells
    assert ["structured_data", "json_field", "medium", "similarity,strict", "6", "4"] in cells
    assert [c[1] for c in cells].count("arith_fr") == 2  # listed under both of its domains
    assert "4 tasks in 3 domains" in result.stdout


def test_tasks_exits_2_on_a_broken_yaml(mini_tasks: Path, tmp_path: Path) -> None:
    bad = tmp_path / "poetry" / "rhymes.yaml"
    bad.parent.mkdir()
    bad.write_text("task: rhymes\nmetadata:\n  domain: poetry\n bad_indent: 1\n")
    shutil.copytree(mini_tasks, tmp_path / "mini")
    result = runner.invoke(app, ["tasks", "--tasks-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "arith" in result.stdout  # the good tasks are still listed
    assert f"broken: {bad}:4: invalid YAML" in " ".join(result.stderr.split())


@needs_real_tasks
def test_tasks_on_the_shipped_suite() -> None:
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    suite = TaskSuite.discover(REAL_TASKS)
    assert f"{len(suite.tasks)} tasks in {len(suite.domains)} domains" in result.stdout


def test_eval_prints_tables_and_writes_json(
    qwen_family: dict[str, Path], mini_tasks: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.json"
    args = [
        "eval",
        str(qwen_family["alpha"]),
        "--tasks-dir",
        str(mini_tasks),
        "--limit",
        "2",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, [*args, *MINI, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["model"] == str(qwen_family["alpha"]) and data["split"] == "validation" and data["limit"] == 2
    assert {t: s["n_items"] for t, s in data["tasks"].items()} == dict.fromkeys(
        ["arith", "arith_fr", "json_field", "numwords"], 2
    )
    assert data["weights"] == {"math": 1.0, "multilingual": 1.0, "structured_data": 2.0}
    expected = (
        data["domains"]["math"] + data["domains"]["multilingual"] + 2 * data["domains"]["structured_data"]
    ) / 4
    assert data["fitness"] == pytest.approx(expected)
    assert f"fitness {data['fitness']:.4f} ± {data['fitness_se']:.4f} (bootstrap SE)" in result.stdout
    assert set(data["domain_se"]) == set(data["domains"])
    assert "json_field" in result.stdout and "structured_data" in result.stdout


@needs_real_tasks
def test_eval_on_the_shipped_suite_with_default_weights(
    qwen_family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another working directory: the shipped tasks must not depend on where evoforge runs. The tiny
    model's context is widened to 2048 tokens: a code prompt plus its budget exceeds its 512."""
    model = shutil.copytree(qwen_family["beta"], tmp_path / "beta")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["eval", str(model), "--limit", "2", "--split", "test", "--json", "s.json"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["split"] == "test" and set(data["weights"]) == {
        "code",
        "math",
        "multilingual",
        "structured_data",
    }
    assert all(s["n_items"] == 2 for s in data["tasks"].values())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--split", "nope"], "task 'arith' has no split 'nope' in its data"),
        (["--weight", "poetry=1"], "evaluation_weights.poetry: no task in"),
        (["--weight", "math"], "--weight: expected DOMAIN=NUMBER"),
        (["--limit", "0"], "limit: Input should be greater than or equal to 1"),
        (["--device", "gpu"], "device: expected auto, cpu or cuda, got 'gpu'"),
        (["--dtype", "int8"], "dtype: expected float32, bfloat16 or float16, got 'int8'"),
    ],
)
def test_eval_bad_options_are_one_line(
    args: list[str], expected: str, qwen_family: dict[str, Path], mini_tasks: Path
) -> None:
    base = ["eval", str(qwen_family["alpha"]), "--tasks-dir", str(mini_tasks), "--weight", "math=1"]
    assert expected in error_line(runner.invoke(app, [*base, *args]))


def test_eval_bad_model_or_tasks_dir_is_one_line(mini_tasks: Path, tmp_path: Path) -> None:
    weights = ["--weight", "math=1"]
    missing = runner.invoke(app, ["eval", str(tmp_path / "nope"), "--tasks-dir", str(mini_tasks), *weights])
    assert error_line(missing) == f"error: {tmp_path / 'nope'}: no such folder"
    not_model = runner.invoke(app, ["eval", str(mini_tasks), "--tasks-dir", str(mini_tasks), *weights])
    assert error_line(not_model) == f"error: {mini_tasks}: not a model folder (no config.json)"
    no_tasks = runner.invoke(app, ["eval", str(mini_tasks), "--tasks-dir", str(tmp_path / "none")])
    assert error_line(no_tasks) == f"error: {tmp_path / 'none'}: tasks folder not found"
