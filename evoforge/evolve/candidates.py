"""Turning a genome into scores: recipe → merged weights → one resident Scorer.

`CandidateEvaluator` owns the models the run keeps in memory: the Scorer's, and with `merge_path: memory`
the base models (and ancestor) that `MemoryMerger` merges from, tensor by tensor, straight into the Scorer's
weights. A recipe the memory path cannot reproduce exactly (`NotInMemory`: models that are not the run's,
tokenizer merges) and every recipe with `merge_path: disk` go through the disk path (mergekit's run_merge, the
reference) into a scratch folder that is copied into the Scorer. The best model of a generation is written
from memory where the memory path applies (`save_merged`: the tensors mergekit's run_merge gives for its YAML
and seed on this device, without merging twice), else through the disk path.

With `overlap_merges`, `score_recipe(..., then=next)` merges the next candidate in a thread (on its own CUDA
stream) while this one is scored, into a second model's worth of memory, kept until its turn (a held-out
pass may come between): its `score_recipe` then only copies it into the Scorer. The thread is joined before `score_recipe` returns, so a merge never runs beside anything
but scoring (which draws nothing from the global generators DARE's masks come from, `Scorer.score`), and
results are the same bits as one after another.
"""

from __future__ import annotations

import copy
import gc
import shutil
import threading
import time
import uuid
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from transformers import PretrainedConfig

from evoforge.config import EvolutionConfig
from evoforge.evaluate.scorer import EvalResult, Metric, ResidentWeights, Scorer
from evoforge.evaluate.suite import resolve_tasks_dir
from evoforge.evolve.records import Scores
from evoforge.merge.disk import YAML_LOADER, merge_recipe
from evoforge.merge.memory import MemoryMerger, NotInMemory
from evoforge.merge.save import save_merged


