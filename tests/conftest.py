"""Shared fixtures: tiny random model families written once per test session (about 1.5 s each)."""

from __future__ import annotations

from pathlib import Path

import pytest

from evoforge.tiny import make_family


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
