"""Checkpoints: everything needed to continue a run exactly as if it had never stopped.

`checkpoints/evolution_checkpoint_gen_<N>.json` is written (atomically, with Ctrl-C held back while it is
written) when generation N is about to start: it holds generation N's population, the RNG state after making
it, the search strategy's state after proposing it, the best-so-far history and every evaluation so far (the fitness cache; evaluations.jsonl adds the ones
finished after it). Since seeds, variation and scoring are deterministic, resuming from it
gives the same genomes and fitness as the uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from evoforge.config import EvolutionConfig
from evoforge.errors import EvoforgeError
from evoforge.evolve.records import ErrorKind, Scores, write_json_atomic
from evoforge.evolve.run_dir import RunDir
from evoforge.evolve.strategies.base import Proposal

VERSION = 2
RESUMABLE_CHANGES: dict[str, Any] = {
    "max_generations": True,
    "output_dir": True,
    "wandb_mode": True,
    "wandb_project": True,
    "device": True,
    "overlap_merges": True,
    "executor": True,
    "ray": True,
    "source": True,
    "evaluation": {"confirm_top", "heldout_each_best"},
}
"""Config keys a resumed run may change (a `model_dump` exclude); any other change makes the checkpoint belong to
another run."""


class CheckpointError(EvoforgeError):
    """A checkpoint that cannot be resumed (truncated, other version, other run)."""


class Member(Proposal):
    """A proposal placed in a generation: `id` names its recipe and records."""

    id: str


class Outcome(BaseModel):
    """A finished evaluation of one genome on one split: scores, or the error that stopped it."""

    model_config = ConfigDict(extra="forbid")
    scores: Scores | None = None
    error: str | None = None
    error_kind: ErrorKind | None = None
    merge_s: float = 0.0
    eval_s: float = 0.0

    @property
    def fitness(self) -> float:
        return self.scores.fitness if self.scores else 0.0


class UnsavedBest(BaseModel):
    """A new best whose model could not be written (a full disk, a model folder gone): the recipe text it
    was scored with, kept until a later attempt writes the model."""

    model_config = ConfigDict(extra="forbid")
    generation: int
    member: Member
    recipe: str
    error: str


class State(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = VERSION
    config_fingerprint: str
    generation: int
    """The next generation to evaluate."""
    population: list[Member]
    rng_state: list
    strategy: dict
    """The search strategy's `state_dict()` after proposing `population`."""
    best_history: list[float]
    best_id: str | None = None
    best_hash: str | None = None
    cache: dict[str, Outcome]
    """`<genome hash>:<split>` → outcome; a genome is never evaluated twice on a split."""
    wandb_id: str | None = None
    unsaved: list[UnsavedBest] = []
    """New bests whose model is not written yet; retried at the next new best and at the end of a run."""

    def rng(self) -> random.Random:
        rng = random.Random()
        version, internal, gauss = self.rng_state
        rng.setstate((version, tuple(internal), gauss))
        return rng


def rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


RESUMABLE_NAMES = [
    f"{key}.{sub}" if isinstance(value, set) else key
    for key, value in sorted(RESUMABLE_CHANGES.items())
    if key != "source"
    for sub in (sorted(value) if isinstance(value, set) else [None])
]
"""The keys of RESUMABLE_CHANGES as a user writes them (`source` is not a run-file key)."""


def fingerprint(cfg: EvolutionConfig) -> str:
    """What identifies a run: the resolved config (absolute paths, as run_dir/config.yaml holds it) minus
    the keys a resume may change."""
    data = cfg.resolved().model_dump(mode="json", exclude=RESUMABLE_CHANGES)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def save(run_dir: RunDir, state: State) -> Path:
    """Write the checkpoint of generation `state.generation` with Ctrl-C and SIGTERM held back."""
    path = run_dir.checkpoint(state.generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        write_json_atomic(path, state.model_dump_json())
    finally:
        if main:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    return path


def load(path: Path, cfg: EvolutionConfig) -> State:
    """Read a checkpoint and check that it belongs to this run; one-line errors otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{path}: not a complete checkpoint (JSON breaks at line {exc.lineno})"
        ) from None
    if not isinstance(raw, dict) or raw.get("version") != VERSION:
        found = raw.get("version") if isinstance(raw, dict) else None
        raise CheckpointError(f"{path}: version: checkpoint version {found!r}, this evoforge reads {VERSION}")
    try:
        state = State.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise CheckpointError(f"{path}: {where}: {first['msg']}") from None
    if state.config_fingerprint != fingerprint(cfg):
        raise CheckpointError(
            f"{path}: config_fingerprint: the checkpoint belongs to another run configuration "
            f"(only {', '.join(RESUMABLE_NAMES)} may change on resume)"
        )
    return state
