"""Where a model named by a run file lives: a local folder, or an HF id served from the local HF cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from evoforge.errors import ConfigError

if TYPE_CHECKING:
    from evoforge.config import EvolutionConfig


def local_model_dir(path_or_id: str, what: str = "model") -> Path:
    """The folder holding the model's files; HF ids resolve through the local cache only (no network)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or path_or_id.startswith((".", "~")):
        raise ConfigError(f"{what}: folder {path_or_id} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path_or_id, local_files_only=True))
    except Exception:
        raise ConfigError(
            f"{what}: {path_or_id!r} is neither a local folder nor an HF id in the local cache "
            "(download it first, e.g. `hf download " + path_or_id + "`)"
        ) from None


def read_model_config(path_or_id: str, what: str = "model") -> dict:
    """config.json of a model as a dict, with a one-line error when it is missing or broken."""
    config_file = local_model_dir(path_or_id, what) / "config.json"
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what}: {config_file} is missing (not a Hugging Face model folder)") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what}: {config_file} is not valid JSON (line {exc.lineno})") from None


def check_run_models(cfg: EvolutionConfig) -> dict[str, dict]:
    """Every base model (and the ancestor) of a run is present with a readable config.json: name → config.
    Errors name the run file and the field, e.g. `run.yaml: base_models[2].path (gamma): ...`."""
    source = cfg.source or "run"
    entries = [(f"base_models[{i}]", m) for i, m in enumerate(cfg.base_models)]
    if cfg.ancestor:
        entries.append(("ancestor", cfg.ancestor))
    return {
        m.name: read_model_config(cfg.resolve(m), what=f"{source}: {field}.path ({m.name})")
        for field, m in entries
    }
