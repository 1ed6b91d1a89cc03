"""A whole run: config → compatibility check → baselines → generations → best models, tracked.

`EvoMergePipeline(config).run_evolution()` is the Python API (async, as the seed document shows it);
`evoforge run` is the same call with Rich progress.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evoforge.config import EvolutionConfig
from evoforge.errors import EvoforgeError
from evoforge.evolve import checkpoint as ckpt
from evoforge.evolve.checkpoint import Member, Outcome, State
from evoforge.evolve.records import Baselines, GenerationRecord, Scores
from evoforge.evolve.run_dir import Run, RunDir
from evoforge.genome import GenomeSpace
from evoforge.models import check_run_models
from evoforge.quiet import quiet_libraries
from evoforge.recipe import render


class BestCandidate(BaseModel):
    """The run's best candidate: where its model and recipe are, and how it scored."""

    id: str
    label: str
    genome_hash: str
    generation: int
    overall_fitness: float
    heldout_fitness: float | None
    domain_scores: dict[str, float]
    heldout_domain_scores: dict[str, float]
    model_path: str | None
    recipe_path: str
    best_base_model: str
    best_base_fitness: float
    best_base_heldout: float


def model_card(
    run_dir: RunDir, cfg: EvolutionConfig, member: Member, fit: Scores, held: Scores | None, recipe: str
) -> str:
    domains = sorted(fit.domains)
    rows = "\n".join(
        f"| {d} | {fit.domains[d]:.4f} | {held.domains.get(d, float('nan')) if held else float('nan'):.4f} |"
        for d in domains
    )
    tree = "\n".join(
        f"- `{r.genome_hash}` {r.id} ({r.operator}, {r.label}, fitness {r.fitness:.4f})"
        + (f" ← {', '.join(f'`{p}`' for p in r.parents)}" if r.parents else "")
        for r in run_dir.lineage(member.genome.hash, cfg.evaluation.fitness_split)
    )
    ev = cfg.evaluation
    return f"""---
tags: [merge, mergekit, evoforge]
---
# {member.id} ({member.genome.label})

Evolved by evoforge run `{cfg.name}` from {", ".join(f"`{m.path}`" for m in cfg.base_models)}.

| domain | {ev.fitness_split} (fitness) | {ev.heldout_split} (held out) |
|---|---|---|
{rows}
| **fitness** | **{fit.fitness:.4f}** | **{held.fitness if held else float("nan"):.4f}** |

## Lineage
{tree}

## Recipe
Rebuild with `evoforge merge evoforge_recipe.yaml --out DIR`, or plain mergekit:
`mergekit-multi evoforge_recipe.yaml --intermediate-dir TMP --out-path DIR --no-lazy --random-seed {member.genome.crossover.seed}`

```yaml
{recipe.strip()}
```
"""


