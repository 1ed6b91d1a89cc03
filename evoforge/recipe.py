"""Genome ⇄ mergekit multi-document YAML.

A genome renders to three documents that stock `mergekit-multi` runs unchanged: `evoforge_interp`,
`evoforge_crossover` (named stages) and the final unnamed passthrough, each written and read by its gene's
module (`evoforge/genome/{interp,crossover,structure}.py`). Comments say which gene each stage comes from; the
header carries the DARE seed as the `--random-seed` to pass to mergekit. evoforge's own YAMLs (hand-edited or
not, as long as the three-stage shape stays) parse back to the genome they describe.
"""

from __future__ import annotations

import re

from evoforge.errors import ConfigError
from evoforge.genome import crossover, interp, structure
from evoforge.genome.base import GenomeSpace
from evoforge.genome.genes import Genome
from evoforge.genome.mergekit_yaml import CROSSOVER_STAGE, INTERP_STAGE, RecipeError, fail
from evoforge.userfile import load_yaml_all, non_finite

_SEED_LINE = re.compile(r"--random-seed\s+(\d+)")

__all__ = ["RecipeError", "parse", "random_seed", "render"]


def random_seed(text: str) -> int | None:
    """The `--random-seed` a recipe's header asks for (DARE masks depend on it), if any."""
    m = _SEED_LINE.search(text.split("\n---", 1)[0])
    return int(m.group(1)) if m else None


def render(genome: Genome, space: GenomeSpace, title: str = "") -> str:
    """The genome as one multi-document mergekit YAML, with comments for the person reading it."""
    space.check(genome)
    header = [
        f"# evoforge candidate {genome.hash}: {genome.label}{f' ({title})' if title else ''}",
        "# A mergekit-multi recipe; edit freely. Re-merge with `evoforge merge THIS.yaml --out DIR` or:",
        f"#   mergekit-multi THIS.yaml --intermediate-dir TMP --out-path OUT --no-lazy --random-seed {genome.crossover.seed}",
    ]
    docs = [
        interp.render(genome.interp, space),
        crossover.render(genome.crossover, space),
        structure.render(genome.structure, space),
    ]
    return "\n".join(header) + "\n" + "\n---\n".join("\n".join(d) for d in docs) + "\n"


def parse(text: str, space: GenomeSpace, source: str = "<recipe>") -> Genome:
    """The genome an evoforge-shaped recipe describes. Raises RecipeError naming file and field otherwise."""
    try:
        docs = load_yaml_all(text, source)
    except ConfigError as exc:
        raise RecipeError(str(exc)) from None
    if not all(isinstance(d, dict) for d in docs):
        raise fail(source, "(document)", "every YAML document must be a mapping")
    for doc in docs:
        if (bad := non_finite(doc)) is not None:
            raise fail(source, ".".join(map(str, (doc.get("name") or "final", *bad))), "not a finite number")
    by_name = {d.get("name"): d for d in docs}
    if set(by_name) != {INTERP_STAGE, CROSSOVER_STAGE, None} or len(docs) != 3:
        raise fail(
            source, "(stages)", f"not evoforge's three-stage shape ({INTERP_STAGE}, {CROSSOVER_STAGE}, final)"
        )
    genome = Genome(
        interp=interp.parse(by_name[INTERP_STAGE], space, source),
        crossover=crossover.parse(by_name[CROSSOVER_STAGE], space, source, random_seed(text)),
        structure=structure.parse(by_name[None], space, source),
    )
    try:
        space.check(genome)
    except ValueError as exc:
        raise fail(source, "(genome)", str(exc)) from None
    return genome
