"""A whole run: config → compatibility check → baselines → generations → best models, tracked.

`EvoMergePipeline(config).run_evolution()` is the Python API (async, as the seed document shows it; Ctrl-C
or cancelling its task stops the run before its next candidate, resumable); `evoforge run` is the same call
with Rich progress. A run holds its directory's lock (`RunDir.opened`) from start to end.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evoforge.config import EvolutionConfig
from evoforge.errors import EvoforgeError
from evoforge.evaluate.stats import Interval, paired_difference
from evoforge.evolve import checkpoint as ckpt
from evoforge.evolve.checkpoint import Member, Outcome, State
from evoforge.evolve.loop import Cancelled
from evoforge.evolve.records import (
    Baselines,
    EvaluationRecord,
    GenerationRecord,
    ItemScores,
    Scores,
    rounded_items,
    write_json_atomic,
)
from evoforge.evolve.run_dir import Run, RunDir, best_seed
from evoforge.genome import GenomeSpace
from evoforge.models import check_run_models, check_run_output
from evoforge.quiet import quiet_libraries
from evoforge.recipe import random_seed


class Written(NamedTuple):
    """A candidate whose model a run writes: its id, label, genome hash and DARE seed."""

    id: str
    label: str
    genome_hash: str
    seed: int | None


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
    model_error: str | None = None
    """Why the model is not written (model_path is None); `--resume` tries again."""
    recipe_path: str
    best_base_model: str
    best_base_fitness: float
    best_base_heldout: float
    confirmed_accuracy: float | None = None
    """Its accuracy on the fitness split, when a likelihood run's confirmation chose it (`evolve.confirm`)."""
    heldout_gain_interval: tuple[float, float] | None = None
    """95 % paired bootstrap interval of the held-out fitness minus the best base model's, when the run kept
    both models' held-out items."""
    best_seed: str | None = None
    """The fittest seed's id: what the search had to beat to have found anything the seeds did not give."""
    best_is_seed: bool = False
    """The best candidate is that seed's genome (the search found nothing fitter)."""
    seed_gain: Interval | None = None
    """Held-out fitness minus the best seed's, with its 95 % paired interval, when both have held-out items
    (None too where the best is that seed)."""


