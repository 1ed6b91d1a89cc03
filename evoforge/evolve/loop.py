"""The runner: rounds ("generations") of ask → render → evaluate → tell → checkpoint, around a search strategy.

The strategy (`evolve.strategies`, chosen by the run file's `search.strategy`) proposes genomes; the runner
keeps everything else: the fitness cache, evaluations.jsonl, recipes, checkpoints, hooks and the
plateau/max_generations stop. Everything random comes from one `random.Random(cfg.seed)` whose state is
checkpointed with the strategy's; evaluations are cached by genome hash and persisted (evaluations.jsonl,
checkpoints), so a resumed run — even one killed with SIGKILL — reaches the same result and never evaluates
a finished candidate again. Each candidate's recipe is read once: the text scored is the text its model is
built from, even if the file is edited meanwhile. Failures: `evolve.failures`; a best model that cannot be
written is recorded and retried (at the next new best, at the end of the run, on resume), never fatal.
`Evolution.cancel` stops a run before its next candidate (the Python API's Ctrl-C and task cancellation).

Look-ahead: with a strategy that `asks_ahead` (random, ga-async, cmaes-async), the next round is asked for
as soon as the current one is handed to the executor, and its jobs queue behind the current ones, so a
worker done with this round starts on the next instead of waiting for this round's slowest candidate.
Records, checkpoints, hooks and new-best saves still follow round by round in candidate order, and since the
strategy would have asked the same after `tell`, the state at each round boundary is the uninterrupted
run's. A round asked ahead that is not run (the last round, a plateau, a stop) is dropped: never recorded,
its recipes removed, its queued jobs withdrawn.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

from evoforge.config import EvolutionConfig
from evoforge.errors import EvoforgeError
from evoforge.evolve import checkpoint as ckpt
from evoforge.evolve import failures, strategies
from evoforge.evolve.checkpoint import Member, Outcome, State, UnsavedBest
from evoforge.evolve.executors import Job, Result, Round, as_executor
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, append_record, write_json_atomic
from evoforge.evolve.run_dir import RunDir
from evoforge.evolve.strategies import Proposal, SearchStrategy
from evoforge.evolve.strategies.base import asks_ahead
from evoforge.genome import Genome, GenomeSpace
from evoforge.recipe import render


def member_id(generation: int, index: int, genome: Genome) -> str:
    return f"g{generation:03d}-c{index}-{genome.hash[:8]}"


def members(generation: int, proposals: Sequence[Proposal]) -> list[Member]:
    """The proposals of one round, named by generation and place."""
    return [
        Member(id=member_id(generation, i, p.genome), genome=p.genome, operator=p.operator, parents=p.parents)
        for i, p in enumerate(proposals)
    ]


def plateaued(history: Sequence[float], patience: int, threshold: float) -> bool:
    """True when the best fitness rose by less than `threshold` (relative) over the last `patience` gens."""
    if len(history) <= patience:
        return False
    before, now = history[-1 - patience], history[-1]
    return (now - before) / max(abs(before), 1e-9) < threshold


@dataclass
class Ahead:
    """The next round, asked before the current one is told: its members and their jobs, already queued."""

    generation: int
    population: list[Member]
    round: Round


class Cancelled(Exception):
    """The run was asked to stop (`Evolution.cancel`); its checkpoint and records are consistent."""


@dataclass
class Hooks:
    """What the loop tells the outside world (progress bars, W&B, best-model writing)."""

    on_candidate: Callable[[int, Member, Outcome, bool], None] = lambda g, m, o, cached: None
    on_generation: Callable[[GenerationRecord], None] = lambda rec: None
    on_new_best: Callable[[int, Member, Outcome, str], str | None] = lambda g, m, o, recipe: None
    """Called once a new best is scored on the held-out split, with the recipe text it was scored with;
    returns the best-model folder it wrote."""


class Evolution:
    """Runs generations over an executor (`evolve.executors`), or a CandidateEvaluator-like object
    (`score_recipe(recipe, seed, split)`), which runs as the local executor."""

    def __init__(
        self,
        cfg: EvolutionConfig,
        space: GenomeSpace,
        run_dir: RunDir,
        evaluator,
        hooks: Hooks,
        cancel: threading.Event | None = None,
    ) -> None:
        self.cfg, self.space, self.run_dir, self.evaluator, self.hooks = cfg, space, run_dir, evaluator, hooks
        self.cancel = cancel or threading.Event()
        self._recorded: set[tuple[str, str]] = set()
        self._recipes: dict[str, str] = {}
        """Member id → the recipe text read for it this generation (scored, then saved)."""
        self._round: Round | None = None
        """The generation's fresh jobs, running on the executor while the loop records them in order."""
        self._ahead: Ahead | None = None
        """The next generation, asked ahead (`asks_ahead`), its jobs queued behind the current ones."""

    def initial_state(self) -> State:
        rng = random.Random(self.cfg.seed)
        strategy = strategies.make(self.cfg, self.space, rng)
        return State(
            config_fingerprint=ckpt.fingerprint(self.cfg),
            generation=0,
            population=members(0, strategy.ask()),
            rng_state=ckpt.rng_state(rng),
            strategy=strategy.state_dict(),
            best_history=[],
            cache={},
        )

    def restore_cache(self, state: State) -> None:
        """Fold evaluations.jsonl into the cache: a kill after an evaluation but before the next checkpoint
        must not cost that evaluation again. Transient failures are dropped: a resume evaluates them again."""
        state.cache = {k: o for k, o in state.cache.items() if o.error_kind != "transient"}
        for rec in self.run_dir.evaluation_records():
            key = f"{rec.genome_hash}:{rec.split}"
            if rec.error_kind == "transient":
                continue
            self._recorded.add((rec.id, rec.split))
            if key not in state.cache and not rec.cached:
                state.cache[key] = Outcome(
                    scores=rec.scores,
                    error=rec.error,
                    error_kind=rec.error_kind,
                    merge_s=rec.merge_s,
                    eval_s=rec.eval_s,
                )

    def recipe(self, generation: int, member: Member) -> str:
        """The member's recipe text, read once: what is scored on every split and built as its model."""
        if member.id not in self._recipes:
            path = self.run_dir.recipe(generation, member.id)
            self._recipes[member.id] = path.read_text(encoding="utf-8")
        return self._recipes[member.id]

    def evaluate(self, state: State, generation: int, member: Member, split: str) -> tuple[Outcome, bool]:
        """Cached outcome, or a fresh evaluation recorded (fsynced) before it is used."""
        key = f"{member.genome.hash}:{split}"
        cached = key in state.cache
        if cached:
            outcome = state.cache[key]
        else:
            try:
                recipe = self.recipe(generation, member)
            except (OSError, ValueError) as exc:  # the YAML was removed or garbled since it was written
                outcome = Outcome(error=failures.describe(exc), error_kind=failures.error_kind(exc))
            else:
                outcome = failures.score(self, recipe, member.genome.crossover.seed, split)
            state.cache[key] = outcome
        if (member.id, split) not in self._recorded:
            self._recorded.add((member.id, split))
            append_record(
                self.run_dir.evaluations,
                EvaluationRecord(
                    id=member.id,
                    generation=generation,
                    split=split,
                    genome_hash=member.genome.hash,
                    label=member.genome.label,
                    operator=member.operator,
                    parents=member.parents,
                    parent_fitness=[
                        state.cache[k].fitness
                        for p in member.parents
                        if (k := f"{p}:{self.cfg.evaluation.fitness_split}") in state.cache
                    ],
                    recipe=str(self.run_dir.recipe(generation, member.id).relative_to(self.run_dir.root)),
                    fitness=outcome.fitness,
                    scores=outcome.scores,
                    error=outcome.error,
                    error_kind=outcome.error_kind,
                    cached=cached,
                    merge_s=outcome.merge_s,
                    eval_s=outcome.eval_s,
                ),
            )
        return outcome, cached

    def score_recipe(self, recipe: str, seed: int, split: str) -> Result:
        """A job's result: from the running round when it holds the job, else run on its own (a held-out
        score, or the retry of a transient failure)."""
        job = Job(recipe, seed, split)
        if self._round is not None and job in self._round:
            return self._round.take(job)
        return as_executor(self.evaluator).score_recipe(recipe, seed, split)

    def halve_batch_size(self) -> bool:
        """After an out-of-memory error (`failures.free_memory`): where the executor can."""
        halve = getattr(as_executor(self.evaluator), "halve_batch_size", None)
        return bool(halve and halve())

    def fresh_jobs(
        self, state: State, generation: int, population: Sequence[Member], split: str
    ) -> dict[str, Job]:
        """Cache key → job, for the population's genomes not evaluated on `split` yet (each genome once;
        a recipe that cannot be read is left to `evaluate`, which records why)."""
        jobs: dict[str, Job] = {}
        for member in population:
            key = f"{member.genome.hash}:{split}"
            if key not in state.cache and key not in jobs:
                try:
                    jobs[key] = Job(self.recipe(generation, member), member.genome.crossover.seed, split)
                except (OSError, ValueError):
                    continue
        return jobs

    def write_recipes(self, generation: int, population: Sequence[Member]) -> None:
        """Each member's recipe file, unless there is one (a resumed run scores the text on disk)."""
        for member in population:
            path = self.run_dir.recipe(generation, member.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                title = f"generation {generation}, {member.operator}"
                write_json_atomic(path, render(member.genome, self.space, title=title))

    def ask_ahead(self, state: State, strategy: SearchStrategy, current: dict[str, Job]) -> None:
        """Ask for the next round now and queue its jobs (those not in `current`) behind the current
        round's, where the strategy allows it and the next round is not past max_generations."""
        following = state.generation + 1
        if following >= self.cfg.max_generations or not asks_ahead(strategy):
            return
        population = members(following, strategy.ask())
        self.write_recipes(following, population)
        jobs = self.fresh_jobs(state, following, population, self.cfg.evaluation.fitness_split)
        queued = [job for key, job in jobs.items() if key not in current]
        self._ahead = Ahead(following, population, Round(as_executor(self.evaluator), queued))

    def drop_ahead(self) -> None:
        """A round asked ahead that will not run: its queued jobs withdrawn, its recipes removed."""
        if self._ahead is None:
            return
        ahead, self._ahead = self._ahead, None
        ahead.round.close()
        paths = [self.run_dir.recipe(ahead.generation, m.id) for m in ahead.population]
        for path in paths:
            path.unlink(missing_ok=True)
        if paths and not any(paths[0].parent.iterdir()):
            paths[0].parent.rmdir()

    def run_generation(
        self, state: State, strategy: SearchStrategy
    ) -> tuple[GenerationRecord, list[Outcome]]:
        gen, t0 = state.generation, time.perf_counter()
        # Recipe texts are read once per member; those of a round asked ahead were read then.
        self._recipes = {m.id: self._recipes[m.id] for m in state.population if m.id in self._recipes}
        self.write_recipes(gen, state.population)
        split = self.cfg.evaluation.fitness_split
        jobs = self.fresh_jobs(state, gen, state.population, split)
        if self._ahead is not None:  # its jobs hold these (a job that does not is scored on its own)
            self._round, self._ahead = self._ahead.round, None
        else:
            self._round = Round(as_executor(self.evaluator), list(jobs.values()))
        self.ask_ahead(state, strategy, jobs)
        outcomes, fresh = [], []
        try:  # the executor finishes jobs in any order; they are recorded in candidate order
            for member in state.population:
                if self.cancel.is_set():
                    raise Cancelled(f"generation {gen}: stopped before {member.id}")
                if job := jobs.get(f"{member.genome.hash}:{split}"):
                    self._round.wait(job)  # an executor that cannot go on stops the run here
                outcome, cached = self.evaluate(state, gen, member, split)
                outcomes.append(outcome)
                fresh += [] if cached else [outcome]
                self.hooks.on_candidate(gen, member, outcome, cached)
        finally:
            self._round.close()
            self._round = None
        if fresh and all(o.error_kind == "transient" for o in fresh):
            raise EvoforgeError(
                f"{self.run_dir.evaluations}: generation {gen}: every candidate failed ({fresh[0].error}); "
                "the run stopped, continue it with --resume once this is fixed"
            )
        top = min(range(len(outcomes)), key=lambda i: -outcomes[i].fitness)
        best_member, best_outcome = state.population[top], outcomes[top]
        scored = [o.scores for o in outcomes if o.scores]
        domains = sorted({d for s in scored for d in s.domains})
        record = GenerationRecord(
            generation=gen,
            best_id=best_member.id,
            best_hash=best_member.genome.hash,
            best_fitness=best_outcome.fitness,
            avg_fitness=fmean(o.fitness for o in outcomes),
            population_size=len(outcomes),
            domain_avg={d: fmean(s.domains.get(d, 0.0) for s in scored) for d in domains},
            domain_best={d: max(s.domains.get(d, 0.0) for s in scored) for d in domains},
        )
        # The run's best (`run_dir.Run.best`): the stable sort keeps the first of equals, and a later
        # generation must beat the best so far strictly.
        previous_best = state.best_history[-1] if state.best_history else float("-inf")
        if best_outcome.scores and best_outcome.fitness > previous_best:
            state.best_id, state.best_hash = best_member.id, best_member.genome.hash
            if self.cfg.evaluation.heldout_each_best:  # else the run's final best only (`evolve.confirm`)
                heldout, _ = self.evaluate(state, gen, best_member, self.cfg.evaluation.heldout_split)
                record.best_heldout = heldout.scores
            self.save_unsaved(state)
            best = UnsavedBest(
                generation=gen, member=best_member, recipe=self.recipe(gen, best_member), error=""
            )
            record.best_model, record.best_model_error = self.save_best(state, best)
        state.best_history.append(max(previous_best, best_outcome.fitness))
        record.wall_s = time.perf_counter() - t0
        return record, outcomes

    def save_best(self, state: State, best: UnsavedBest) -> tuple[str | None, str | None]:
        """(folder, None) once the best model is written, else (None, why) with `best` kept in
        `state.unsaved`: a failed save never ends the run, the recipe is there to make it again."""
        outcome = state.cache[f"{best.member.genome.hash}:{self.cfg.evaluation.fitness_split}"]
        try:
            return self.hooks.on_new_best(best.generation, best.member, outcome, best.recipe), None
        except Exception as exc:  # recorded, retried later
            error = failures.describe(exc)
        state.unsaved.append(best.model_copy(update={"error": error}))
        return None, error

    def save_unsaved(self, state: State) -> None:
        """Try again to write the best models whose first attempt failed."""
        pending, state.unsaved = state.unsaved, []
        for best in pending:
            folder, _ = self.save_best(state, best)
            if folder is not None:
                self.run_dir.set_best_model(best.generation, folder)

    def run(self, state: State) -> State:
        """Run generations until max_generations or a plateau. A checkpoint is written at the start of
        every generation, so the latest one plus evaluations.jsonl always describe where the run is."""
        rng = state.rng()
        strategy = strategies.make(self.cfg, self.space, rng)
        strategy.load_state_dict(state.strategy)
        self.restore_cache(state)
        self.run_dir.keep_generations_before(state.generation)
        if not self.run_dir.checkpoint(state.generation).exists():
            ckpt.save(self.run_dir, state)
        try:
            while state.generation < self.cfg.max_generations:
                record, outcomes = self.run_generation(state, strategy)
                append_record(self.run_dir.generations, record)
                self.hooks.on_generation(record)
                stop = plateaued(state.best_history, self.cfg.plateau_patience, self.cfg.plateau_threshold)
                told = [(m, o.fitness if o.scores else None) for m, o in zip(state.population, outcomes)]
                strategy.tell(told)
                ahead = self._ahead
                state.population = (
                    ahead.population if ahead else members(state.generation + 1, strategy.ask())
                )
                state.strategy = strategy.state_dict()
                state.rng_state = ckpt.rng_state(rng)
                state.generation += 1
                ckpt.save(self.run_dir, state)
                if stop:
                    break
        finally:
            self.drop_ahead()
        if state.unsaved:
            self.save_unsaved(state)
            ckpt.save(self.run_dir, state)
        return state
