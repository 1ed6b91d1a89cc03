"""The demo's recipes, pinned byte for byte: its 8 seeds and two generations of mutants and children.

A refactor of the genes must leave every genome, every recipe and every RNG draw as it was (a run is
reproducible from its seed, and a resumed run continues as the uninterrupted one would). The digests in
`golden/demo_recipes.json` were made by the code before genes were organised by gene, and regenerated once
when `mutation_rate` became the mutation strength (binomial path edits, rare method flips; the seeds'
digests did not change); regenerate them only for an intended change of behaviour:

    python tests/test_recipe_pins.py > tests/golden/demo_recipes.json
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

from evoforge.config import load_config
from evoforge.genome import GenomeSpace, mutate, recombine, seed_genomes
from evoforge.recipe import render

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("golden") / "demo_recipes.json"


def demo_recipes() -> dict[str, str]:
    """name → recipe (or the RNG's next draw) for the demo run file's operators and seed over its space and
    two variants: without the ancestor, and over two models (so every interp rendering is covered).
    Generations follow the loop's shape: 6 mutants of the first two, then the rest shuffled into triples
    that each give one child."""
    cfg = load_config(ROOT / "recipes" / "demo.yaml")
    names = tuple(m.name for m in cfg.base_models)
    ancestor = f"/models/{cfg.ancestor.name}" if cfg.ancestor else None
    out = {}
    for name, models, anc in (
        ("demo", names, ancestor),
        ("no-ancestor", names, None),
        ("two-models", names[:2], None),
    ):
        space = GenomeSpace(  # paths that do not depend on the machine; SmolLM2-135M's depth
            models=models,
            paths=tuple(f"/models/{m}" for m in models),
            num_layers=30,
            layer_groups=cfg.merge_operators.layer_groups,
            ancestor=anc,
            dtype=cfg.dtype,
        )
        weights = [m.weight for m in cfg.base_models][: len(models)]
        seeds = seed_genomes(space, cfg.merge_operators, weights, cfg.seed)
        out |= {f"{name}/seed/{label}": render(g, space, title=label) for label, g in seeds.items()}
        for rate in (0.15, 0.5):
            rng = random.Random(cfg.seed)
            population = list(seeds.values())
            for generation in (1, 2):
                mutants = [mutate(population[k % 2], space, rng, rate) for k in range(6)]
                rest = population[2:]
                rng.shuffle(rest)
                children = [
                    recombine(rest[i : i + 3], [rng.random() for _ in range(3)], space, rng)
                    for i in range(0, len(rest) - 2, 3)
                ]
                population = population[:2] + mutants + children
                for i, genome in enumerate(mutants + children):
                    out[f"{name}/rate-{rate}/gen-{generation}/{i}"] = render(genome, space)
            out[f"{name}/rate-{rate}/next-draw"] = repr(rng.random())
    return out


def digests() -> dict[str, str]:
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in demo_recipes().items()}


def test_demo_genomes_recipes_and_rng_draws_are_unchanged():
    golden = json.loads(GOLDEN.read_text())
    now = digests()
    assert now.keys() == golden.keys()
    changed = [k for k in golden if now[k] != golden[k]]
    assert not changed, f"{len(changed)} of {len(golden)} recipes changed, first: {changed[:3]}"


if __name__ == "__main__":
    json.dump(digests(), sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")
