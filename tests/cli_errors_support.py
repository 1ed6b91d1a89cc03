"""Support for the CLI error tests (tests/test_cli_errors_*.py): the one-line error check, a good run file
and edits of it, the refusal by validate, seeds and run.

Malformed run files and recipes: one line naming file and field, exit status 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from evoforge.cli import app

runner = CliRunner()


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
