"""A non-editable install carries what a checkout has: every module, the task suite, the run files and the
demo's adapters, found from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from evoforge.config import load_config
from evoforge.evaluate import TaskSuite
from evoforge.resources import recipes_dir, tasks_dir

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {  # checkout folder → where the wheel puts it
    "evoforge": "evoforge",
    "tasks": "evoforge/_data/tasks",
    "recipes": "evoforge/_data/recipes",
}
NOT_SHIPPED = (
    "recipes/training/",
    "recipes/demo/RESULTS.md",
    "recipes/demo/CALIBRATION.md",
)


def _source_files() -> list[str]:
    """Files of the checkout that belong in the wheel (git-tracked or not, caches aside)."""
    files = []
    for folder in SHIPPED:
        for path in (ROOT / folder).rglob("*"):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and "__pycache__" not in path.parts and not rel.startswith(NOT_SHIPPED):
                if not (folder == "recipes" and path.suffix in (".png", ".md")):
                    files.append(rel)
    return files


def _in_wheel(rel: str) -> str:
    folder, _, rest = rel.partition("/")
    return f"{SHIPPED[folder]}/{rest}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` builds, built from a copy (setuptools leaves build/ behind in the source)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in SHIPPED:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out)]
    subprocess.run([*cmd, str(src)], check=True, capture_output=True, cwd=src)
    (built,) = out.glob("evoforge-*.whl")
    return built


def test_wheel_holds_every_module_task_and_demo_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = sorted({_in_wheel(rel) for rel in _source_files()} - names)
    assert not missing, f"not in the wheel (a package missing from pyproject.toml?): {missing[:10]}"
    for rel in ("tasks/_shared/tasklib.py", "recipes/seeds.yaml", "recipes/demo.yaml"):
        assert _in_wheel(rel) in names
    assert any(n.endswith("/adapter_model.safetensors") for n in names)
    assert not any("/training/" in n or n.endswith(".png") for n in names)


@pytest.mark.slow
def test_installed_layout_runs_evoforge_tasks_from_anywhere(wheel: Path, tmp_path: Path) -> None:
    """The wheel unpacked (as pip installs it) and run from a folder with no tasks/ or recipes/."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "300"}
    probe = (
        "from evoforge.resources import recipes_dir, tasks_dir\n"
        "from evoforge.config import load_config\n"
        "print(tasks_dir(), recipes_dir(), load_config('recipes/demo.yaml').source, sep='\\n')"
    )
    lines = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    data = site / "evoforge" / "_data"
    assert lines == [str(data / "tasks"), str(data / "recipes"), str(data / "recipes" / "demo.yaml")]
    listed = subprocess.run(
        [sys.executable, "-m", "evoforge", "tasks"], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert listed.returncode == 0, listed.stderr
    suite = TaskSuite.discover(ROOT / "tasks")
    assert f"{len(suite.tasks)} tasks in {len(suite.domains)} domains" in listed.stdout, listed.stdout
    assert str(data / "tasks") in listed.stdout


def test_checkout_finds_its_own_folders() -> None:
    assert tasks_dir() == ROOT / "tasks" and recipes_dir() == ROOT / "recipes"


def test_a_run_file_here_wins_over_the_shipped_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config("recipes/demo.yaml").source == ROOT / "recipes" / "demo.yaml"
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "demo.yaml", tmp_path / "recipes" / "demo.yaml")
    assert load_config("recipes/demo.yaml").source == tmp_path / "recipes" / "demo.yaml"
