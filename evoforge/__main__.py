"""`python -m evoforge` runs the CLI."""

from evoforge.cli import app

app(prog_name="evoforge")
