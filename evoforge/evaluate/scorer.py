"""Scoring a model: one resident model behind one lm-eval HFLM wrapper, task objects built once per split.

A candidate is scored by copying its tensors into the resident model (`load_weights`), not by loading a new
model: building tasks and the wrapper once and calling `lm_eval.evaluator.evaluate` directly costs about
half of `simple_evaluate` per candidate (shared/notes/lm-eval.md). Request and response caches stay off:
lm-eval keys them on prompts, so a second candidate would get the first one's answers. On a GPU the
wrapper is `PooledHFLM` (every task's generation requests decoded together, the same texts in fewer steps);
on the CPU, where decoding is bound by arithmetic rather than by steps, lm-eval's HFLM.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from statistics import fmean, stdev
from typing import Literal

import numpy as np
import torch
from lm_eval.api.model import LM
from lm_eval.api.task import Task
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from pydantic import BaseModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from evoforge.config import EvaluationConfig, EvolutionConfig
from evoforge.errors import ConfigError, IncompatibleModelsError
from evoforge.evaluate.generation import PooledHFLM
from evoforge.evaluate.likelihood import GoldItems, encode_gold, item_scores
from evoforge.evaluate.stats import bootstrap, compute_fitness, domain_means
from evoforge.evaluate.suite import TaskError, TaskSuite
from evoforge.models import Device, locate_model, resolve_device

Dtype = Literal["float32", "bfloat16", "float16"]
Metric = Literal["accuracy", "likelihood"]

DEFAULT_WEIGHTS: dict[str, float] = EvolutionConfig.model_fields["evaluation_weights"].default
SEED = 1234
"""lm-eval's default torch/numpy/few-shot seed, so its CLI and evoforge draw the same few-shot examples."""
BOOTSTRAP_ITERS = 1000
"""Mean metrics get a closed-form stderr; bootstrapped ones (bleu, chrf) stay cheap enough per candidate."""
_BOOKKEEPING = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}
_DEPTH = {"num_hidden_layers", "layer_types"}


class TaskScore(BaseModel):
    """A task's primary metric on the evaluated documents."""

    domains: list[str]
    metric: str
    value: float
    stderr: float | None
    n_items: int
    level: str | None = None
    items: list[float] | None = None
    """Per-item scores in document order, what a bootstrap over items resamples (None for a metric lm-eval
    aggregates over the corpus, such as bleu)."""


class EvalResult(BaseModel):
    """What one model scored on one split; `fitness` is the weighted mean of the domain scores."""

    split: str
    metric: Metric = "accuracy"
    """`accuracy`: each task's primary metric; `likelihood`: gold-answer probability (evaluate.likelihood)."""
    tasks: dict[str, TaskScore]
    domains: dict[str, float]
    """Domain → mean primary metric of its tasks (a task tagged with two domains counts in both)."""
    weights: dict[str, float]
    fitness: float
    domain_se: dict[str, float] | None = None
    fitness_se: float | None = None
    """Bootstrap standard errors over the items (`evaluate.stats`); None when a task has no per-item scores."""
    n_items: int
    limit: int | None
    wall_s: float

    def item_scores(self) -> dict[str, list[float]] | None:
        """Task → per-item scores, None unless every task has them."""
        items = {name: t.items for name, t in self.tasks.items()}
        return None if any(v is None for v in items.values()) else items  # type: ignore[return-value]

    def task_domains(self) -> dict[str, list[str]]:
        return {name: t.domains for name, t in self.tasks.items()}


def check_weights(weights: Mapping[str, float], suite: TaskSuite) -> None:
    """Every weighted domain must have a task: fitness over a domain nothing scores is meaningless."""
    domains = suite.domains
    for domain, weight in weights.items():
        if weight > 0 and domain not in domains:
            raise ConfigError(
                f"evaluation_weights.{domain}: no task in {suite.root} has this domain "
                f"(domains there: {', '.join(domains)})"
            )
    compute_fitness(dict.fromkeys(domains, 0.0), weights)


