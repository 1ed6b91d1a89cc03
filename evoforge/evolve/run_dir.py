"""The run directory: its layout, its readers, the run's best candidate and a candidate's lineage.

Every module that writes or reads a run goes through here (loop, checkpoints, pipeline, CLI, report, W&B),
so each file name is spelled once and "the run's best" has one definition.

runs/<name>/
  config.yaml                                    the resolved run config (`--resume` reads it back)
  candidates/gen_<N>/<id>.yaml                   every candidate's recipe
  evaluations.jsonl                              `EvaluationRecord`s, append-only
  generations.jsonl                              `GenerationRecord`s, one per finished generation
  baselines.json                                 `Baselines`
  heldout_items.json                             `ItemScores`: held-out items of base models, bests, best seed
  confirmation.json                              `Confirmation`: a likelihood run's top candidates by accuracy
  checkpoints/evolution_checkpoint_gen_<N>.json  the state at the start of generation N
  gen_<N>_best_model/                            each new best: model folder, recipe, model card
  confirmed_best_model/                          the confirmed best, when it is not the fittest
  report/                                        plots and summary.md
  wandb/, wandb_run_id                           the W&B run (wandb.init(dir=run_dir) makes wandb/)
  .work/                                         scratch merges, removed when the run stops
  .lock                                          the running run's pid, flock-ed while it runs

The run's fittest is the candidate with the highest fitness-split fitness in a finished generation, the
earliest on ties (generation, then place in the population). The loop writes exactly that candidate as
gen_<N>_best_model (a new best must beat every earlier generation's best strictly). The run's best is the
fittest, unless the run was confirmed (`evolve.confirm`: a likelihood run's top candidates and best seed
re-scored by accuracy): then it is the confirmation's choice. The report shows the best and `evoforge run`
prints it. A generation that an interrupted run left half-evaluated does not count
(a resume with `--gens N` can leave one behind): its best is not known, it has no held-out score, no model.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from evoforge.config import format_validation_error, read_mapping
from evoforge.errors import ConfigError, EvoforgeError
from evoforge.evolve.records import (
    Baselines,
    Confirmation,
    EvaluationRecord,
    GenerationRecord,
    ItemScores,
    Scores,
    read_records,
    repair_tail,
    write_json_atomic,
)

CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = ".lock"
RUN_ID_FILE = "wandb_run_id"
"""The W&B run id, kept so that a resumed run appends to the same W&B run."""

R = TypeVar("R", bound=BaseModel)


@dataclass(frozen=True)
class RunDir:
    """Where each file of one run lives, and the lenient readers a resume continues from."""

    root: Path

    @classmethod
    def containing(cls, path: Path) -> RunDir:
        """The run directory a `--resume` argument points into: the directory itself or one of its
        checkpoints."""
        path = path.resolve()
        if path.is_dir():
            return cls(path)
        return cls(path.parent.parent if path.parent.name == CHECKPOINT_DIR else path.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def evaluations(self) -> Path:
        return self.root / "evaluations.jsonl"

    @property
    def generations(self) -> Path:
        return self.root / "generations.jsonl"

    @property
    def baselines(self) -> Path:
        return self.root / "baselines.json"

    @property
    def heldout_items(self) -> Path:
        return self.root / "heldout_items.json"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def wandb_run_id(self) -> Path:
        return self.root / RUN_ID_FILE

    @property
    def work(self) -> Path:
        return self.root / ".work"

    def recipe(self, generation: int, member_id: str) -> Path:
        return self.root / "candidates" / f"gen_{generation}" / f"{member_id}.yaml"

    def best_model(self, generation: int) -> Path:
        return self.root / f"gen_{generation}_best_model"

    @property
    def confirmed_model(self) -> Path:
        return self.root / "confirmed_best_model"

    @property
    def confirmation(self) -> Path:
        return self.root / "confirmation.json"

    def checkpoint(self, generation: int) -> Path:
        return self.root / CHECKPOINT_DIR / f"evolution_checkpoint_gen_{generation}.json"

    def latest_checkpoint(self) -> Path | None:
        found = sorted(
            (self.root / CHECKPOINT_DIR).glob("evolution_checkpoint_gen_*.json"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]) if p.stem.rsplit("_", 1)[1].isdigit() else -1,
        )
        return found[-1] if found else None

    # Lenient readers: what a resume continues from; a torn last line (a crash mid-write) is skipped.

    def evaluation_records(self) -> list[EvaluationRecord]:
        return latest_records(read_records(self.evaluations, EvaluationRecord))

    def generation_records(self) -> Iterator[GenerationRecord]:
        return read_records(self.generations, GenerationRecord)

    def keep_generations_before(self, generation: int) -> None:
        """Drop the records of generation `generation` and later: a resume runs them again."""
        self._write_generations([r for r in self.generation_records() if r.generation < generation])

    def set_best_model(self, generation: int, folder: str) -> None:
        """Record the best model of an earlier generation, written late (its first attempt failed)."""
        self._write_generations(
            [
                r.model_copy(update={"best_model": folder, "best_model_error": None})
                if r.generation == generation
                else r
                for r in self.generation_records()
            ]
        )

    def _write_generations(self, records: list[GenerationRecord]) -> None:
        write_json_atomic(self.generations, "".join(r.model_dump_json() + "\n" for r in records))

    @contextmanager
    def opened(self) -> Iterator[list[str]]:
        """Hold the run directory for one run: an exclusive lock (a second run on it stops with one line
        naming the holder's pid), then what a killed run left repaired — torn record tails cut off, partial
        best-model folders, temp files and scratch merges removed. Yields the repairs' warnings."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                raise EvoforgeError(
                    f"{self.root}: another evoforge run (pid {holder}) is using this run directory; "
                    "wait for it to stop or choose another --output-dir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield self._repair()
        finally:
            os.close(fd)  # releases the lock

    def _repair(self) -> list[str]:
        partial = [
            *self.root.glob(".gen_*_best_model.*.partial"),
            *self.root.glob(".confirmed_best_model.*.partial"),
        ]
        for folder in [*partial, self.work]:
            shutil.rmtree(folder, ignore_errors=True)
        for pattern in (".*.tmp", f"{CHECKPOINT_DIR}/.*.tmp", "candidates/gen_*/.*.tmp"):
            for tmp in self.root.glob(pattern):
                tmp.unlink(missing_ok=True)
        return [w for w in (repair_tail(self.evaluations), repair_tail(self.generations)) if w]

    def read_baselines(self) -> Baselines | None:
        """The scored base models, None before they are scored; a damaged file is an error naming it."""
        if not self.baselines.is_file():
            return None
        try:
            return Baselines.model_validate_json(self.baselines.read_text(encoding="utf-8"))
        except ValidationError as err:
            raise ConfigError(format_validation_error(self.baselines, err)) from None

    def write_baselines(self, baselines: Baselines) -> None:
        write_json_atomic(self.baselines, baselines.model_dump_json(indent=2))

    def read_confirmation(self) -> Confirmation | None:
        """The run's confirmation, None before (or without) one; a damaged file is an error naming it."""
        if not self.confirmation.is_file():
            return None
        try:
            return Confirmation.model_validate_json(self.confirmation.read_text(encoding="utf-8"))
        except ValidationError as err:
            raise ConfigError(format_validation_error(self.confirmation, err)) from None

    def write_confirmation(self, confirmation: Confirmation) -> None:
        write_json_atomic(self.confirmation, confirmation.model_dump_json(indent=2))

    def read_items(self) -> ItemScores | None:
        """The held-out per-item scores, None where the run has none (it predates them)."""
        if not self.heldout_items.is_file():
            return None
        try:
            return ItemScores.model_validate_json(self.heldout_items.read_text(encoding="utf-8"))
        except ValidationError as err:
            raise ConfigError(format_validation_error(self.heldout_items, err)) from None

    def write_items(self, items: ItemScores) -> None:
        write_json_atomic(self.heldout_items, items.model_dump_json())

    def lineage(self, genome_hash: str, split: str) -> list[EvaluationRecord]:
        """A candidate and its ancestors so far (during a run: its own generation is not finished)."""
        return lineage((r for r in self.evaluation_records() if r.split == split), genome_hash)


def _holder(fd: int) -> str:
    """The pid a locked run directory's holder wrote, waiting a moment for it: the holder writes it just after
    it takes the lock."""
    for _ in range(50):
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.02)
    return "unknown"


