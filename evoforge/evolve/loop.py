"""The runner: rounds ("generations") of ask → render → evaluate → tell → checkpoint, around a search strategy.

The strategy (`evolve.strategies`, chosen by the run file's `search.strategy`) proposes genomes; the runner
keeps everything else: the fitness cache, evaluations.jsonl, recipes, checkpoints, hooks and the
plateau/max_generations stop. Everything random comes from one `random.Random(cfg.seed)` whose state is
checkpointed with the strategy's; evaluations are cached by genome hash and persisted (evaluations.jsonl,
checkpoints), so a resumed run — even one killed with SIGKILL — reaches the same result and never evaluates
a finished candidate again.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import fmean

from evoforge.config import EvolutionConfig
from evoforge.evolve import checkpoint as ckpt
from evoforge.evolve import strategies
from evoforge.evolve.checkpoint import Member, Outcome, State
from evoforge.evolve.executors import Job, Result, Round, as_executor
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, append_record
from evoforge.evolve.run_dir import RunDir
from evoforge.evolve.strategies import Proposal
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
class Hooks:
    """What the loop tells the outside world (progress bars, W&B, best-model writing)."""

    on_candidate: Callable[[int, Member, Outcome, bool], None] = lambda g, m, o, cached: None
    on_generation: Callable[[GenerationRecord], None] = lambda rec: None
    on_new_best: Callable[[int, Member, Outcome], str | None] = lambda g, m, o: None
    """Called once a new best is scored on the held-out split; returns the best-model folder it wrote."""


class Evolution:
    """Runs generations over an executor (`evolve.executors`), or a CandidateEvaluator-like object
    (`score_recipe(recipe, seed, split)`), which runs as the local executor."""

    def __init__(
        self, cfg: EvolutionConfig, space: GenomeSpace, run_dir: RunDir, evaluator, hooks: Hooks
    ) -> None:
        self.cfg, self.space, self.run_dir, self.evaluator, self.hooks = cfg, space, run_dir, evaluator, hooks
        self._recorded: set[tuple[str, str]] = set()
        self._round: Round | None = None
        """The generation's fresh jobs, running on the executor while the loop records them in order."""

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
        must not cost that evaluation again."""
        for rec in self.run_dir.evaluation_records():
            self._recorded.add((rec.id, rec.split))
            key = f"{rec.genome_hash}:{rec.split}"
            if key not in state.cache and not rec.cached:
                state.cache[key] = Outcome(
                    scores=rec.scores, error=rec.error, merge_s=rec.merge_s, eval_s=rec.eval_s
                )

    def evaluate(self, state: State, generation: int, member: Member, split: str) -> tuple[Outcome, bool]:
        """Cached outcome, or a fresh evaluation recorded (fsynced) before it is used."""
        key = f"{member.genome.hash}:{split}"
        cached = key in state.cache
        if cached:
            outcome = state.cache[key]
        else:
            recipe = self.run_dir.recipe(generation, member.id).read_text(encoding="utf-8")
            try:
                scores, merge_s, eval_s = self.score(recipe, member.genome.crossover.seed, split)
                outcome = Outcome(scores=scores, merge_s=merge_s, eval_s=eval_s)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # a failed candidate scores 0 and the run goes on
                last = traceback.format_exception_only(exc)[-1].strip()
                outcome = Outcome(error=last)
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
                    cached=cached,
                    merge_s=outcome.merge_s,
                    eval_s=outcome.eval_s,
                ),
            )
        return outcome, cached

    def score(self, recipe: str, seed: int, split: str) -> Result:
        """A job's result: from the running round when it holds the job, else run on its own."""
        job = Job(recipe, seed, split)
        if self._round is not None and job in self._round:
            return self._round.take(job)
        return as_executor(self.evaluator).score_recipe(recipe, seed, split)

    def fresh_jobs(self, state: State, generation: int, split: str) -> dict[str, Job]:
        """Cache key → job, for the population's genomes not evaluated on `split` yet (each genome once)."""
        jobs: dict[str, Job] = {}
        for member in state.population:
            key = f"{member.genome.hash}:{split}"
            if key not in state.cache and key not in jobs:
                recipe = self.run_dir.recipe(generation, member.id).read_text(encoding="utf-8")
                jobs[key] = Job(recipe, member.genome.crossover.seed, split)
        return jobs

    def run_generation(self, state: State) -> tuple[GenerationRecord, list[Outcome]]:
        gen, t0 = state.generation, time.perf_counter()
        for member in state.population:
            path = self.run_dir.recipe(gen, member.id)
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                path.write_text(
                    render(member.genome, self.space, title=f"generation {gen}, {member.operator}")
                )
        split = self.cfg.evaluation.fitness_split
        jobs = self.fresh_jobs(state, gen, split)
        self._round = Round(as_executor(self.evaluator), list(jobs.values()))
        outcomes = []
        try:  # the executor finishes jobs in any order; they are recorded in candidate order
            for member in state.population:
                if job := jobs.get(f"{member.genome.hash}:{split}"):
                    self._round.wait(job)  # an executor that cannot go on stops the run here
                outcome, cached = self.evaluate(state, gen, member, split)
                outcomes.append(outcome)
                self.hooks.on_candidate(gen, member, outcome, cached)
        finally:
            self._round.close()
            self._round = None
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
            heldout, _ = self.evaluate(state, gen, best_member, self.cfg.evaluation.heldout_split)
            record.best_heldout = heldout.scores
            record.best_model = self.hooks.on_new_best(gen, best_member, best_outcome)
        state.best_history.append(max(previous_best, best_outcome.fitness))
        record.wall_s = time.perf_counter() - t0
        return record, outcomes

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
        while state.generation < self.cfg.max_generations:
            record, outcomes = self.run_generation(state)
            append_record(self.run_dir.generations, record)
            self.hooks.on_generation(record)
            stop = plateaued(state.best_history, self.cfg.plateau_patience, self.cfg.plateau_threshold)
            strategy.tell([(m, o.fitness if o.scores else None) for m, o in zip(state.population, outcomes)])
            state.population = members(state.generation + 1, strategy.ask())
            state.strategy = strategy.state_dict()
            state.rng_state = ckpt.rng_state(rng)
            state.generation += 1
            ckpt.save(self.run_dir, state)
            if stop:
                break
        return state
