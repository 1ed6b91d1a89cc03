"""`evoforge report RUN_DIR`: plots and a markdown summary of a run, finished or not."""

from __future__ import annotations

from pathlib import Path

import typer

from evoforge.cli.app import app, user_errors


@app.command("report")
@user_errors
def report_cmd(
    run_dir: Path = typer.Argument(..., help="A run directory (runs/<name>) with generations.jsonl."),
) -> None:
    """Write RUN_DIR/report/ (fitness, domain and lineage plots, summary.md); print the paths and the summary."""
    from evoforge.track.report import write_report  # matplotlib loads only for this command

    paths = write_report(run_dir)
    for path in paths:
        typer.echo(str(path))
    typer.echo("")
    typer.echo(paths[-1].read_text(encoding="utf-8"))