def load_model(
    source: str | Path, device: Device | str = "auto", dtype: Dtype = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM and its tokenizer from a model folder or a cached HF id (`evoforge.models.locate_model`),
    in eval mode on the device (`evoforge.models.resolve_device`)."""
    folder = locate_model(source, what="")
    target = resolve_device(device)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{source}: cannot load model ({first.rstrip('.')})") from None
    return model.to(target).eval(), tokenizer


def _read_weights(source: str | Path) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    folder = locate_model(source, what="")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{source}: not a model folder (no *.safetensors)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    return AutoConfig.from_pretrained(folder), state


def _config_diff(a: PretrainedConfig, b: PretrainedConfig) -> set[str]:
    da, db = a.to_dict(), b.to_dict()
    return {k for k in da.keys() | db.keys() if k not in _BOOKKEEPING and da.get(k) != db.get(k)}


class ResidentWeights:
    """Copies a candidate's tensors into a resident model one by one; `close` checks that none is missing.
    Tied tensors share one storage: the second name must bring the same values."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.resident = model.state_dict()
        self.loaded: dict[int, str] = {}  # storage → first name copied into it

    def write(self, name: str, tensor: torch.Tensor) -> None:
        target = self.resident.get(name)
        if target is None:
            raise IncompatibleModelsError(f"candidate tensor {name!r} has no place in the resident model")
        if tensor.shape != target.shape:
            raise IncompatibleModelsError(
                f"candidate tensor {name!r} has shape {tuple(tensor.shape)}, the resident model {tuple(target.shape)}"
            )
        ptr = target.untyped_storage().data_ptr()
        with torch.no_grad():
            if ptr in self.loaded and not torch.equal(target, tensor.to(target)):
                raise IncompatibleModelsError(
                    f"candidate tensors {self.loaded[ptr]!r} and {name!r} differ, but the resident model ties them"
                )
            target.copy_(tensor)
        self.loaded.setdefault(ptr, name)

    def close(self) -> None:
        missing = [n for n, t in self.resident.items() if t.untyped_storage().data_ptr() not in self.loaded]
        if missing:
            raise IncompatibleModelsError(f"candidate has no tensor {missing[0]!r}")


class Scorer:
    """Scores models on a task suite, reusing one model, one lm-eval wrapper and the task objects."""

    def __init__(
        self,
        model: PreTrainedModel | LM,
        tokenizer: PreTrainedTokenizerBase | None = None,
        evaluation: EvaluationConfig | None = None,
        weights: Mapping[str, float] | None = None,
        tasks_dir: str | Path | None = None,
        seed: int = SEED,
    ) -> None:
        """`model` is an HF model (wrapped once in HFLM with `tokenizer`) or any lm-eval LM, scored as is.
        `tasks_dir` overrides `evaluation.tasks_dir` (which resolves against the working directory);
        `weights` default to the run file's defaults (every built-in domain equal)."""
        self.evaluation = evaluation or EvaluationConfig()
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.suite = TaskSuite.discover(tasks_dir or self.evaluation.tasks_dir).select(self.evaluation.tasks)
        self.suite.check()
        check_weights(self.weights, self.suite)
        self.seed = seed
        self.model: PreTrainedModel | None = None
        self.tokenizer = tokenizer
        if isinstance(model, LM):
            self.lm = model
        elif tokenizer is None:
            raise TypeError("Scorer: an HF model needs its tokenizer")
        else:
            self.model = model
            self.lm = self._wrap()
        self._tasks: dict[str, dict[str, Task]] = {}
        self._gold: dict[tuple[str, int | None], GoldItems] = {}

    @classmethod
    def from_pretrained(
        cls, source: str | Path, device: Device | str = "auto", dtype: Dtype = "float32", **kwargs
    ) -> Scorer:
        """A Scorer over a model folder or hub id (kwargs as for the constructor)."""
        model, tokenizer = load_model(source, device, dtype)
        return cls(model, tokenizer, **kwargs)

    def _wrap(self) -> HFLM:
        """A fixed integer batch size: "auto" re-probes memory on every call (~10 s)."""
        kwargs = {
            "pretrained": self.model,
            "tokenizer": self.tokenizer,
            "batch_size": self.evaluation.batch_size,
            "max_gen_toks": self.evaluation.max_new_tokens,
        }
        if self.model.device.type == "cuda":
            return PooledHFLM(static_cache=self.evaluation.compile_generation, **kwargs)
        return HFLM(**kwargs)

    def tasks(self, split: str) -> dict[str, Task]:
        """The task objects evaluating `split`, built on first use.

        `evaluation.max_new_tokens` is the generation budget of tasks that set none; written explicitly in
        the run file, it replaces every task's own `max_gen_toks` (these objects are this Scorer's alone)."""
        if split not in self._tasks:
            tasks = self.suite.build(split)
            if "max_new_tokens" in self.evaluation.model_fields_set:
                budget = {"max_gen_toks": self.evaluation.max_new_tokens}
                for task in tasks.values():
                    if task.OUTPUT_TYPE == "generate_until":
                        task.set_config("generation_kwargs", budget, update=True)
            if self.model is not None:
                check_context(self.lm, tasks, self.suite, split)
            self._tasks[split] = tasks
        return self._tasks[split]

    # ------------------------------------------------------------------ candidates

    def load_weights(
        self, source: Mapping[str, torch.Tensor] | str | Path, config: PretrainedConfig | None = None
    ) -> None:
        """Copy a candidate's tensors into the resident model (a state dict, or a model folder).

        Same architecture and shapes are required. A folder whose config (or a state dict's `config`, as the
        memory merge path gives it) differs only in depth (a frankenmerge or DFS path) resizes the decoder's
        layer list in place; one that differs otherwise (rope, norms, tied embeddings) gets a model rebuilt
        from its config and a new wrapper. After an error the resident weights are undefined until the next
        successful load."""
        if isinstance(source, Mapping):
            state = source
        else:
            config, state = _read_weights(source)
        sink = self.open_weights(config)
        for name, tensor in state.items():
            sink.write(name, tensor)
        sink.close()

    @contextmanager
    def on_host(self) -> Iterator[None]:
        """The resident model's weights on the host while active, back on their device after: a merge on a
        small GPU (residents streamed) gets the whole card, and writes the candidate into host memory."""
        device = next(self.model.parameters()).device
        self.model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()  # cached blocks count against a capped card: give them back
        try:
            yield
        finally:
            self.model.to(device)

    def open_weights(self, config: PretrainedConfig | None = None) -> ResidentWeights:
        """A sink that copies tensors into the resident model as they come (`MemoryMerger.merge(into=...)`);
        `config` as for `load_weights`."""
        if self.model is None:
            raise TypeError("Scorer.open_weights: this Scorer wraps an lm-eval LM, not an HF model")
        if config is not None:
            diff = _config_diff(self.model.config, config)
            if diff - _DEPTH:
                self._rebuild(config)
            elif diff:
                self._set_depth(config)
        return ResidentWeights(self.model)

    def _set_depth(self, config: PretrainedConfig) -> None:
        """Truncate or extend the decoder layers; new layers are built the way the model builds its own
        (`LayerClass(config, layer_idx)`) and then receive the candidate's tensors."""
        layers = self.model.get_decoder().layers
        first = next(iter(layers.parameters()))
        for key in _DEPTH & set(config.to_dict()):
            setattr(self.model.config, key, getattr(config, key))
        depth = config.num_hidden_layers
        del layers[depth:]
        layer_cls = type(layers[0])
        with torch.device(first.device):  # initialised where they live: no host copy of a big layer
            for idx in range(len(layers), depth):
                layers.append(layer_cls(self.model.config, idx).to(dtype=first.dtype))

    def _rebuild(self, config: PretrainedConfig) -> None:
        first = next(self.model.parameters())
        with torch.device(first.device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=first.dtype).eval()
        self.lm = self._wrap()

    # ------------------------------------------------------------------ scoring

    def _reseed(self, tasks: Iterable[Task]) -> None:
        """Same seeds before every candidate, so nothing depends on what was scored before."""
        random.seed(0)
        np.random.seed(self.seed)
        torch.manual_seed(self.seed)
        for task in tasks:
            task.set_fewshot_seed(seed=self.seed)

    def _accuracy(self, tasks: dict[str, Task], limit: int | None) -> dict[str, TaskScore]:
        """Each task's primary metric through lm-eval's `evaluate` (generation, filters, metrics)."""
        out = evaluate(
            self.lm,
            {"tasks": tasks},
            limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=True,  # the per-item scores a bootstrap resamples
            confirm_run_unsafe_code=True,  # tasks/ is trusted; code runs in evoforge's sandbox
        )
        scores: dict[str, TaskScore] = {}
        for name, info in self.suite.tasks.items():
            metrics = out["results"][name]
            if info.primary_metric not in metrics:
                reported = sorted(k for k in metrics if "," in k and "_stderr," not in k)
                raise TaskError(
                    f"{info.path}: metadata.primary_metric: {info.primary_metric!r} is not among the task's "
                    f"results {reported}"
                )
            metric, _, filt = info.primary_metric.partition(",")
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            scores[name] = TaskScore(
                domains=list(info.domains),
                metric=info.primary_metric,
                value=float(metrics[info.primary_metric]),
                stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                n_items=int(out["n-samples"][name]["effective"]),
                level=info.level,
                items=_primary_items(out["samples"][name], info.primary_metric),
            )
        return scores

    def _likelihood(self, split: str, limit: int | None) -> dict[str, TaskScore]:
        """Each task's mean gold-answer probability (evaluate.likelihood), with the stderr of that mean. The
        tokenized requests are built once per split and limit: they do not depend on the weights."""
        if (split, limit) not in self._gold:
            self._gold[(split, limit)] = encode_gold(self.lm, self.tasks(split), limit)
        scores: dict[str, TaskScore] = {}
        for name, values in item_scores(self.lm, self._gold[(split, limit)]).items():
            info = self.suite.tasks[name]
            scores[name] = TaskScore(
                domains=list(info.domains),
                metric="likelihood",
                value=fmean(values),
                stderr=stdev(values) / len(values) ** 0.5 if len(values) > 1 else None,
                n_items=len(values),
                level=info.level,
                items=values,
            )
        return scores

    def metric(self, split: str) -> Metric:
        """The split's metric: the config's `fitness_metric` on the fitness split, accuracy on any other."""
        return self.evaluation.fitness_metric if split == self.evaluation.fitness_split else "accuracy"

    def score(
        self,
        split: str | None = None,
        limit: int | None = None,
        metric: Metric | None = None,
        seeded: Callable[[], None] | None = None,
    ) -> EvalResult:
        """Evaluate the resident model on `split` (default: the fitness split), first `limit` documents of
        each task (default: the config's limit; None = all), by `metric` (default: the config's
        `fitness_metric` on the fitness split, accuracy on any other), with per-item scores and the
        bootstrap standard errors of the domain scores and fitness. `seeded` is called once the global
        generators are seeded: scoring draws nothing from them after, so work started there (the next
        candidate's merge, `CandidateEvaluator`) neither changes this score nor is changed by it."""
        split = split or self.evaluation.fitness_split
        limit = limit if limit is not None else self.evaluation.limit
        metric = metric or self.metric(split)
        tasks = self.tasks(split)
        self._reseed(tasks.values())
        if seeded is not None:
            seeded()
        start = time.perf_counter()
        if metric == "likelihood":
            scores = self._likelihood(split, limit)
        else:
            scores = self._accuracy(tasks, limit)
        wall = time.perf_counter() - start
        task_domains = {name: s.domains for name, s in scores.items()}
        domains = domain_means({name: s.value for name, s in scores.items()}, task_domains)
        items = {name: s.items for name, s in scores.items()}
        spread = None
        if all(v is not None for v in items.values()):
            spread = bootstrap(items, task_domains, self.weights)
        return EvalResult(
            split=split,
            metric=metric,
            tasks=scores,
            domains=domains,
            weights=self.weights,
            fitness=compute_fitness(domains, self.weights),
            domain_se={d: iv.se for d, iv in spread.domains.items()} if spread else None,
            fitness_se=spread.fitness.se if spread else None,
            n_items=sum(s.n_items for s in scores.values()),
            limit=limit,
            wall_s=wall,
        )


def check_context(lm: HFLM, tasks: Mapping[str, Task], suite: TaskSuite, split: str) -> None:
    """Every request of `split` fits the model's context (`lm.max_length`, from max_position_embeddings):
    the prompt plus the generation budget, or the prompt plus the answer scored. Why: lm-eval asserts when
    the budget alone reaches the context, and silently cuts a longer prompt's question off from the left."""
    for name, task in tasks.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        for request in task.instances:
            context, *rest = request.args
            generate = request.request_type == "generate_until"
            budget = rest[0].get("max_gen_toks", lm.max_gen_toks) if generate else 0
            text = context if generate or not rest else context + rest[0]
            length = len(lm.tok_encode(text))
            if length + budget > lm.max_length:
                what = (
                    f"prompt of {length} tokens + max_gen_toks {budget}" if generate else f"{length} tokens"
                )
                raise ConfigError(
                    f"{suite.tasks[name].path}: split {split}, document {request.doc_id}: {what} exceed the "
                    f"model's context of {lm.max_length} tokens (config.json max_position_embeddings): lower "
                    "evaluation.max_new_tokens, shorten the prompt, or use a model with a longer context"
                )


def _primary_items(samples: list[dict], primary_metric: str) -> list[float] | None:
    """One task's per-document values of its primary metric (`metric,filter`) from lm-eval's logged samples;
    None where they are not numbers (a corpus-level metric logs what its aggregation needs)."""
    metric, _, filt = primary_metric.partition(",")
    values = [s[metric] for s in sorted(samples, key=lambda s: s["doc_id"]) if s["filter"] == filt]
    if not all(isinstance(v, (int, float)) for v in values):
        return None
    return [float(v) for v in values]
