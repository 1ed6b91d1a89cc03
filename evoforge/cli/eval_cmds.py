"""`evoforge tasks`, `evoforge eval` and `evoforge compare`: list the task suite, score a model, compare two.

lm-eval is imported inside the commands: it takes seconds, and `evoforge --help` should not wait for it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.table import Table

from evoforge.cli.app import app, console, out, user_errors
from evoforge.config import DOMAINS, EvaluationConfig, EvolutionConfig, format_validation_error
from evoforge.errors import ConfigError
from evoforge.models import check_model_files, locate_model
from evoforge.quiet import quiet_libraries
from evoforge.userfile import check_writable

if TYPE_CHECKING:
    from evoforge.evaluate import EvalResult

TasksDir = Annotated[
    Path | None, typer.Option("--tasks-dir", help="Folder of task YAMLs (default: evoforge's tasks/).")
]
Limit = Annotated[int | None, typer.Option(help="Score only the first N items of each task.")]
DeviceName = Annotated[str, typer.Option(help="auto | cpu | cuda")]
DtypeName = Annotated[str, typer.Option(help="float32 | bfloat16 | float16")]
BatchSize = Annotated[int, typer.Option(help="Fixed batch size.")]
Weights = Annotated[
    list[str] | None,
    typer.Option(help="DOMAIN=W, repeatable; replaces the default weights (every built-in domain 0.25)."),
]


def _metric(key: str) -> str:
    """`metric,filter` as lm-eval reports it, less lm-eval's default filter name."""
    return key.removesuffix(",none")


def _split_order(splits: set[str]) -> list[str]:
    return sorted(splits, key=lambda s: ({"validation": 0, "test": 1}.get(s, 2), s))


@app.command()
@user_errors
def tasks(tasks_dir: TasksDir = None) -> None:
    """List the tasks per domain: level, primary metric, items per split. Exit 2 if a YAML is broken."""
    from evoforge.evaluate import TaskSuite

    with quiet_libraries(), console.status("reading tasks and their data"):
        suite = TaskSuite.discover(tasks_dir)
        counts = suite.item_counts()
    splits = _split_order({s for c in counts.values() for s in c})
    table = Table()
    for header in ("domain", "task", "level", "metric", *splits):
        table.add_column(header, no_wrap=header in ("domain", "task"))
    for domain, infos in suite.domains.items():
        label = domain if domain in DOMAINS else f"{domain} (new)"
        for info in infos:
            cells = [str(counts[info.name].get(s, "-")) for s in splits]
            table.add_row(label, info.name, info.level or "", _metric(info.primary_metric), *cells)
            label = ""
    out.print(str(suite.root), soft_wrap=True)  # a line of its own: a table title wraps a long path
    out.print(table)
    out.print(f"{len(suite.tasks)} tasks in {len(suite.domains)} domains")
    for error in suite.errors.values():
        console.print(f"[bold red]broken:[/] {error}", highlight=False, soft_wrap=True)
    if suite.errors:
        raise typer.Exit(2)


