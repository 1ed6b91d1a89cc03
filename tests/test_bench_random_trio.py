"""bench/random_trio.py: a run file over merge_bench's random family, for GPU benches without the real trio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from evoforge.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_random_trio_writes_a_valid_run_file_over_the_family_it_built(tmp_path: Path) -> None:
    out = tmp_path / "run.yaml"
    args = ["--scale", "tiny", "--work", str(tmp_path), "--out", str(out), "--limit", "4", "--device", "cpu"]
    subprocess.run([sys.executable, str(ROOT / "bench" / "random_trio.py"), *args], check=True)

    config = load_config(out)
    models = tmp_path / "models"
    assert [(m.name, Path(m.path)) for m in config.base_models] == [
        (name, models / name) for name in ("alpha", "beta", "gamma")
    ]
    assert config.ancestor is not None and Path(config.ancestor.path) == models / "ancestor"
    assert all((Path(m.path) / "config.json").is_file() for m in (*config.base_models, config.ancestor))
    assert (config.evaluation.limit, config.device, config.dtype) == (4, "cpu", "float32")
    # everything else as the shipped 1.5 B run file has it
    template = yaml.safe_load((ROOT / "recipes" / "qwen2-1.5b.yaml").read_text())
    written = yaml.safe_load(out.read_text())
    for key in ("merge_operators", "evaluation_weights", "max_generations", "merge_path"):
        assert written[key] == template[key], key
    assert written["evaluation"] == {**template["evaluation"], "limit": 4}
