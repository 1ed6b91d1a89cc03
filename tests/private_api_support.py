"""Support for the private-API canary (tests/test_private_api.py): which private mergekit and lm-eval names a
source file imports or reads, found in its syntax tree. Like the canary, it imports neither evoforge nor those
packages, so it works even when a dependency bump breaks importing evoforge."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("mergekit", "lm_eval")


def _is_private(dotted: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in dotted.split("."))


def _private_names(path: Path) -> dict[str, int]:
    """mergekit/lm-eval names with an underscore-led part (not dunders) that a file imports or reads, by
    dotted path as imported (attributes of imported names followed), with the first line using each."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    origin: dict[str, str] = {}  # local name → dotted mergekit/lm-eval path
    used: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
            bound = {(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            bound = {
                (a.asname or a.name.split(".")[0]): a.name if a.asname else a.name.split(".")[0]
                for a in node.names
                if a.name.split(".")[0] in PACKAGES
            }
        else:
            continue
        origin.update(bound)
        used.update({dotted: node.lineno for dotted in bound.values() if _is_private(dotted)})
    for node in ast.walk(tree):
        chain: list[str] = []
        inner = node
        while isinstance(inner, ast.Attribute):
            chain.insert(0, inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in origin:
            dotted = ".".join([origin[inner.id], *chain])
            if _is_private(dotted):
                used.setdefault(dotted, node.lineno)
    return used
