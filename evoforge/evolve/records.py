"""What a run writes, one pydantic model per kind of line, so the loop, the report and W&B agree.

`evaluations.jsonl` holds one `EvaluationRecord` per candidate evaluation (append-only, fsynced per line),
`generations.jsonl` one `GenerationRecord` per finished generation, `baselines.json` the `Baselines` (the
base models and ancestor on the fitness and held-out splits), `heldout_items.json` the `ItemScores` that
paired comparisons resample, `confirmation.json` the `Confirmation` that picks a likelihood run's best;
`run_dir.RunDir` says where each file lives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from statistics import fmean, median
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from evoforge.errors import EvoforgeError

Operator = Literal["seed", "elite", "mutation", "recombination", "cmaes", "random"]
"""How a candidate was made: `elite` is a genome carried unchanged (cached), `cmaes`/`random` samples of
those strategies."""
ErrorKind = Literal["transient", "permanent"]
"""Why a candidate failed: `transient` (out of memory, I/O, a missing file, a dead worker) is retried and never
kept as a final 0; `permanent` (an invalid recipe, non-finite weights) scores 0 for good (`evolve.failures`)."""


class Scores(BaseModel):
    """One model on one split: fitness = Σ weight × domain score over the weighted domains."""

    model_config = ConfigDict(extra="forbid")
    metric: Literal["accuracy", "likelihood"] = "accuracy"
    """What the task scores are: each task's primary metric, or gold-answer likelihood (fitness_metric)."""
    fitness: float
    domains: dict[str, float]
    tasks: dict[str, float]
    fitness_se: float | None = None
    domain_se: dict[str, float] = {}
    """Bootstrap standard errors over the items (`evaluate.stats`); absent in runs from before they were kept."""


class EvaluationRecord(BaseModel):
    """One candidate of one generation on one split (the fitness split; the held-out split for each new
    best). `cached` records reuse an earlier evaluation of the same genome."""

    model_config = ConfigDict(extra="forbid")
    id: str
    generation: int
    split: str
    genome_hash: str
    label: str
    operator: Operator
    parents: list[str]
    """Genome hashes of the parents (empty for seeds)."""
    parent_fitness: list[float] = []
    """The parents' fitness (on the fitness split), so a mutant's or child's gain over them is measurable."""
    recipe: str
    """Path of the candidate's YAML, relative to the run directory."""
    fitness: float
    scores: Scores | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    """Set with `error`; records written before kinds existed leave it None (read as permanent)."""
    cached: bool = False
    merge_s: float = 0.0
    eval_s: float = 0.0


def parent_ratios(records: Iterable[EvaluationRecord], split: str) -> dict[str, float]:
    """Operator → median of fitness / mean parent fitness over its fresh (not cached) records on `split` (the
    fitness split) with scored parents: e.g. how much of its parent's fitness the median mutant keeps."""
    ratios: dict[str, list[float]] = {}
    for rec in records:
        mean = fmean(rec.parent_fitness) if rec.parent_fitness else 0.0
        if rec.split != split or rec.operator in {"seed", "elite"} or rec.cached or mean <= 0:
            continue
        ratios.setdefault(rec.operator, []).append(rec.fitness / mean)
    return {op: median(r) for op, r in sorted(ratios.items())}


class GenerationRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    generation: int
    best_id: str
    best_hash: str
    best_fitness: float
    avg_fitness: float
    population_size: int
    domain_avg: dict[str, float]
    domain_best: dict[str, float]
    best_heldout: Scores | None = None
    """The generation's best candidate on the held-out split (scored when it is a new overall best)."""
    best_model: str | None = None
    """gen_<N>_best_model folder, relative to the run directory, when one was written."""
    best_model_error: str | None = None
    """Why writing the best model failed; it is retried at the next new best, the run's end and on resume."""
    wall_s: float = 0.0


class Confirmed(BaseModel):
    """One candidate of a confirmation: its search fitness and its score on the fitness split by accuracy."""

    model_config = ConfigDict(extra="forbid")
    id: str
    generation: int
    genome_hash: str
    fitness: float
    """Its fitness in the search (likelihood)."""
    scores: Scores | None = None
    """On the fitness split by accuracy; None if it failed (`error`)."""
    error: str | None = None


