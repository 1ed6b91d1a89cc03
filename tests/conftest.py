"""Shared fixtures: tiny random model families written once per test session (about 1.5 s each)."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from evolution_support import write_mc_tasks

from evoforge.merge.memory import MemoryMerger
from evoforge.tiny import make_family

pytest.register_assert_rewrite("cli_errors_support", "recovery_runs_support")  # their asserts, explained


@pytest.fixture(scope="session")
def qwen_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Qwen2 family (tied embeddings): `ancestor`, `alpha`, `beta`, `gamma` → folder."""
    return make_family(tmp_path_factory.mktemp("qwen_family"), arch="qwen2")


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Llama family (untied embeddings): `ancestor`, `alpha`, `beta`, `gamma` → folder."""
    return make_family(tmp_path_factory.mktemp("llama_family"), arch="llama")


@pytest.fixture(scope="session")
def unrelated_qwen_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second Qwen2 family with the same shapes as `qwen_family` but another random ancestor."""
    return make_family(tmp_path_factory.mktemp("qwen_unrelated"), arch="qwen2", seed=7)


@pytest.fixture(scope="session")
def diverse_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen2 family whose children are far enough from the ancestor that candidates answer
    differently (fitness varies), for whole runs on `mc_tasks`."""
    return make_family(tmp_path_factory.mktemp("diverse"), delta=0.5, seed=3)


@pytest.fixture(scope="session")
def mc_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Multiple-choice tasks of 8 items per split (evolution_support.write_mc_tasks)."""
    return write_mc_tasks(tmp_path_factory.mktemp("mc_tasks"), items=8)


@pytest.fixture(scope="session")
def hf_cache_dir(qwen_family: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face hub cache holding `qwen_family["alpha"]` as the repo `evoforge-test/tiny-qwen`."""
    root = tmp_path_factory.mktemp("hf_cache")
    repo = root / "models--evoforge-test--tiny-qwen"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(qwen_family["alpha"], repo / "snapshots" / ("0" * 40))
    return root


@pytest.fixture
def offline_hf_cache(hf_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point huggingface_hub at `hf_cache_dir` with the hub switched off; return the cached repo id."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache_dir))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return "evoforge-test/tiny-qwen"


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip sees an index nobody serves and no local wheels: a download fails as on a machine offline."""
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


@pytest.fixture(scope="session")
def mergers(qwen_family: dict[str, Path], llama_family: dict[str, Path]) -> dict[str, MemoryMerger]:
    """One memory merger per tiny family, holding the three children and the ancestor (float32, CPU)."""
    return {
        arch: MemoryMerger([family[n] for n in ("alpha", "beta", "gamma", "ancestor")], device="cpu")
        for arch, family in (("qwen", qwen_family), ("llama", llama_family))
    }