def model_card(
    run_dir: RunDir,
    cfg: EvolutionConfig,
    candidate: Written,
    fit: Scores,
    held: Scores | None,
    recipe: str,
    comparisons: list[str],
) -> str:
    """The best model's README: scores ± bootstrap SE on both splits, the held-out paired comparisons
    (`track.comparisons.heldout_comparisons`), the lineage and the recipe."""
    from evoforge.track.comparisons import with_se

    def cell(scores: Scores | None, domain: str) -> str:
        if scores is None or domain not in scores.domains:
            return "not scored"
        return with_se(scores.domains[domain], scores.domain_se.get(domain))

    rows = "\n".join(f"| {d} | {cell(fit, d)} | {cell(held, d)} |" for d in sorted(fit.domains))
    held_fitness = with_se(held.fitness, held.fitness_se) if held else "not scored"
    comparison_text = "\n".join(comparisons)
    tree = "\n".join(
        f"- `{r.genome_hash}` {r.id} ({r.operator}, {r.label}, fitness {r.fitness:.4f})"
        + (f" ← {', '.join(f'`{p}`' for p in r.parents)}" if r.parents else "")
        for r in run_dir.lineage(candidate.genome_hash, cfg.evaluation.fitness_split)
    )
    ev = cfg.evaluation
    return f"""---
tags: [merge, mergekit, evoforge]
---
# {candidate.id} ({candidate.label})

Evolved by evoforge run `{cfg.name}` from {", ".join(f"`{m.path}`" for m in cfg.base_models)}.

Scores ± bootstrap standard error over the items:

| domain | {ev.fitness_split} (fitness) | {ev.heldout_split} (held out) |
|---|---|---|
{rows}
| **fitness** | **{with_se(fit.fitness, fit.fitness_se)}** | **{held_fitness}** |

## Held-out comparisons

{comparison_text}

## Lineage
{tree}

## Recipe
Rebuild with `evoforge merge evoforge_recipe.yaml --out DIR`, or plain mergekit:
`mergekit-multi evoforge_recipe.yaml --intermediate-dir TMP --out-path DIR --no-lazy --random-seed {candidate.seed}`

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
        self.cancel = threading.Event()
        """Set to stop the run before its next candidate (what cancelling `run_evolution` does)."""

    async def run_evolution(self) -> BestCandidate:
        """The run in a worker thread. Cancelled (Ctrl-C under asyncio.run, or task.cancel()), it waits for
        the current candidate to finish and the worker to stop, then raises CancelledError: the run
        directory is left consistent for `--resume`."""
        worker = asyncio.ensure_future(asyncio.to_thread(self.run))
        try:
            return await asyncio.shield(worker)
        except asyncio.CancelledError:
            self.cancel.set()
            await asyncio.wait([worker])
            error = worker.exception()
            if error is not None and not isinstance(error, Cancelled):
                raise error from None
            raise

    # ------------------------------------------------------------------------------------------ steps

    def _space(self) -> GenomeSpace:
        from evoforge.merge.compat import check_compatibility

        cfg = self.cfg
        check_run_models(cfg)
        check_run_output(cfg)  # the Python API gets the checks `evoforge run` makes
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
        from evoforge.evolve.candidates import to_scores

        cfg, ev = self.cfg, self.cfg.evaluation
        models = [*cfg.base_models, *([cfg.ancestor] if cfg.ancestor else [])]
        scores, held_items = {}, {}
        for m in models:
            if self.cancel.is_set():
                raise Cancelled(f"stopped before scoring base model {m.name}")
            self.console.print(f"scoring base model {m.name} on {ev.fitness_split} and {ev.heldout_split}")
            fit = evaluator.evaluate_model(cfg.resolve(m), ev.fitness_split)
            held = evaluator.evaluate_model(cfg.resolve(m), ev.heldout_split)
            scores[m.name] = {ev.fitness_split: to_scores(fit), ev.heldout_split: to_scores(held)}
            if held.item_scores() is not None:
                held_items[m.name] = rounded_items(held.item_scores())
        items = ItemScores(
            split=held.split,
            metric=held.metric,
            task_domains=held.task_domains(),
            weights=held.weights,
            base_models=held_items,
        )
        self.run_dir.write_items(items)  # before baselines.json: a run with baselines has its items
        baselines = Baselines(fitness_split=ev.fitness_split, heldout_split=ev.heldout_split, models=scores)
        self.run_dir.write_baselines(baselines)
        return baselines

    def _heldout_comparisons(self, evaluator, candidate: Written, recipe: str) -> list[str]:
        """Markdown comparing a new best with the best base model and the best seed on the held-out split.
        Its per-item scores (the loop's last evaluation) and the best seed's (scored once, at the first new
        best, when generation 0's seeds are all scored) are added to heldout_items.json first."""
        from evoforge.track.comparisons import heldout_comparisons

        run_dir, split = self.run_dir, self.cfg.evaluation.heldout_split
        items = run_dir.read_items()
        seed = best_seed(run_dir.evaluation_records(), self.cfg.evaluation.fitness_split)
        wanted = {candidate.genome_hash: (recipe, candidate.seed)}  # the text that was scored
        if seed is not None and seed.genome_hash not in wanted:
            try:
                text = (run_dir.root / seed.recipe).read_text(encoding="utf-8")
            except OSError as exc:  # removed or unreadable since: the comparison is left out, not the model
                self._print(f"[yellow]warning:[/] best seed {seed.id} not scored on {split}: {exc}")
            else:
                wanted[seed.genome_hash] = (text, random_seed(text))
        for genome_hash, (text, dare_seed) in wanted.items():
            if items is None or genome_hash in items.candidates:
                continue
            try:
                result = evaluator.result(text, dare_seed, split)
            except Exception as exc:  # a comparison missing must not stop the run
                self.console.print(f"[yellow]warning:[/] {genome_hash} not scored on {split}: {exc}")
                continue
            if result.item_scores() is not None:
                items.candidates[genome_hash] = rounded_items(result.item_scores())
                run_dir.write_items(items)
        ancestor = self.cfg.ancestor.name if self.cfg.ancestor else None
        baselines = run_dir.read_baselines()
        base = baselines.best_base(split, ancestor) if baselines else None
        return heldout_comparisons(
            items,
            (candidate.id, candidate.genome_hash),
            base[0] if base else None,
            (seed.id, seed.genome_hash) if seed else None,
        )

    def run(self) -> BestCandidate:
        with quiet_libraries():
            return self._run()

    def _run(self) -> BestCandidate:
        space = self._space()
        with self.run_dir.opened() as repaired:
            for warning in repaired:
                self.console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
            self._evolve(space)
        return self.best()

    def _evolve(self, space: GenomeSpace) -> None:
        from evoforge.evolve.executors import make_executor
        from evoforge.evolve.loop import Evolution, Hooks

        cfg, run_dir = self.cfg, self.run_dir
        evolution = Evolution(cfg, space, run_dir, None, Hooks(), cancel=self.cancel)
        state = self._state(evolution)
        write_json_atomic(run_dir.config, cfg.resolved().to_yaml())
        evaluator = make_executor(cfg, space.paths[0], run_dir.work)
        try:
            self._generations(evolution, evaluator, state)
        finally:
            evaluator.close()
            shutil.rmtree(run_dir.work, ignore_errors=True)

    def _generations(self, evolution, evaluator, state: State) -> None:
        """Baselines, generations, report, with the run's executor (closed by `_evolve`)."""
        from evoforge.evolve.confirm import confirm
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
            err = f" [red]failed ({outcome.error_kind}): {outcome.error}[/]" if outcome.error else ""
            progress.console.print(
                f"  {member.id} {member.genome.label:<26} {outcome.fitness:.4f} ({note}){err}"
            )

        def write_model(
            gen: int | None, folder: Path, candidate: Written, fit: Scores, held: Scores | None, recipe: str
        ) -> None:
            """The candidate's model folder with its recipe and model card, logged to W&B (generation
            None: the confirmed best)."""
            evaluator.merge(recipe, candidate.seed, folder)
            (folder / "evoforge_recipe.yaml").write_text(recipe, encoding="utf-8")
            # without held-out scores (`heldout_each_best: false`, or a failed pass) nothing to compare
            comparisons = self._heldout_comparisons(evaluator, candidate, recipe) if held else []
            card = model_card(run_dir, cfg, candidate, fit, held, recipe, comparisons)
            (folder / "README.md").write_text(card, encoding="utf-8")
            tracker.log_best_model(gen, folder, {"id": candidate.id, "fitness": fit.fitness})

        def on_new_best(gen: int, member: Member, outcome: Outcome, recipe: str) -> str:
            folder = run_dir.best_model(gen)
            held = state.cache.get(f"{member.genome.hash}:{cfg.evaluation.heldout_split}")
            genome = member.genome
            written = Written(member.id, genome.label, genome.hash, genome.crossover.seed)
            write_model(gen, folder, written, outcome.scores, held.scores if held else None, recipe)
            return folder.name

        def write_confirmed(rec: EvaluationRecord, recipe: str, folder: Path) -> None:
            held = run_dir.read_confirmation()
            written = Written(rec.id, rec.label, rec.genome_hash, random_seed(recipe))
            write_model(None, folder, written, rec.scores, held.heldout if held else None, recipe)

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
            confirm(cfg, run_dir, evaluator, write_confirmed, self.cancel, self._print)
        write_report(run_dir.root)
        if tracker.local_dir:
            self.console.print(
                f"W&B run in {tracker.local_dir} (upload with `wandb sync {tracker.local_dir}`)"
            )

    def _print(self, line: str) -> None:
        self.console.print(line, highlight=False, soft_wrap=True)

    def best(self) -> BestCandidate:
        """The run's best candidate (`Run.best`: the one the report shows, whose model the run wrote)."""
        run = Run.load(self.run_dir.root)
        top, held = run.best, run.best_heldout
        model, model_error = run.best_model
        if top.scores is None:
            reason = (top.error or "").partition("\n")[0]
            raise EvoforgeError(
                f"{self.run_dir.evaluations}: no candidate scored above 0 (the best, {top.id}, failed: {reason})"
            )
        fit_split, held_split = run.baselines.fitness_split, run.baselines.heldout_split
        base = run.best_base(fit_split)
        if base is None:
            raise EvoforgeError(f"{self.run_dir.baselines}: no base model scored on {fit_split!r}")
        items, interval, seed, seed_gain = run.run_dir.read_items(), None, run.best_seed, None
        best_items = items.candidates.get(top.genome_hash) if items else None
        if items and best_items and base[0] in items.base_models:
            gain = paired_difference(
                items.base_models[base[0]], best_items, items.task_domains, items.weights
            ).fitness
            interval = (gain.low, gain.high)
        if items and best_items and seed and seed.genome_hash != top.genome_hash:
            seed_items = items.candidates.get(seed.genome_hash)
            if seed_items:
                seed_gain = paired_difference(
                    seed_items, best_items, items.task_domains, items.weights
                ).fitness
        return BestCandidate(
            id=top.id,
            label=top.label,
            genome_hash=top.genome_hash,
            generation=top.generation,
            overall_fitness=top.fitness,
            heldout_fitness=held.fitness if held else None,
            domain_scores=top.scores.domains,
            heldout_domain_scores=held.domains if held else {},
            model_path=str(self.run_dir.root / model) if model else None,
            model_error=model_error,
            recipe_path=str(self.run_dir.root / top.recipe),
            best_base_model=base[0],
            best_base_fitness=base[1].fitness,
            best_base_heldout=run.baselines.models[base[0]][held_split].fitness,
            confirmed_accuracy=next(
                (c.scores.fitness for c in run.confirmation.candidates if c.id == top.id and c.scores), None
            )
            if run.confirmation
            else None,
            heldout_gain_interval=interval,
            best_seed=seed.id if seed else None,
            best_is_seed=seed is not None and seed.genome_hash == top.genome_hash,
            seed_gain=seed_gain,
        )