class EvoMergePipeline:
    """One evolution run. `resume` is a checkpoint file or a run directory (its latest checkpoint)."""

    def __init__(
        self, config: EvolutionConfig, resume: str | Path | None = None, console: Console | None = None
    ) -> None:
        self.cfg = config
        self.resume = Path(resume) if resume else None
        self.console = console or Console(stderr=True, quiet=True)
        self.run_dir = RunDir(config.run_dir())

    async def run_evolution(self) -> BestCandidate:
        return await asyncio.to_thread(self.run)

    # ------------------------------------------------------------------------------------------ steps

    def _space(self) -> GenomeSpace:
        from evoforge.merge.compat import check_compatibility

        cfg = self.cfg
        check_run_models(cfg)
        for warning in check_compatibility(
            {m.name: cfg.resolve(m) for m in cfg.base_models},
            ancestor=cfg.resolve(cfg.ancestor) if cfg.ancestor else None,
        ):
            self.console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        return GenomeSpace.from_config(cfg)

    def _state(self, evolution) -> State:
        if self.resume is None:
            existing = self.run_dir.latest_checkpoint()
            if existing:
                raise EvoforgeError(
                    f"{self.run_dir.root}: output_dir already holds a run (checkpoint {existing.name}); "
                    f"resume it with --resume {existing} or choose another --output-dir"
                )
            return evolution.initial_state()
        path = self.resume
        if path.is_dir():
            found = RunDir(path).latest_checkpoint()
            if found is None:
                return evolution.initial_state()  # killed before the first checkpoint: seeds + cache
            path = found
        return ckpt.load(path, self.cfg)

    def _baselines(self, evaluator) -> Baselines:
        scored = self.run_dir.read_baselines()
        if scored is not None:
            return scored
        cfg, ev = self.cfg, self.cfg.evaluation
        models = [*cfg.base_models, *([cfg.ancestor] if cfg.ancestor else [])]
        scores = {}
        for m in models:
            self.console.print(f"scoring base model {m.name} on {ev.fitness_split} and {ev.heldout_split}")
            scores[m.name] = {
                s: evaluator.score_model(cfg.resolve(m), s) for s in (ev.fitness_split, ev.heldout_split)
            }
        baselines = Baselines(fitness_split=ev.fitness_split, heldout_split=ev.heldout_split, models=scores)
        self.run_dir.write_baselines(baselines)
        return baselines

    def run(self) -> BestCandidate:
        with quiet_libraries():
            return self._run()

    def _run(self) -> BestCandidate:
        from evoforge.evolve.executors import make_executor
        from evoforge.evolve.loop import Evolution, Hooks

        cfg, run_dir = self.cfg, self.run_dir
        space = self._space()
        run_dir.root.mkdir(parents=True, exist_ok=True)
        evolution = Evolution(cfg, space, run_dir, None, Hooks())
        state = self._state(evolution)
        run_dir.config.write_text(cfg.resolved().to_yaml(), encoding="utf-8")
        evaluator = make_executor(cfg, space.paths[0], run_dir.work)
        try:
            return self._evolve(evolution, evaluator, state, space)
        finally:
            evaluator.close()
            shutil.rmtree(run_dir.work, ignore_errors=True)

    def _evolve(self, evolution, evaluator, state: State, space: GenomeSpace) -> BestCandidate:
        """Baselines, generations, report, with the run's executor (closed by `_run`)."""
        from evoforge.evolve.loop import Hooks
        from evoforge.track.report import write_report
        from evoforge.track.wandb_log import WandbTracker

        cfg, run_dir = self.cfg, self.run_dir
        evolution.evaluator = evaluator
        baselines = self._baselines(evaluator)
        tracker = WandbTracker(
            run_dir.root,
            cfg.wandb_project,
            cfg.wandb_mode,
            cfg.model_dump(mode="json"),
            cfg.name,
            state.wandb_id,
        )
        state.wandb_id = getattr(tracker, "run_id", None)
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        gens = progress.add_task("generations", total=cfg.max_generations, completed=state.generation)
        cands = progress.add_task("candidates", total=cfg.population_size)

        def on_candidate(gen: int, member: Member, outcome: Outcome, cached: bool) -> None:
            progress.advance(cands)
            note = "cached" if cached else f"merge {outcome.merge_s:.1f}s, eval {outcome.eval_s:.1f}s"
            err = f" [red]failed: {outcome.error}[/]" if outcome.error else ""
            progress.console.print(
                f"  {member.id} {member.genome.label:<26} {outcome.fitness:.4f} ({note}){err}"
            )

        def on_new_best(gen: int, member: Member, outcome: Outcome) -> str:
            folder = run_dir.best_model(gen)
            recipe = render(member.genome, space, title=f"best of generation {gen}")
            evaluator.merge(recipe, member.genome.crossover.seed, folder)
            held = state.cache.get(f"{member.genome.hash}:{cfg.evaluation.heldout_split}")
            (folder / "evoforge_recipe.yaml").write_text(recipe, encoding="utf-8")
            card = model_card(run_dir, cfg, member, outcome.scores, held.scores if held else None, recipe)
            (folder / "README.md").write_text(card, encoding="utf-8")
            tracker.log_best_model(gen, folder, {"id": member.id, "fitness": outcome.fitness})
            return folder.name

        base = baselines.best_base(baselines.fitness_split, cfg.ancestor.name if cfg.ancestor else None)
        base_fit = base[1].fitness if base else 0.0

        def on_generation(rec: GenerationRecord) -> None:
            progress.update(gens, completed=rec.generation + 1)
            progress.reset(cands)
            tracker.log_generation(rec)
            gain = (rec.best_fitness - base_fit) / max(abs(base_fit), 1e-9)
            progress.console.print(
                f"generation {rec.generation}: best {rec.best_fitness:.4f} ({rec.best_id}), "
                f"average {rec.avg_fitness:.4f}, vs best base model {gain:+.1%} ({rec.wall_s:.0f}s)"
            )

        evolution.hooks = Hooks(
            on_candidate=on_candidate, on_generation=on_generation, on_new_best=on_new_best
        )
        with tracker, progress:
            evolution.run(state)
        write_report(run_dir.root)
        if tracker.local_dir:
            self.console.print(
                f"W&B run in {tracker.local_dir} (upload with `wandb sync {tracker.local_dir}`)"
            )
        return self.best()

    def best(self) -> BestCandidate:
        """The run's best candidate (`Run.best`: the one the report shows and gen_<N>_best_model holds)."""
        run = Run.load(self.run_dir.root)
        top, gen, held = run.best, run.best_generation, run.best_heldout
        if top.scores is None:
            reason = (top.error or "").partition("\n")[0]
            raise EvoforgeError(
                f"{self.run_dir.evaluations}: no candidate scored above 0 (the best, {top.id}, failed: {reason})"
            )
        fit_split, held_split = run.baselines.fitness_split, run.baselines.heldout_split
        base = run.best_base(fit_split)
        if base is None:
            raise EvoforgeError(f"{self.run_dir.baselines}: no base model scored on {fit_split!r}")
        return BestCandidate(
            id=top.id,
            label=top.label,
            genome_hash=top.genome_hash,
            generation=top.generation,
            overall_fitness=top.fitness,
            heldout_fitness=held.fitness if held else None,
            domain_scores=top.scores.domains,
            heldout_domain_scores=held.domains if held else {},
            model_path=str(self.run_dir.root / gen.best_model) if gen.best_model else None,
            recipe_path=str(self.run_dir.root / top.recipe),
            best_base_model=base[0],
            best_base_fitness=base[1].fitness,
            best_base_heldout=run.baselines.models[base[0]][held_split].fitness,
        )