def latest_records(records: Iterable[EvaluationRecord]) -> list[EvaluationRecord]:
    """Each candidate's last record on each split: a transient failure evaluated again (after a resume)
    is superseded by the new evaluation."""
    latest: dict[tuple[int, str, str], EvaluationRecord] = {}
    for rec in records:
        latest[(rec.generation, rec.id, rec.split)] = rec
    return list(latest.values())


def first_evaluations(records: Iterable[EvaluationRecord]) -> dict[str, EvaluationRecord]:
    """Each genome's first evaluation (later ones are cache hits of the same genome, whose parents are
    those of a later, different birth)."""
    first: dict[str, EvaluationRecord] = {}
    for rec in sorted(records, key=lambda r: (r.generation, r.cached)):
        first.setdefault(rec.genome_hash, rec)
    return first


def best_seed(records: Iterable[EvaluationRecord], split: str) -> EvaluationRecord | None:
    """The seed with the highest fitness on `split` (the earliest on ties), of those that scored: what a
    search must beat to have found anything the seeds did not already give."""
    seeds = [r for r in records if r.split == split and r.operator == "seed" and r.scores is not None]
    return max(seeds, key=lambda r: r.fitness, default=None)


def lineage(records: Iterable[EvaluationRecord], genome_hash: str) -> list[EvaluationRecord]:
    """The genome's first evaluation and those of its ancestors back to the seeds, breadth first."""
    first = first_evaluations(records)
    out, queue, seen = [], [genome_hash], set()
    while queue:
        h = queue.pop(0)
        if h in seen or h not in first:
            continue
        seen.add(h)
        out.append(first[h])
        queue.extend(first[h].parents)
    return out