def _same_candidate(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Same seed and the same YAML documents: two renderings that differ only in comments are one candidate."""
    return a[1] == b[1] and (a[0] == b[0] or _documents(a[0]) == _documents(b[0]))


def _documents(recipe: str) -> list:
    return list(yaml.load_all(recipe, Loader=YAML_LOADER))


class _HeldCandidate:
    """A sink into the Scorer's model that remembers what it wrote: the names, the config, and whether every
    tensor kept its dtype (then the model holds the candidate exactly and can be saved from it)."""

    def __init__(self, weights: ResidentWeights, config: PretrainedConfig) -> None:
        self.weights, self.config = weights, config
        self.names: list[str] = []
        self.exact = True
        self.key: tuple[str, int] | None = None
        """(recipe, seed) once the whole candidate is written."""

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.weights.write(name, tensor)
        self.names.append(name)
        self.exact &= tensor.dtype == self.weights.resident[name].dtype

    def close(self) -> None:
        self.weights.close()


class _MergedAhead:
    """A candidate merged while the one before it was scored: its config and tensors (an `into` factory and
    sink for `MemoryMerger.merge`), or the error that stopped it (the candidate is then merged again in the
    foreground, where its error is raised as it would have been)."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.config: PretrainedConfig | None = None
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.error: Exception | None = None

    def __call__(self, config: PretrainedConfig) -> _MergedAhead:
        self.config = config
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors.append((name, tensor))

    def close(self) -> None:
        """Complete: `CandidateEvaluator` writes the tensors into the Scorer when the candidate's turn comes."""


def to_scores(result: EvalResult) -> Scores:
    return Scores(
        metric=result.metric,
        fitness=result.fitness,
        domains=dict(result.domains),
        tasks={name: t.value for name, t in result.tasks.items()},
        fitness_se=result.fitness_se,
        domain_se=result.domain_se or {},
    )


class CandidateEvaluator:
    """Merges and scores candidates for one run; the Scorer and its task objects live as long as the run."""

    def __init__(self, cfg: EvolutionConfig, anchor_path: str, work_dir: Path) -> None:
        self.cfg = cfg
        self.work_dir = work_dir
        self.device = cfg.device
        self.scorer = Scorer.from_pretrained(
            anchor_path,
            device=cfg.device,
            dtype=cfg.dtype,
            evaluation=cfg.evaluation,
            weights=cfg.evaluation_weights,
            tasks_dir=resolve_tasks_dir(cfg.evaluation.tasks_dir, cfg.base_dir),
        )
        models = [*cfg.base_models, *([cfg.ancestor] if cfg.ancestor else [])]
        self.memory = (
            MemoryMerger([cfg.resolve(m) for m in models], device=cfg.device, dtype=cfg.dtype)
            if cfg.merge_path == "memory"
            else None
        )
        self.overlap = bool(
            self.memory is not None
            and not self.memory.stream
            and (cfg.overlap_merges if cfg.overlap_merges is not None else self.memory.device.type == "cuda")
        )
        """Whether `score_recipe(then=...)` merges the next candidate while scoring (module docstring)."""
        self._side_stream = (
            torch.cuda.Stream(self.memory.device)
            if self.overlap and self.memory.device.type == "cuda"
            else None
        )
        self._ahead: _MergedAhead | None = None
        self._held: _HeldCandidate | None = None
        """The candidate whose tensors the Scorer's model holds, exactly (written by the memory path)."""
        self._last: tuple[tuple[str, int], EvalResult] | None = None
        """The last candidate scored ((recipe, seed)) and its result, per-item scores included."""
        gc.freeze()  # the run's long-lived objects: full collections no longer walk them (~0.25 s pauses)

    def _open_weights(self, config: PretrainedConfig) -> _HeldCandidate:
        self._held = _HeldCandidate(self.scorer.open_weights(config), copy.deepcopy(config))
        return self._held

    def evaluate_model(self, path: str | Path, split: str, metric: Metric | None = None) -> EvalResult:
        """A whole model folder (a base model, or a saved candidate) on one split."""
        self._held = None
        self.scorer.load_weights(path)
        return self.scorer.score(split, metric=metric)

    def score_model(self, path: str | Path, split: str) -> Scores:
        return to_scores(self.evaluate_model(path, split))

    def result(self, recipe: str, seed: int, split: str, metric: Metric | None = None) -> EvalResult:
        """A candidate's whole result on `split` by `metric` (default: the split's, `Scorer.score`), per-item
        scores included: the last `score_recipe`'s if it scored this candidate so (the loop scores a new best
        on the held-out split just before `on_new_best`), else scored now."""
        last = self._last
        wanted = metric or self.scorer.metric(split)
        if (
            last is None
            or (last[1].split, last[1].metric) != (split, wanted)
            or not _same_candidate(last[0], (recipe, seed))
        ):
            self.score_recipe(recipe, seed, split, metric)
        return self._last[1]

    def merge(self, recipe: str, seed: int, out_dir: Path) -> Path:
        """A candidate as a model folder (created or replaced atomically). On the memory path: the Scorer's
        weights if they are this candidate's (the loop scores a new best on the held-out split just before
        saving it), else merged from memory again; otherwise merged through the disk path."""
        if self.memory is not None:
            merged = None
            if self._held is not None and self._held.key and _same_candidate(self._held.key, (recipe, seed)):
                state = self.scorer.model.state_dict()
                merged = (self._held.config, ((n, state[n]) for n in self._held.names))
            try:
                with self.scorer.on_host() if self.memory.stream and merged is None else nullcontext():
                    return save_merged(self.memory, recipe, out_dir, random_seed=seed, merged=merged)
            except NotInMemory:
                pass
        return merge_recipe(recipe, out_dir, device=self.device, random_seed=seed, work_dir=self.work_dir)

    def halve_batch_size(self) -> bool:
        """After an out-of-memory error (`evolve.failures`): first stop merging ahead (the second model's
        worth of memory it holds; scores are the same without it), then, at the next one, score at half
        the batch size for the rest of the run; False when it is 1 already (or not a number)."""
        if self.overlap:
            self.overlap, self._ahead = False, None
            return True
        size = getattr(self.scorer.lm, "batch_size_per_gpu", None)
        if not isinstance(size, int) or size <= 1:
            return False
        self.scorer.lm.batch_size_per_gpu = size // 2
        return True

    def score_recipe(
        self,
        recipe: str,
        seed: int,
        split: str,
        metric: Metric | None = None,
        then: tuple[str, int] | None = None,
    ) -> tuple[Scores, float, float]:
        """(scores, merge seconds, evaluation seconds) of one candidate recipe (by the split's metric unless
        `metric` says). On the memory path the merge seconds include copying the weights into the Scorer (only
        that when the candidate was merged ahead); on the disk path the evaluation seconds do. `then`: the
        (recipe, seed) scored next, merged while this one is scored where `overlap` allows."""
        t0 = time.perf_counter()
        self._held = None
        ahead = self._ahead  # a candidate merged ahead waits through other calls (a held-out pass)
        if ahead is not None and _same_candidate(ahead.key, (recipe, seed)):
            self._ahead = None
        else:
            ahead = None
        if self.memory is not None:
            try:  # each merged tensor goes straight into the Scorer's model (on the host if the GPU is small)
                with self.scorer.on_host() if self.memory.stream else nullcontext():
                    if ahead is not None and ahead.error is None:
                        self._write_ahead(ahead)
                    else:
                        self.memory.merge(recipe, seed, into=self._open_weights)
            except NotInMemory:
                pass
            else:
                if self._held.exact:
                    self._held.key = (recipe, seed)
                else:
                    self._held = None
                t1 = time.perf_counter()
                result = self._score_then_merge(split, metric, then)
                self._last = ((recipe, seed), result)
                return to_scores(result), t1 - t0, time.perf_counter() - t1
        self.work_dir.mkdir(parents=True, exist_ok=True)
        out = self.work_dir / f"candidate-{uuid.uuid4().hex[:8]}"
        try:
            self.merge(recipe, seed, out)
            t1 = time.perf_counter()
            result = self.evaluate_model(out, split, metric)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        self._last = ((recipe, seed), result)
        return to_scores(result), t1 - t0, time.perf_counter() - t1

    def _write_ahead(self, ahead: _MergedAhead) -> None:
        sink = self._open_weights(ahead.config)
        for name, tensor in ahead.tensors:
            sink.write(name, tensor)
        sink.close()
        ahead.tensors.clear()
        if self._side_stream is not None:  # the copies read blocks the side stream may reuse once freed
            torch.cuda.current_stream(self.memory.device).synchronize()

    def _score_then_merge(
        self, split: str, metric: Metric | None, then: tuple[str, int] | None
    ) -> EvalResult:
        """The Scorer's result; with `then` (and `overlap`), that candidate merged meanwhile in a thread."""
        if then is None or not self.overlap:
            return self.scorer.score(split, metric=metric)
        ahead = _MergedAhead(then)
        thread = threading.Thread(target=self._merge_ahead, args=(ahead,), name="evoforge-merge-ahead")
        try:
            return self.scorer.score(split, metric=metric, seeded=thread.start)
        finally:
            if thread.ident is not None:
                thread.join()
                self._ahead = ahead

    def _merge_ahead(self, ahead: _MergedAhead) -> None:
        stream = torch.cuda.stream(self._side_stream) if self._side_stream is not None else nullcontext()
        try:
            with stream:
                self.memory.merge(*ahead.key, into=ahead)
                if self._side_stream is not None:
                    self._side_stream.synchronize()
        except Exception as exc:  # merged again in the foreground, where the error is the job's
            ahead.error = exc
            ahead.tensors.clear()
            if isinstance(exc, torch.OutOfMemoryError):
                self.overlap = False  # no room for a second model: one after another from now on