class Confirmation(BaseModel):
    """A run whose fitness is likelihood (a proxy, cheaper than accuracy) ends by scoring its `top` fittest
    distinct candidates and its best seed on the fitness split by accuracy, the metric of the held-out claim;
    the most accurate of them is the run's best (`evolve.confirm`, `run_dir.Run.best`). With
    `heldout_each_best: false` and nothing to confirm: `top` 0, no candidates, the fittest chosen."""

    model_config = ConfigDict(extra="forbid")
    split: str
    top: int
    generations: int
    """How many finished generations the candidates were drawn from: a run resumed for more generations is
    confirmed again (the scores of candidates already confirmed are reused)."""
    candidates: list[Confirmed]
    chosen: str | None = None
    """The chosen candidate's id, once every candidate is scored."""
    heldout: Scores | None = None
    """The chosen candidate on the held-out split, when it is not the fittest (whose generation record has
    its held-out scores) or with `heldout_each_best: false`."""
    model: str | None = None
    """confirmed_best_model, once written, in the same cases (else the best's model is the fittest's
    gen_<N>_best_model)."""
    model_error: str | None = None
    """Why that model could not be written; `--resume` tries again."""


class Baselines(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fitness_split: str
    heldout_split: str
    models: dict[str, dict[str, Scores]]
    """model name → split → scores."""

    def best_base(self, split: str, ancestor: str | None) -> tuple[str, Scores] | None:
        """The best base model on `split`: what a run's improvement is measured against. The declared
        ancestor is scored too, but it is not one of the models the run merges."""
        scored = [(m, s[split]) for m, s in self.models.items() if m != ancestor and split in s]
        return max(scored, key=lambda ms: ms[1].fitness, default=None)


class ItemScores(BaseModel):
    """Per-item scores on the held-out split of the models a run compares (base models and ancestor, each
    new best, the best seed), in document order per task: what "best vs best base model" and "best vs
    best seed" pair item by item (`evaluate.stats`). Kept apart from the records: only these few models
    need their items, and a vector per candidate would swell evaluations.jsonl."""

    model_config = ConfigDict(extra="forbid")
    split: str
    metric: Literal["accuracy", "likelihood"]
    task_domains: dict[str, list[str]]
    weights: dict[str, float]
    base_models: dict[str, dict[str, list[float]]] = {}
    """model name → task → per-item scores."""
    candidates: dict[str, dict[str, list[float]]] = {}
    """genome hash → task → per-item scores."""


def rounded_items(items: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-item scores to six decimals, far below any SE: a continuous metric's full floats would double the
    file."""
    return {task: [round(x, 6) for x in values] for task, values in items.items()}


R = TypeVar("R", bound=BaseModel)


class WriteError(EvoforgeError):
    """A run file that cannot be written (a full disk, a read-only folder): the run stops where the records
    and checkpoints are consistent, and `--resume` continues once the cause is fixed."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(
            f"{path}: cannot write ({exc.strerror or exc}); the run stopped, continue it with --resume "
            "once this is fixed"
        )


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def append_record(path: Path, record: BaseModel) -> None:
    """Append one JSON line and fsync it: a crash never loses a finished evaluation. A failed write (a full
    disk) is cut back off, so no half line is left for the next record to be glued onto."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        start = os.fstat(fd).st_size
        try:
            _write_all(fd, (record.model_dump_json() + "\n").encode())
            os.fsync(fd)
        except OSError as exc:
            with suppress(OSError):
                os.ftruncate(fd, start)
            raise WriteError(path, exc) from None
    finally:
        os.close(fd)


def repair_tail(path: Path) -> str | None:
    """Cut a torn tail off a JSONL file (bytes after the last newline, or a last line that is not JSON: a
    write cut short by a kill or a full disk), so the next append starts a line of its own. Returns a
    one-line warning, or None when the file was whole."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep:
        last = data.rfind(b"\n", 0, keep - 1) + 1
        try:
            json.loads(data[last:keep])
        except ValueError:
            keep = last
    if keep == len(data):
        return None
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, keep)
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"{path}: removed a torn last line ({len(data) - keep} bytes of a write cut short); its work is done again"


def read_records(path: Path, kind: type[R]) -> Iterator[R]:
    """Every complete line of a JSONL file; a torn last line (a crash mid-write) is skipped."""
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            yield kind.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValueError):
            continue


def write_json_atomic(path: Path, data: str) -> None:
    """Write via a temp file, fsync, rename: readers see the old file or the new one, never half of one. A
    failed write (a full disk) leaves the old file and no temp file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(path, exc) from None
