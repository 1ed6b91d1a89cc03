"""Where the shipped data lives: `tasks/` and `recipes/`, at the top of a checkout, inside an installed package.

The repo keeps both folders at top level (they are data, edited as data); a wheel maps them to
`evoforge/_data/tasks` and `evoforge/_data/recipes` (pyproject.toml, `[tool.setuptools.package-dir]`). An
installed package is looked up first: a checkout has no `evoforge/_data`, and `site-packages/tasks` may
belong to anything else installed there.
"""

from __future__ import annotations

from pathlib import Path

from evoforge.errors import EvoforgeError

_PACKAGE = Path(__file__).resolve().parent
_INSTALLED = _PACKAGE / "_data"
_CHECKOUT = _PACKAGE.parent


def _shipped(name: str) -> Path:
    for root in (_INSTALLED, _CHECKOUT):
        if (root / name).is_dir():
            return root / name
    raise EvoforgeError(f"{_INSTALLED / name}: evoforge's {name}/ folder is missing (a broken install?)")


def tasks_dir() -> Path:
    """The shipped lm-eval task suite."""
    return _shipped("tasks")


def recipes_dir() -> Path:
    """The shipped run files (seeds.yaml, demo.yaml) and the demo's LoRA adapters."""
    return _shipped("recipes")


def run_file(path: str | Path) -> Path:
    """`path` itself, unless it is a relative `recipes/...` absent here and shipped with evoforge: then the
    shipped one, so `evoforge run recipes/demo.yaml` works from any folder, as the README says."""
    path = Path(path)
    if path.exists() or path.is_absolute() or path.parts[:1] != ("recipes",):
        return path
    shipped = recipes_dir().joinpath(*path.parts[1:])
    return shipped if shipped.is_file() else path