def _read_checked(path: Path, kind: type[R]) -> list[R]:
    """Every line of a records file, strictly: a bad line is an error naming file:line and field.

    Unlike the lenient readers (which a resume uses), what reports on a run must not silently drop
    evaluations; only a torn last line, the trace of a crash mid-write, is skipped.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    out: list[R] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(kind.model_validate_json(line))
        except ValidationError as err:
            if n == len(lines) and err.errors()[0]["type"] == "json_invalid":
                continue
            raise ConfigError(format_validation_error(f"{path}:{n}", err)) from None
    return out


@dataclass
class Run:
    """The finished generations of one run, loaded and checked: what the report and `evoforge run` show."""

    run_dir: RunDir
    name: str
    ancestor: str | None
    evaluations: list[EvaluationRecord]
    """Fitness-split evaluations of the finished generations."""
    heldout_evaluations: list[EvaluationRecord]
    """Their new bests' held-out passes (scores in `GenerationRecord.best_heldout`, times here)."""
    generations: list[GenerationRecord]
    baselines: Baselines
    confirmation: Confirmation | None = None
    """The confirmation of exactly these generations, once it has chosen (else None: the best is the fittest)."""

    @classmethod
    def load(cls, root: Path) -> Run:
        if not root.is_dir():
            raise ConfigError(f"{root}: no such run directory")
        run_dir = RunDir(root)
        gen_path = run_dir.generations
        if not gen_path.is_file():
            raise ConfigError(
                f"{gen_path}: missing (not an evoforge run directory, or no generation finished)"
            )
        generations = _read_checked(gen_path, GenerationRecord)
        if not generations:
            raise ConfigError(f"{gen_path}: no finished generation")
        baselines = run_dir.read_baselines()
        if baselines is None:
            raise ConfigError(
                f"{run_dir.baselines}: missing (the base models are scored before generation 0)"
            )
        # The population's evaluations: fitness split, finished generations (a crash can leave part of the
        # next one, and each new best also has a held-out line, which GenerationRecord.best_heldout carries).
        finished = {g.generation for g in generations}
        records = [
            e
            for e in latest_records(_read_checked(run_dir.evaluations, EvaluationRecord))
            if e.generation in finished
        ]
        evaluations = [e for e in records if e.split == baselines.fitness_split]
        known = {(e.generation, e.id) for e in evaluations}
        for g in generations:
            if (g.generation, g.best_id) not in known:
                raise ConfigError(
                    f"{gen_path}: generation {g.generation}: best_id {g.best_id!r} has no "
                    f"{baselines.fitness_split!r} evaluation in evaluations.jsonl"
                )
        cfg = read_mapping(run_dir.config) if run_dir.config.is_file() else {}
        ancestor = cfg.get("ancestor")
        confirmation = run_dir.read_confirmation()
        if confirmation and (confirmation.chosen is None or confirmation.generations != len(generations)):
            confirmation = None
        return cls(
            run_dir=run_dir,
            name=str(cfg.get("name") or root.name),
            ancestor=ancestor.get("name") if isinstance(ancestor, dict) else None,
            evaluations=evaluations,
            heldout_evaluations=[e for e in records if e.split != baselines.fitness_split],
            generations=sorted(generations, key=lambda g: g.generation),
            baselines=baselines,
            confirmation=confirmation,
        )

    @cached_property
    def fittest_generation(self) -> GenerationRecord:
        """The generation holding the run's fittest candidate (the earliest on a tie): a generation's best
        need not beat the earlier ones."""
        return max(self.generations, key=lambda g: (g.best_fitness, -g.generation))

    @cached_property
    def fittest(self) -> EvaluationRecord:
        """The candidate with the highest fitness (see the module's docstring); a generation's best_id is the
        first of its population at the generation's best fitness."""
        g = self.fittest_generation
        return next(e for e in self.evaluations if (e.generation, e.id) == (g.generation, g.best_id))

    @cached_property
    def best(self) -> EvaluationRecord:
        """The run's best: the confirmation's choice, else the fittest (see the module's docstring)."""
        if self.confirmation is None:
            return self.fittest
        return next(e for e in self.evaluations if e.id == self.confirmation.chosen)

    @property
    def confirmed_other(self) -> bool:
        """Whether the confirmation chose another candidate than the fittest."""
        return self.best.genome_hash != self.fittest.genome_hash

    @property
    def best_heldout(self) -> Scores | None:
        """The confirmation's held-out scores where it chose another than the fittest or scored the best at
        the run's end (`heldout_each_best: false`), else the fittest's generation record's."""
        conf = self.confirmation
        if conf is not None and (self.confirmed_other or conf.heldout is not None):
            return conf.heldout
        return self.fittest_generation.best_heldout

    @property
    def best_model(self) -> tuple[str | None, str | None]:
        """(the best's model folder relative to the run directory, or None and why it is not written)."""
        conf = self.confirmation
        if conf is not None and (self.confirmed_other or conf.model is not None):
            return conf.model, conf.model_error
        return self.fittest_generation.best_model, self.fittest_generation.best_model_error

    def by_hash(self) -> dict[str, EvaluationRecord]:
        return first_evaluations(self.evaluations)

    def ancestry(self) -> dict[str, EvaluationRecord]:
        """The best candidate and every ancestor back to the seeds, by genome hash."""
        return {r.genome_hash: r for r in lineage(self.evaluations, self.best.genome_hash)}

    def best_base(self, split: str) -> tuple[str, Scores] | None:
        return self.baselines.best_base(split, self.ancestor)

    @cached_property
    def best_seed(self) -> EvaluationRecord | None:
        return best_seed(self.evaluations, self.baselines.fitness_split)
