"""Unusable output paths (a file where a folder goes, a read-only or full disk, too little room for a model):
one line naming the path, exit status 2, nothing written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_errors_support import error_line, good_run, runner, write

from evoforge.cli import app


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
