"""Command line: `evoforge` (and `forge`, the seed's spelling). Each module registers its commands."""

from evoforge.cli import demo_cmds, eval_cmds, recipe_cmds, report_cmds, run_cmds  # noqa: F401  (registers commands)
from evoforge.cli.app import app, forge_app

__all__ = ["app", "forge_app"]
