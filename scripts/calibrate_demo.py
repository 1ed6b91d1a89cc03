"""Calibrate a run's models: the ancestor, each base model and the 8 seed merges on every domain, both splits.

    python scripts/calibrate_demo.py recipes/demo.yaml --out recipes/demo/CALIBRATION.md [--device cuda]
    python3 scripts/calibrate_demo.py recipes/qwen2-1.5b.yaml --out /tmp/keep/cal/CALIBRATION.md --resume

Prints (and writes) one markdown table per split: rows = models, columns = domains, fitness and the mean
domain score. It answers what a demo needs before it relies on a trio: is each specialist ahead on its own
domain, is no single model best everywhere, and does some seed keep a real share of every specialist's skill.
Uses the run's own evaluator (same tasks, dtype, batch size and merge path as `evoforge run`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from statistics import fmean
from typing import Annotated

import typer

from evoforge.config import load_config
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.records import Scores
from evoforge.genome import GenomeSpace, seed_genomes
from evoforge.quiet import quiet_libraries
from evoforge.recipe import render

cli = typer.Typer(add_completion=False)


def table(title: str, rows: dict[str, Scores]) -> str:
    domains = sorted({d for s in rows.values() for d in s.domains})
    lines = [f"### {title}", "", "| model | " + " | ".join(domains) + " | mean | fitness |"]
    lines.append("|---" * (len(domains) + 3) + "|")
    for name, s in rows.items():
        cells = " | ".join(f"{s.domains.get(d, float('nan')):.3f}" for d in domains)
        lines.append(f"| {name} | {cells} | {fmean(s.domains.values()):.3f} | {s.fitness:.3f} |")
    return "\n".join(lines) + "\n"


@cli.command()
def main(
    run_file: Path,
    out: Annotated[Path | None, typer.Option(help="Markdown file for the tables (JSON beside it).")] = None,
    device: Annotated[str | None, typer.Option(help="Override the run file's device.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override the run file's batch size.")] = None,
    limit: Annotated[
        int | None, typer.Option(help="Documents per task (default: the run file's limit).")
    ] = None,
    all_items: Annotated[
        bool, typer.Option("--all-items", help="Every document (the run file's limit off).")
    ] = False,
    seeds: Annotated[bool, typer.Option(help="Also score the 8 seed merges.")] = True,
    resume: Annotated[
        bool,
        typer.Option(help="Keep the models that --out's JSON already holds (a run cut off by a time limit)."),
    ] = False,
) -> None:
    overrides = {"device": device} if device else {}
    cfg = load_config(run_file, **overrides)
    evaluation = {"limit": limit} if limit is not None or all_items else {}
    evaluation |= {"batch_size": batch_size} if batch_size else {}
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update=evaluation)})
    space = GenomeSpace.from_config(cfg)
    splits = (cfg.evaluation.fitness_split, cfg.evaluation.heldout_split)
    results: dict[str, dict[str, Scores]] = {s: {} for s in splits}
    earlier = 0.0  # seconds spent by the runs resumed from
    if resume and out and out.with_suffix(".json").is_file():
        kept = json.loads(out.with_suffix(".json").read_text())
        earlier = kept.get("seconds", 0.0)
        results |= {
            s: {k: Scores.model_validate(v) for k, v in kept["results"].get(s, {}).items()} for s in splits
        }

    def done(name: str) -> bool:
        return all(name in results[s] for s in splits)

    start = time.perf_counter()

    def report() -> None:
        """Rewritten after every model, so an interrupted calibration keeps what it measured."""
        seconds = earlier + time.perf_counter() - start
        text = (
            f"Calibration of `{run_file}` (device {cfg.device}, dtype {cfg.dtype}, limit {cfg.evaluation.limit}, "
            f"batch {cfg.evaluation.batch_size}), {seconds:.0f} s.\n\n"
            + "\n".join(table(f"split `{s}`", results[s]) for s in splits)
        )
        if out:
            out.write_text(text, encoding="utf-8")
            payload = {s: {k: v.model_dump() for k, v in r.items()} for s, r in results.items()}
            out.with_suffix(".json").write_text(
                json.dumps({"seconds": round(seconds, 1), "results": payload}, indent=1)
            )
        else:
            typer.echo(text)

    with quiet_libraries():
        evaluator = CandidateEvaluator(cfg, space.paths[0], Path(cfg.run_dir()) / ".calibration")
        models = [*([cfg.ancestor] if cfg.ancestor else []), *cfg.base_models]
        for m in (m for m in models if not done(m.name)):
            for split in splits:
                results[split][m.name] = evaluator.score_model(cfg.resolve(m), split)
            report()
        genomes = seed_genomes(space, cfg.merge_operators, [m.weight for m in cfg.base_models], cfg.seed)
        for label, genome in genomes.items() if seeds else ():
            if done(label):
                continue
            recipe = render(genome, space)
            for split in splits:
                results[split][label] = evaluator.score_recipe(recipe, genome.crossover.seed, split)[0]
            report()
        report()  # also when a resumed run found everything measured


if __name__ == "__main__":
    cli()
