"""Where a model is and which device to use: the one rule config, merge, evaluate, pipeline and CLI follow.

A model reference (a run file's `path`, a recipe's model, `evoforge eval MODEL`) is, in this order:
1. a folder: `~` expanded, a relative path taken against the run file's folder (`base_dir`); a folder wins;
2. else, unless it is plainly a path (absolute, `./`, `../`, `~`, or deeper than `org/name`), a Hugging Face
   id `org/name[@revision]` found in the local HF cache by huggingface_hub's own `snapshot_download` with
   `local_files_only` — evoforge never downloads;
3. else a one-line `ModelNotAvailableError` naming the field and, for an id, the `hf download` that fixes it.

This module sits below config (config imports it), so it imports nothing of evoforge but `errors` and
`userfile`, and torch and huggingface_hub only when called: `import evoforge` stays light, and `evoforge.evaluate` can set the
offline switches before huggingface_hub reads them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from evoforge.errors import ConfigError, ModelNotAvailableError
from evoforge.userfile import check_writable, load_json, read_text

if TYPE_CHECKING:
    import torch

    from evoforge.config import EvolutionConfig

Device = Literal["auto", "cpu", "cuda"]
"""What a run file or CLI flag may say; the library also takes `cuda:N`."""
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _is_path(ref: str) -> bool:
    """A reference that can only be a folder: HF ids are `name` or `org/name`, never absolute or dotted."""
    return ref.startswith((".", "~")) or Path(ref).is_absolute() or ref.count("/") > 1


def _folder(ref: str, base_dir: Path | None) -> Path:
    path = Path(ref).expanduser()
    return base_dir / path if base_dir is not None and not path.is_absolute() else path


def model_ref(ref: str | Path, base_dir: Path | None = None) -> str:
    """A reference as the rest of a run passes it on: a folder (or what can only be one) as an absolute path,
    anything else unchanged as an HF id, so recipes keep ids. One stat; neither the cache nor errors."""
    text = str(ref)
    path = _folder(text, base_dir)
    return str(path.resolve()) if path.is_dir() or _is_path(text) else text


def locate_model(ref: str | Path, *, base_dir: Path | None = None, what: str = "model") -> Path:
    """The absolute folder holding a model's config.json, by the rule above.

    Errors read `{what} {ref}: problem` (`what=""` gives `{ref}: problem`), e.g.
    `run.yaml: base_models[1] (beta): path ./beta: no such folder (/runs/beta)`."""
    text = str(ref)
    subject = f"{what} {text}" if what else text
    path = _folder(text, base_dir)
    if not path.is_dir():
        if _is_path(text):
            shown = "" if Path(text).is_absolute() else f" ({path.resolve()})"
            raise ModelNotAvailableError(f"{subject}: no such folder{shown}")
        path = _cached_snapshot(text, subject)
    if not (path / "config.json").is_file():
        raise ModelNotAvailableError(f"{subject}: not a model folder (no config.json)")
    return path.resolve()


def _cached_snapshot(ref: str, subject: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = ref.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except HFValidationError:
        raise ModelNotAvailableError(f"{subject}: no such folder") from None
    except LocalEntryNotFoundError:
        raise ModelNotAvailableError(
            f"{subject}: no such folder, and not in the local Hugging Face cache (not available offline: "
            f"download it first, e.g. `hf download {repo_id}`)"
        ) from None


def read_model_config(ref: str | Path, *, what: str = "model", base_dir: Path | None = None) -> dict:
    """config.json of a located model as a dict; a broken one is a one-line error."""
    config_file = locate_model(ref, base_dir=base_dir, what=what) / "config.json"
    subject = f"{what} {ref}" if what else str(ref)
    config = load_json(read_text(config_file, subject), f"{subject}: {config_file}")
    if not isinstance(config, dict):
        raise ConfigError(f"{subject}: {config_file}: expected a JSON object")
    return config


def check_run_models(cfg: EvolutionConfig) -> dict[str, dict]:
    """Every base model (and the ancestor) of a run is present with a readable config.json: name → config.
    Errors name the run file and the field, e.g. `run.yaml: base_models[2] (gamma): path /x: no such folder`."""
    source = cfg.source or "run"
    entries = [(f"base_models[{i}]", m) for i, m in enumerate(cfg.base_models)]
    if cfg.ancestor:
        entries.append(("ancestor", cfg.ancestor))
    configs = {}
    for field, m in entries:
        what = f"{source}: {field} ({m.name}): path"
        configs[m.name] = read_model_config(m.path, what=what, base_dir=cfg.base_dir)
        check_model_files(locate_model(m.path, base_dir=cfg.base_dir, what=what), f"{what} {m.path}")
    return configs


def check_run_output(cfg: EvolutionConfig) -> None:
    """The run directory can be written and has room for a merged model (the largest base model's weights):
    a read-only, full or misnamed output fails now, in one line, not with a traceback mid-run."""
    need = max(weights_bytes(locate_model(m.path, base_dir=cfg.base_dir)) for m in cfg.base_models)
    check_writable(cfg.run_dir(), f"{cfg.source or 'run'}: output_dir", need_bytes=need)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A model folder with none of these has no tokenizer transformers can load (tokenizer_config.json alone
names a class, not a vocabulary)."""
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files (its index's shards, or every *.safetensors), else its *.bin files."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = load_json(read_text(index), str(index)).get("weight_map", {}).values()
        return [folder / name for name in sorted(set(shards))]
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(folder) if f.is_file())


def check_model_files(folder: Path, subject: str, tokenizer: bool = True) -> None:
    """Weights present and whole (each safetensors header read, its tensors' extent equal to the file size),
    and a tokenizer if asked: a truncated download fails here in one line, not in safetensors mid-run."""
    files = weight_files(folder)
    if not files:
        raise ConfigError(f"{subject}: no weights in {folder} (no *.safetensors or *.bin)")
    for file in files:
        if not file.is_file():
            raise ConfigError(f"{subject}: {file.name} is listed in the safetensors index but missing")
        if file.suffix == ".safetensors":
            _check_safetensors(file, subject)
    if tokenizer and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{subject}: no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)})")


def _check_safetensors(file: Path, subject: str) -> None:
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, _MAX_HEADER):
            raise ConfigError(f"{subject}: {file.name} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            raise ConfigError(f"{subject}: {file.name} has a broken safetensors header") from None
    if 8 + length + end != size:
        raise ConfigError(
            f"{subject}: {file.name} is {size} bytes but its header describes {8 + length + end} (truncated?)"
        )


def resolve_device(device: str) -> torch.device:
    """auto → CUDA when torch sees a GPU, else the CPU; an explicit cuda (or cuda:N) without one is refused."""
    import torch

    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"device: expected auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for, but CUDA is not available on this machine")
    return torch.device(device)