def parse_weights(specs: list[str]) -> dict[str, float]:
    """`DOMAIN=W` options → weights; none given → the run file's defaults."""
    if not specs:
        return dict(EvolutionConfig.model_fields["evaluation_weights"].default)
    weights: dict[str, float] = {}
    for spec in specs:
        domain, sep, value = spec.partition("=")
        try:
            weights[domain.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not domain.strip() or not 0 <= weights[domain.strip()] < math.inf:
            raise ConfigError(f"--weight: expected DOMAIN=NUMBER (a finite number >= 0), got {spec!r}")
    return weights


def scoring_settings(
    command: str, limit: int | None, batch_size: int, weight: list[str] | None
) -> tuple[EvaluationConfig, dict[str, float]]:
    """The evaluation settings and domain weights that `eval` and `compare` take as options."""
    try:
        evaluation = EvaluationConfig(limit=limit, batch_size=batch_size)
    except ValidationError as err:
        raise ConfigError(format_validation_error(command, err)) from None
    return evaluation, parse_weights(weight or [])


def checked_suite(tasks_dir: Path | None, weights: dict[str, float]) -> None:
    """Broken tasks or weights fail here, before a long model load."""
    from evoforge.evaluate import TaskSuite, check_weights

    suite = TaskSuite.discover(tasks_dir)
    suite.check()
    check_weights(weights, suite)


def print_result(result: EvalResult) -> None:
    """Per-task and per-domain tables, then the fitness."""
    per_task = Table(title=f"split {result.split}")
    for header in ("task", "domains", "metric", "value ± stderr", "items"):
        per_task.add_column(header, no_wrap=header == "task")
    for name, t in result.tasks.items():
        stderr = f" ± {t.stderr:.3f}" if t.stderr is not None else ""
        per_task.add_row(
            name, ", ".join(t.domains), _metric(t.metric), f"{t.value:.3f}{stderr}", str(t.n_items)
        )
    domains = Table("domain", "weight", "score ± SE", "tasks")
    se = result.domain_se or {}
    for domain, score in result.domains.items():
        names = [n for n, t in result.tasks.items() if domain in t.domains]
        weight = result.weights.get(domain, 0.0)
        spread = f" ± {se[domain]:.4f}" if domain in se else ""
        domains.add_row(domain, f"{weight:g}" if weight else "-", f"{score:.4f}{spread}", ", ".join(names))
    out.print(per_task)
    out.print(domains)
    spread = f" ± {result.fitness_se:.4f} (bootstrap SE)" if result.fitness_se is not None else ""
    out.print(
        f"fitness {result.fitness:.4f}{spread}  ({result.n_items} items, {result.wall_s:.1f} s"
        f"{f', first {result.limit} per task' if result.limit else ''})"
    )


@app.command("eval")
@user_errors
def eval_model(
    model: Annotated[str, typer.Argument(help="Model folder or Hugging Face id.")],
    split: Annotated[
        str, typer.Option(help="validation (the fitness split) or test (held out).")
    ] = "validation",
    limit: Limit = None,
    tasks_dir: TasksDir = None,
    device: DeviceName = "auto",
    dtype: DtypeName = "float32",
    batch_size: BatchSize = EvaluationConfig().batch_size,
    weight: Weights = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result as JSON here.")
    ] = None,
) -> None:
    """Score one model on the task suite: per-task metrics, per-domain scores, fitness."""
    evaluation, weights = scoring_settings("evoforge eval", limit, batch_size, weight)
    if json_out is not None:
        check_writable(json_out, "--json", is_file=True)
    from evoforge.evaluate import Scorer, load_model

    checked_suite(tasks_dir, weights)
    check_model_files(locate_model(model, what=""), model)
    with quiet_libraries():
        with console.status(f"loading {model}"):
            loaded, tokenizer = load_model(model, device, dtype)
        scorer = Scorer(loaded, tokenizer, evaluation=evaluation, weights=weights, tasks_dir=tasks_dir)
        with console.status(f"building {len(scorer.suite.tasks)} tasks for split {split!r}"):
            scorer.tasks(split)
        with console.status(f"scoring {model} on {split}"):
            result = scorer.score(split)
    print_result(result)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"model": model, **result.model_dump(mode="json")}, indent=2) + "\n")
        console.print(f"wrote {json_out}")


@app.command()
@user_errors
def compare(
    model_a: Annotated[str, typer.Argument(help="Model folder, Hugging Face id or candidate YAML.")],
    model_b: Annotated[str, typer.Argument(help="The same for B; B − A is what is estimated.")],
    split: Annotated[str, typer.Option(help="test (held out, default) or validation.")] = "test",
    limit: Limit = None,
    tasks_dir: TasksDir = None,
    device: DeviceName = "auto",
    dtype: DtypeName = "float32",
    batch_size: BatchSize = EvaluationConfig().batch_size,
    weight: Weights = None,
) -> None:
    """Compare two models on the same items: B − A per domain and in fitness, with paired 95 % intervals.

    A candidate YAML is merged first, as `evoforge merge` does."""
    evaluation, weights = scoring_settings("evoforge compare", limit, batch_size, weight)
    from evoforge.evaluate.compare import compare_models
    from evoforge.track.comparisons import header, rows

    checked_suite(tasks_dir, weights)
    with quiet_libraries(), console.status("comparing") as status:
        done = compare_models(
            model_a,
            model_b,
            split,
            device=device,
            dtype=dtype,
            evaluation=evaluation,
            weights=weights,
            tasks_dir=tasks_dir,
            status=status.update,
        )
    cmp = done.comparison
    table = Table(title=f"split {split}: A = {model_a}, B = {model_b}")
    for i, name in enumerate(header(cmp)):
        table.add_column(name, no_wrap=i == 0)
    for row in rows(cmp):
        table.add_row(*row, style="bold" if row[0] == "fitness" else None)
    out.print(table)
    n = done.result_a.n_items
    out.print(
        f"{n} items, paired bootstrap ({cmp.difference.resamples} resamples within each task); "
        f"fitness B − A {cmp.difference.fitness.estimate:+.4f}: "
        + ("the interval excludes 0" if cmp.difference.fitness.excludes_zero else "the interval includes 0")
    )
