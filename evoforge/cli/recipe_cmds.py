"""`evoforge seeds`, `evoforge merge`, `evoforge validate`: thin wrappers over the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from evoforge.cli.app import app, console, out, user_errors
from evoforge.config import EvolutionConfig, load_config
from evoforge.genome import GenomeSpace, seed_genomes
from evoforge.models import check_run_models, check_run_output
from evoforge.recipe import render
from evoforge.userfile import check_writable, read_text


def seed_recipes(cfg: EvolutionConfig) -> dict[str, str]:
    """label → rendered YAML for the run's 8 seed candidates (everything validated before returning)."""
    check_run_models(cfg)
    space = GenomeSpace.from_config(cfg)
    seeds = seed_genomes(space, cfg.merge_operators, [m.weight for m in cfg.base_models], cfg.seed)
    return {label: render(genome, space, title=f"seed of run {cfg.name}") for label, genome in seeds.items()}


@app.command()
@user_errors
def seeds(
    run_file: Annotated[Path, typer.Argument(help="Run file (YAML or JSON).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the 8 seed YAMLs.")],
) -> None:
    """Write the run's 8 seed candidates as mergekit-multi YAML recipes."""
    recipes = seed_recipes(load_config(run_file))
    check_writable(out, "--out")
    out.mkdir(parents=True, exist_ok=True)
    for label, text in recipes.items():
        (out / f"{label}.yaml").write_text(text, encoding="utf-8")
    console.print(f"wrote {len(recipes)} seed recipes to {out}")


@app.command()
@user_errors
def merge(
    recipe: Annotated[
        Path, typer.Argument(help="A mergekit YAML (evoforge's or any multi-document recipe).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the merged model.")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    random_seed: Annotated[
        int | None, typer.Option("--random-seed", help="DARE seed; default: the recipe header's.")
    ] = None,
) -> None:
    """Merge one recipe through mergekit (the disk path); a hand-edited recipe too."""
    from evoforge.merge.disk import merge_recipe
    from evoforge.recipe import random_seed as header_seed

    text = read_text(recipe)
    check_writable(out, "--out")
    seed = random_seed if random_seed is not None else header_seed(text)
    path = merge_recipe(text, out, device=device, random_seed=seed, source=str(recipe), quiet=False)
    console.print(f"merged {recipe} → {path}")


@app.command()
@user_errors
def validate(
    run_file: Annotated[Path, typer.Argument(help="Run file (YAML or JSON).")],
    models: Annotated[
        bool, typer.Option(help="Also check the models: present, same shapes, related.")
    ] = True,
) -> None:
    """Check a run file, and that its models exist, have one architecture and share an ancestor."""
    cfg = load_config(run_file)
    warnings: list[str] = []
    if models:
        from evoforge.merge.compat import check_compatibility

        check_run_models(cfg)
        check_run_output(cfg)
        warnings = check_compatibility(
            {m.name: cfg.resolve(m) for m in cfg.base_models},
            ancestor=cfg.resolve(cfg.ancestor) if cfg.ancestor else None,
        )
        seed_recipes(cfg)  # the seeds render over these models: depth, sources and layer plans fit
    table = Table("model", "path", "weight", "specialty", "ancestry", title=f"{run_file}: run {cfg.name!r}")
    for m in [*cfg.base_models, *([cfg.ancestor] if cfg.ancestor else [])]:
        role = " (ancestor)" if m is cfg.ancestor else ""
        table.add_row(
            m.name + role, cfg.resolve(m), f"{m.weight:g}", m.domain_specialty or "", m.ancestry or ""
        )
    out.print(table)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    out.print(f"{run_file}: ok{'' if models else ' (models not checked)'}")
