"""`evoforge run` (and `forge evo`, the seed document's spelling of the same run)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from pydantic import ValidationError

from evoforge.cli.app import app, console, forge_app, out, user_errors
from evoforge.config import EvolutionConfig, SearchConfig, load_config
from evoforge.errors import ConfigError
from evoforge.evolve.run_dir import RunDir
from evoforge.models import Device, check_run_models, check_run_output
from evoforge.resources import recipes_dir

if TYPE_CHECKING:  # the pipeline (torch, mergekit) is imported when a run starts, not with the CLI
    from evoforge.pipeline import BestCandidate

WandbMode = Literal["offline", "online", "disabled"]
MergePath = Literal["memory", "disk"]
FLAGS = {
    "max_generations": "--gens",
    "output_dir": "--output-dir",
    "device": "--device",
    "wandb_mode": "--wandb",
    "seed": "--seed",
    "merge_path": "--merge-path",
}
"""Run-file keys the flags override: a bad value is blamed on the flag, not on the run file."""
ExecutorName = Literal["local", "ray"]


def output_dir_option(output_dir: Path | None, resumed: RunDir | None) -> str | None:
    """--output-dir, else the resumed run's own directory: a resumed run continues where it is."""
    if output_dir:
        return str(output_dir)
    return str(resumed.root) if resumed else None


