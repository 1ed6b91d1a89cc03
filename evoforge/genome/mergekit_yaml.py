"""The pieces of mergekit YAML that every gene writes and reads: scalars, gradients, per-model parameters.

A gene renders its stage as a list of lines and parses it back from the stage's YAML mapping; errors name the
recipe and the field (`RecipeError`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from evoforge.errors import ConfigError
from evoforge.genome.base import GenomeSpace

INTERP_STAGE = "evoforge_interp"
CROSSOVER_STAGE = "evoforge_crossover"
STAGE_OF_SOURCE = {"interp": INTERP_STAGE, "crossover": CROSSOVER_STAGE}


class RecipeError(ConfigError):
    """A recipe that is not valid YAML, or not in evoforge's three-stage shape."""


def fail(source: str, field: str, problem: str) -> RecipeError:
    return RecipeError(f"{source}: {field}: {problem}")


def scalar(value: str) -> str:
    """A YAML scalar for a path or name: bare when safe, JSON-quoted otherwise."""
    if re.fullmatch(r"[A-Za-z0-9_./~-]+", value) and not re.fullmatch(
        r"[-.\d]+|true|false|null|yes|no|on|off", value, re.I
    ):
        return value
    return json.dumps(value)


def num(x: float) -> str:
    """A float as YAML reads it back: `1.0`, `0.25`, `1.0e-05` (YAML 1.1 reads `1e-05` as a string)."""
    text = repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"
    return text.replace("e", ".0e", 1) if "e" in text and "." not in text else text


def gradient(values: Sequence[float]) -> str:
    """One value per layer group: a scalar, or a mergekit gradient list over depth."""
    return num(values[0]) if len(values) == 1 else "[" + ", ".join(num(v) for v in values) + "]"


def model_ref(source: str, space: GenomeSpace) -> str:
    """What a recipe calls a layer source: a stage's name or a base model's path."""
    return STAGE_OF_SOURCE.get(source) or space.path_of(source)


def models_block(rows: Iterable[tuple[str, str, Mapping[str, Sequence[float]]]]) -> list[str]:
    """`models:` with one entry per (name, path, parameters) row: the path, the name as a comment, and each
    parameter as a scalar or gradient."""
    lines = ["models:"]
    for name, path, params in rows:
        written = ", ".join(f"{k}: {gradient(v)}" for k, v in params.items())
        lines.append(f"  - model: {scalar(path)}  # {name}\n    parameters: {{{written}}}")
    return lines


def values(value: object, groups: int, source: str, field: str) -> tuple[float, ...]:
    """A scalar or a gradient as one value per layer group."""
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        raise fail(source, field, f"expected a number or a list of numbers, got {value!r}")
    if len(vals) == 1:
        return (float(vals[0]),) * groups
    if len(vals) != groups:
        raise fail(source, field, f"gradient has {len(vals)} points, the run uses {groups} layer groups")
    return tuple(float(v) for v in vals)


def model_name(ref: object, space: GenomeSpace, source: str, field: str) -> str:
    """Base model name (or stage source) for a model reference written in a recipe."""
    if isinstance(ref, dict):
        ref = ref.get("model", ref)
    ref = str(ref)
    for stage, name in ((INTERP_STAGE, "interp"), (CROSSOVER_STAGE, "crossover")):
        if ref == stage:
            return name
    for name, path in zip(space.models, space.paths):
        if ref in (path, name) or Path(ref).expanduser().resolve() == Path(path).expanduser().resolve():
            return name
    raise fail(source, field, f"model {ref!r} is not one of the run's base models {list(space.models)}")


def per_model(
    models: list, space: GenomeSpace, keys: Sequence[str], source: str, stage: str
) -> dict[str, dict[str, tuple[float, ...]]]:
    """name → {key: values per layer group} for a stage's `models:` list."""
    out: dict[str, dict[str, tuple[float, ...]]] = {}
    for i, entry in enumerate(models):
        field = f"{stage}.models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise fail(source, field, "expected {model: ..., parameters: {...}}")
        name = model_name(entry["model"], space, source, f"{field}.model")
        params = entry.get("parameters") or {}
        missing = [k for k in keys if k not in params]
        if missing:
            raise fail(source, f"{field}.parameters", f"missing {missing[0]!r}")
        out[name] = {
            k: values(params[k], space.layer_groups, source, f"{field}.parameters.{k}") for k in keys
        }
    return out
