"""Support for the failure-recovery tests: whole runs (CLI, pipeline, loop, records) with a synthetic scorer.

`SyntheticCandidates` replaces `CandidateEvaluator`: a candidate's fitness is a hash of the recipe text it is
given (so an edited recipe scores differently), a best model is a small folder written through the same
atomic rename as a real one. Run as a script, this module is `evoforge` with that scorer and one injected
fault (`EVOFORGE_TEST_FAULT`): `write:REGEX:N` — the N-th `os.write` into a file whose path matches REGEX
writes half its bytes, then the process is SIGKILLed; `replace:REGEX:N` — SIGKILL just before the N-th
`os.replace` onto a path matching REGEX. `EVOFORGE_TEST_DELAY` slows each candidate (seconds).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import ClassVar

from evoforge.config import EvolutionConfig
from evoforge.evaluate.scorer import EvalResult, TaskScore
from evoforge.evolve import candidates
from evoforge.evolve.records import Scores
from evoforge.merge.disk import atomic_model_folder


def _score(text: str) -> Scores:
    f = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32
    return Scores(fitness=f, domains={"math": f}, tasks={"t": f})


def _result(scores: Scores, split: str) -> EvalResult:
    """Scores as a whole result with two per-item scores (what the held-out comparisons pair)."""
    f = scores.fitness
    task = TaskScore(domains=["math"], metric="acc", value=f, stderr=None, n_items=2, items=[f, f])
    return EvalResult(
        split=split,
        tasks={"t": task},
        domains={"math": f},
        weights={"math": 1.0},
        fitness=f,
        n_items=2,
        limit=None,
        wall_s=0.0,
    )


class SyntheticCandidates:
    """CandidateEvaluator's interface without models: scores from hashes, best models as small folders."""

    delay = float(os.environ.get("EVOFORGE_TEST_DELAY", "0"))
    scored: ClassVar[list[tuple[str, str]]] = []
    """(recipe text, split) of every candidate scored in this process."""

    def __init__(self, cfg: EvolutionConfig, anchor_path: str, work_dir: Path) -> None:
        self.work_dir = work_dir

    def score_model(self, path: str | Path, split: str) -> Scores:
        return _score(f"{Path(path).name}:{split}")

    def evaluate_model(self, path: str | Path, split: str) -> EvalResult:
        return _result(self.score_model(path, split), split)

    def result(self, recipe: str, seed: int, split: str) -> EvalResult:
        return _result(_score(f"{recipe}:{seed}:{split}"), split)

    def score_recipe(self, recipe: str, seed: int, split: str) -> tuple[Scores, float, float]:
        time.sleep(self.delay)
        self.scored.append((recipe, split))
        return _score(f"{recipe}:{seed}:{split}"), 0.0, 0.0

    def merge(self, recipe: str, seed: int, out_dir: Path) -> Path:
        with atomic_model_folder(out_dir) as staging:
            (staging / "model").mkdir()
            (staging / "model" / "config.json").write_text("{}")
            (staging / "model" / "mergekit_config.yml").write_text(recipe)
        return out_dir


def install_synthetic() -> None:
    candidates.CandidateEvaluator = SyntheticCandidates  # the pipeline looks it up when a run starts


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(spec: str) -> None:
    """Wrap os.write or os.replace so the spec's N-th matching call dies with SIGKILL (see the docstring)."""
    kind, pattern, nth = spec.split(":")
    target, seen = re.compile(pattern), [0]

    def hit(path: str) -> bool:
        if not target.search(path):
            return False
        seen[0] += 1
        return seen[0] == int(nth)

    if kind == "write":
        real_write = os.write

        def write(fd: int, data: bytes) -> int:
            if hit(os.readlink(f"/proc/self/fd/{fd}")):
                real_write(fd, data[: len(data) // 2])
                _kill()
            return real_write(fd, data)

        os.write = write
    else:
        real_replace = os.replace

        def replace(src, dst, **kwargs) -> None:
            if hit(str(dst)):
                _kill()
            real_replace(src, dst, **kwargs)

        os.replace = replace


def run_api(run_file: str) -> None:
    """The Python API as a user calls it: `asyncio.run(EvoMergePipeline(config).run_evolution())`."""
    import asyncio

    from evoforge import EvoMergePipeline
    from evoforge.config import load_config

    asyncio.run(EvoMergePipeline(load_config(Path(run_file))).run_evolution())


if __name__ == "__main__":
    install_synthetic()
    if os.environ.get("EVOFORGE_TEST_FAULT"):
        install_fault(os.environ["EVOFORGE_TEST_FAULT"])
    if sys.argv[1] == "api":
        run_api(sys.argv[2])
    else:
        from evoforge.cli import app

        app(sys.argv[1:])