def with_strategy(cfg: EvolutionConfig, strategy: str | None) -> EvolutionConfig:
    """--strategy replaces `search.strategy`, keeping the run file's other search options."""
    if strategy is None:
        return cfg
    try:
        search = SearchConfig(**{**cfg.search.model_dump(), "strategy": strategy})
    except ValidationError as err:
        raise ConfigError(f"--strategy: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return cfg.model_copy(update={"search": search})


def resumed_run(resume: Path | None) -> RunDir | None:
    """The run directory `--resume` names; one line naming the path when there is none (not the
    `config.yaml` of its parent folder)."""
    if resume is None:
        return None
    if not resume.exists():
        raise ConfigError(f"{resume}: --resume: no such checkpoint or run directory")
    return RunDir.containing(resume)


def result_lines(best: BestCandidate, fitness_split: str) -> list[str]:
    """What a finished run prints: the best against the best base model (fitness, held-out with its paired
    interval), against the best seed on held-out (did the search add anything the seeds did not give?), and
    where its model and recipe are."""
    gain = (best.overall_fitness - best.best_base_fitness) / max(abs(best.best_base_fitness), 1e-9)
    held = best.heldout_fitness
    line = f"best {best.id} ({best.label}): fitness {best.overall_fitness:.4f} "
    line += f"({gain:+.1%} vs {best.best_base_model}), "
    if best.confirmed_accuracy is not None:
        line += f"chosen by accuracy {best.confirmed_accuracy:.4f} on {fitness_split}, "
    line += f"held-out {held if held is not None else float('nan'):.4f}"
    if held is not None:
        line += f" ({(held - best.best_base_heldout) / max(abs(best.best_base_heldout), 1e-9):+.1%})"
        if best.heldout_gain_interval is not None:
            low, high = best.heldout_gain_interval
            gap = held - best.best_base_heldout
            line += f", held-out gain {gap:+.4f} in [{low:+.4f}, {high:+.4f}] (95%, paired over items)"
    lines = [line]
    if best.best_is_seed:
        lines.append("the best is the fittest seed: no gain over the seeds")
    elif best.seed_gain is not None:
        g = best.seed_gain
        verdict = "beyond the noise" if g.excludes_zero else "within the noise: no gain over the seeds shown"
        lines.append(
            f"vs best seed {best.best_seed} on held-out: {g.estimate:+.4f} in [{g.low:+.4f}, {g.high:+.4f}] "
            f"(95%, paired over items), {verdict}"
        )
    model = best.model_path or "not written" + (
        f" ({best.model_error}); --resume writes it" if best.model_error else ""
    )
    return [*lines, f"model: {model}", f"recipe: {best.recipe_path}"]


def execute(cfg: EvolutionConfig, resume: Path | None) -> None:
    from evoforge.pipeline import EvoMergePipeline

    check_run_models(cfg)  # before anything is written: models whole, output writable
    check_run_output(cfg)
    out.print(f"run [bold]{cfg.name}[/] → {cfg.run_dir()}", highlight=False)
    best = EvoMergePipeline(cfg, resume=resume, console=console).run()
    typer.echo("\n".join(result_lines(best, cfg.evaluation.fitness_split)))


@app.command()
@user_errors
def run(
    run_file: Annotated[Path | None, typer.Argument(help="Run file; optional with --resume.")] = None,
    gens: Annotated[int | None, typer.Option("--gens", help="max_generations.")] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir", help="Run directory.")] = None,
    device: Annotated[Device | None, typer.Option(help="Where merges and scoring run.")] = None,
    resume: Annotated[
        Path | None, typer.Option(help="A checkpoint, or a run directory (its latest).")
    ] = None,
    wandb: Annotated[WandbMode | None, typer.Option("--wandb", help="W&B mode (default offline).")] = None,
    seed: Annotated[int | None, typer.Option(help="The run's RNG seed.")] = None,
    merge_path: Annotated[
        MergePath | None, typer.Option("--merge-path", help="memory (fast) or disk.")
    ] = None,
    strategy: Annotated[
        str | None, typer.Option(help="search.strategy: ga, ga-async, cmaes, cmaes-async or random.")
    ] = None,
    executor: Annotated[
        ExecutorName | None,
        typer.Option(help="local (this process) or ray (actors on the RAY_ADDRESS cluster, or a local one)."),
    ] = None,
) -> None:
    """Evolve merges of the run file's base models; Ctrl-C stops at once (resume with --resume)."""
    resumed = resumed_run(resume)
    if run_file is None:
        if resumed is None:
            raise ConfigError("run: give a run file, or --resume CHECKPOINT")
        run_file = resumed.config
    cfg = load_config(
        run_file,
        FLAGS,
        max_generations=gens,
        output_dir=output_dir_option(output_dir, resumed),
        device=device,
        wandb_mode=wandb,
        seed=seed,
        merge_path=merge_path,
        executor=executor,
    )
    execute(with_strategy(cfg, strategy), resume)


@forge_app.command()
@user_errors
def evo(
    gens: Annotated[int | None, typer.Option("--gens")] = None,
    base_models: Annotated[
        str | None, typer.Option("--base-models", help="Comma-separated names from recipes/seeds.yaml.")
    ] = None,
    output_dir: Annotated[Path | None, typer.Option("--output-dir")] = None,
    device: Annotated[Device | None, typer.Option()] = None,
    resume: Annotated[Path | None, typer.Option()] = None,
    config: Annotated[Path | None, typer.Option("--config", help="A run file (YAML or JSON).")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="search.strategy: ga, ga-async, cmaes, cmaes-async or random.")
    ] = None,
) -> None:
    """The seed document's `forge evo`: the same run as `evoforge run`."""
    resumed = resumed_run(resume)
    if config is None and resumed is not None:
        config = resumed.config
    cfg = load_config(
        config or recipes_dir() / "seeds.yaml",
        FLAGS,
        max_generations=gens,
        output_dir=output_dir_option(output_dir, resumed),
        device=device,
    )
    if base_models:
        by_name = {m.name: m for m in cfg.base_models}
        names = [n.strip() for n in base_models.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"--base-models: {unknown[0]!r} is not one of {sorted(by_name)}")
        if len(names) < 2:
            raise ConfigError("--base-models: name at least 2 models")
        cfg = cfg.model_copy(update={"base_models": [by_name[n] for n in names]})
    execute(with_strategy(cfg, strategy), resume)
