"""The files a user gives (run files, recipes, model config.json), read strictly, and the folders we write.

Why: PyYAML and json keep the last of two equal keys without a word (a run file that sets `mutation_rate`
twice runs with the second), and a binary or UTF-16 file fails with a UnicodeDecodeError traceback. Here
each is a one-line `ConfigError` naming the file and the key or line. Every reader of a user's file goes
through this module, and every command checks the folder it will write with `check_writable` first.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from evoforge.errors import ConfigError

# libyaml's parser when PyYAML has it (same safe types, ~10x faster on a 28-layer recipe); else pure Python.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


def read_text(path: Path, what: str = "") -> str:
    """A file's text as UTF-8 (a leading BOM allowed). `what` names the field the path came from, if any."""
    subject = f"{what} {path}" if what else str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{subject}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
        bad = text.find("\0")  # UTF-16 without a BOM decodes as UTF-8 with a NUL between ASCII letters
        if bad >= 0:
            raise UnicodeDecodeError("utf-8", data, bad, bad + 1, "NUL")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{subject}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}; a binary or UTF-16 file? "
            "save it as UTF-8)"
        ) from None
    return text


class UniqueKeyLoader(YAML_LOADER):  # type: ignore[misc, valid-type]
    """PyYAML's safe loader, refusing a mapping that names one key twice (`<<` merges may still override)."""

    source = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML's own error says so
                break
            if duplicate:
                raise ConfigError(
                    f"{self.source}: line {key_node.start_mark.line + 1}: key {key!r} appears twice "
                    "(YAML would keep only the last)"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _loader(source: str) -> type[UniqueKeyLoader]:
    return type("SourceLoader", (UniqueKeyLoader,), {"source": source})


def _yaml_error(source: str, exc: yaml.YAMLError) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    return ConfigError(f"{source}: not valid YAML{where}{f': {problem}' if problem else ''}")


def load_yaml(text: str, source: str) -> Any:
    """One YAML document; errors name `source` and the line."""
    try:
        return yaml.load(text, Loader=_loader(source))
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None


def load_yaml_all(text: str, source: str) -> list[Any]:
    """Every non-empty document of a multi-document YAML (a mergekit-multi recipe)."""
    try:
        return [doc for doc in yaml.load_all(text, Loader=_loader(source)) if doc is not None]
    except yaml.YAMLError as exc:
        raise _yaml_error(source, exc) from None


def load_json(text: str, source: str) -> Any:
    """A JSON document; errors name `source` and the line, or the key that appears twice."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(f"{source}: key {key!r} appears twice (JSON would keep only the last)")
            out[key] = value
        return out

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON (line {exc.lineno})") from None


def read_data(path: Path, what: str = "") -> Any:
    """A YAML or JSON file (by suffix) as data."""
    text = read_text(path, what)
    source = f"{what} {path}" if what else str(path)
    return load_json(text, source) if Path(path).suffix == ".json" else load_yaml(text, source)


def non_finite(value: Any, loc: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """Where loaded data holds its first NaN or infinite number (YAML `.nan`/`.inf`, JSON `NaN`), or None.
    Why: mergekit merges a NaN weight into all-NaN tensors and exits 0."""
    if isinstance(value, float) and not math.isfinite(value):
        return loc
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := non_finite(item, (*loc, key))) is not None:
            return found
    return None


def check_writable(path: Path, what: str, *, need_bytes: int = 0, is_file: bool = False) -> None:
    """A folder (or, `is_file`, a file's folder) evoforge is about to write: not a file, writable (a probe
    file is written, synced and removed in the nearest existing folder, so nothing is left behind), and
    with `need_bytes` free. Why: a read-only or full disk otherwise surfaces as a traceback mid-run."""
    path = Path(path).expanduser().absolute()
    if is_file and path.is_dir():
        raise ConfigError(f"{what} {path}: is a folder, not a file")
    folder = path.parent if is_file else path
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {folder}: exists and is not a folder")
    probe_dir = next(p for p in (folder, *folder.parents) if p.exists())
    if not probe_dir.is_dir():
        raise ConfigError(f"{what} {folder}: {probe_dir} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".evoforge-probe-", dir=probe_dir)
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: cannot write in {probe_dir} ({exc.strerror or exc})") from None
    try:
        os.write(fd, bytes(4096))
        os.fsync(fd)
    except OSError as exc:
        raise ConfigError(f"{what} {folder}: cannot write in {probe_dir} ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
        os.unlink(probe)
    free = shutil.disk_usage(probe_dir).free
    if free < need_bytes:
        raise ConfigError(
            f"{what} {folder}: {free / 2**20:.1f} MiB free on its disk, about {need_bytes / 2**20:.1f} MiB needed"
        )
