"""The resident base models and the merge entry point: `MemoryMerger.merge(recipe, seed)`.

Base models (and the ancestor) are read once through mergekit's own loader and kept on the merge device, or,
when they do not fit on the GPU, in pinned host memory and streamed tensor by tensor (a task whose working
set would not fit on the card is then merged in chunks on the card (`chunked`) or, for methods not handled
there, by mergekit's same code on the host). A candidate's recipe is validated
as the disk path validates it, its stages are planned (`plan`) with mergekit reading the residents from memory
(`mergekit_hooks.models_in_memory`) and executed (`run`) under evoforge's mergekit workarounds.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any, Protocol

import torch
from mergekit import merge_methods
from mergekit.common import ModelReference, dtype_from_name
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from transformers import PretrainedConfig

from evoforge.errors import ConfigError
from evoforge.merge import mergekit_fixes
from evoforge.merge.compat import resolve_model
from evoforge.merge.disk import merge_options, validate_recipe
from evoforge.merge.memory import chunked
from evoforge.merge.memory.layout import NotInMemory
from evoforge.merge.memory.plan import STAGE_DIR, StagePlanner, _StagePlan
from evoforge.merge.memory.run import _Run
from evoforge.merge.mergekit_hooks import InMemoryLoader, models_in_memory

_WORKING_SET = {True: 5, False: 3}
"""A task's peak device memory as a multiple of its inputs' bytes: TIES/DARE/DELLA (sparsification or sign
consensus: task vectors, masks, products, an int64 argsort for TIES) 5, other methods 3. From mergekit 0.1.5's
`GeneralizedTaskArithmeticMerge.merge_group`: four 445 MiB inputs (3×1.5 B embeddings and the base) peak near
14× one input, ~3.6× the inputs, plus TIES's argsort."""


class TensorSink(Protocol):
    """Where `MemoryMerger.merge(into=...)` writes a candidate's tensors (e.g. a resident model's weights)."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> None:
        """Every tensor has been written (a sink checks here that nothing is missing)."""


@dataclass
class _Resident:
    config: PretrainedConfig
    tensors: dict[str, torch.Tensor]
    stored: dict[str, torch.dtype] = field(default_factory=dict)
    """Dtype of each tensor in the model's files (what mergekit would cast from)."""


class MemoryMerger:
    """Base models resident once; `merge(recipe, seed)` gives a candidate's state dict and config.

    `device`: "auto", "cpu", "cuda" or "cuda:N" (merge math runs there, as with the disk path's options).
    `dtype`: keep the residents in this dtype (e.g. the run's bfloat16 for float32 checkpoints); recipes whose
    stages ask for another dtype then raise `NotInMemory`. `stream`: keep residents in pinned host memory
    and move tensors to the GPU as they are used; None decides from free GPU memory.
    """

    def __init__(
        self,
        models: Sequence[str | Path],
        device: str = "auto",
        dtype: str | None = None,
        stream: bool | None = None,
    ) -> None:
        self.options = merge_options(device)
        self.device = torch.device(self.options.device)
        self.cast = dtype_from_name(dtype)
        self.models: dict[str, _Resident] = {}
        paths = list(dict.fromkeys(str(resolve_model(str(m))) for m in models))
        for path in paths:
            self.models[path] = self._read(path)
        needed = sum(t.numel() * t.element_size() for r in self.models.values() for t in r.tensors.values())
        self.stream = self.device.type == "cuda" and (
            stream if stream is not None else not _fits(needed, self)
        )
        for resident in self.models.values():
            for name, tensor in resident.tensors.items():
                resident.tensors[name] = tensor.pin_memory() if self.stream else tensor.to(self.device)
        self.resident_bytes = needed
        self.task_budget = _task_budget(self.device) if self.stream else None
        """Streaming: device bytes a merge task's estimated working set may take (see `runs_on_host`)."""
        self.chunk = chunked.CHUNK
        """Elements per chunk of a task merged in chunks (`merges_in_chunks`)."""
        self.placements: Counter[tuple[str, str]] = Counter()
        """(where, method) of every merge task so far that did not run whole on the merge device: "chunked"
        (on the card in chunks) or "host" (by the rule of `runs_on_host`, or after running out of device
        memory); cumulative, so a caller compares two snapshots (how many tasks a capped run left the card)."""
        self._loaders = {path: InMemoryLoader(r.tensors) for path, r in self.models.items()}
        self.planner = StagePlanner(self.options, self.models.keys())

    def runs_on_host(self, method_name: str, input_bytes: int) -> bool:
        """Whether a task is merged on the host: only with streamed residents, when its estimated working set
        (inputs × `_WORKING_SET` of its method) exceeds `task_budget`."""
        if self.task_budget is None:
            return False
        method = merge_methods.get(method_name)
        sparse = isinstance(method, GeneralizedTaskArithmeticMerge) and (
            method.sparsification_method is not None or method.consensus_method is not None
        )
        return _WORKING_SET[sparse] * input_bytes > self.task_budget

    def merges_in_chunks(self, method_name: str, input_bytes: int, inputs: int) -> bool:
        """Whether a task that `runs_on_host` would send to the host is merged on the card in chunks instead
        (`chunked`: TIES, DARE, task arithmetic), its chunked working set within `task_budget`."""
        return (
            self.task_budget is not None
            and chunked.handles(method_name)
            and chunked.working_set(method_name, input_bytes, inputs, self.chunk) <= self.task_budget
        )

    def _read(self, path: str) -> _Resident:
        """Every tensor of a model through mergekit's own loader (what its LoadTensor reads)."""
        ref = ModelReference.model_validate(path)
        loader = ref.lazy_loader(lazy_unpickle=False)
        tensors, stored = {}, {}
        for name in loader.index.tensor_paths:
            tensor = loader.get_tensor(name, device="cpu")
            stored[name] = tensor.dtype
            tensors[name] = tensor.to(self.cast) if self.cast and tensor.is_floating_point() else tensor
        loader.flush()
        return _Resident(config=ref.config(), tensors=tensors, stored=stored)

    def _stage_plans(self, documents: list[dict[str, Any]], source: str) -> dict[str | None, _StagePlan]:
        """Each document's stage plan, in dependency order (the final document's under None)."""
        stage_names = frozenset(doc["name"] for doc in documents if "name" in doc)
        texts = {doc.get("name"): (repr(doc), stage_names) for doc in documents}
        docs = {name: self.planner.document(text, doc) for (name, text), doc in zip(texts.items(), documents)}
        try:
            order = list(TopologicalSorter({n: d.dependencies for n, d in docs.items()}).static_order())
        except CycleError as error:
            raise ConfigError(f"{source}: stages depend on each other in a cycle: {error.args[1]}") from None
        stage_paths = {f"{STAGE_DIR}/{name}" for name in order if name is not None}
        for doc in docs.values():
            for ref in doc.config.referenced_models():
                if (
                    ref.lora
                    or ref.override_architecture
                    or ref.model.path not in {*self.models, *stage_paths}
                ):
                    raise NotInMemory(f"{ref}: not one of the resident models")
        keys: dict[str | None, tuple] = {}
        plans: dict[str | None, _StagePlan] = {}
        configs: dict[str, PretrainedConfig] = {p: r.config for p, r in self.models.items()}
        loaders = dict(self._loaders)
        with models_in_memory(configs, loaders):
            for name in order:
                doc = docs[name]
                path = f"{STAGE_DIR}/{name}" if name is not None else f"{STAGE_DIR}/.final"
                keys[name] = (doc.structure, stage_names, tuple(keys[d] for d in sorted(doc.dependencies)))
                holders = {p: loader.index.tensor_paths for p, loader in loaders.items()}
                plans[name] = self.planner.stage_plan(texts[name], doc, keys[name], path, holders)
                configs[path] = plans[name].skeleton.config
                loaders[path] = plans[name].skeleton.loader
        return plans

    def merge(
        self,
        recipe_yaml: str,
        random_seed: int | None = None,
        source: str = "recipe",
        into: Callable[[PretrainedConfig], TensorSink] | None = None,
    ) -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
        """The final model's tensors and config, equal to what `merge_recipe` writes for the same seed.

        Tensors are on the merge device; an unscaled passthrough tensor is the resident tensor itself (read
        it, do not modify it). With `into`, nothing is collected: `into(config)` is called once the final
        config is known and gives a sink that is written each output tensor as soon as it is computed, then
        closed (the returned dict is empty), so a candidate never needs a second model's worth of memory. Same
        validation and errors as `merge_recipe`; `NotInMemory` for what only the disk path can run."""
        documents = validate_recipe(recipe_yaml, source=source)
        with mergekit_fixes.applied():
            plans = self._stage_plans(documents, source)
            final = plans.pop(None)
            config = copy.deepcopy(final.skeleton.config)
            stages = {f"{STAGE_DIR}/{name}": plan for name, plan in plans.items()}
            state: dict[str, torch.Tensor] = {}
            sink = into(copy.deepcopy(config)) if into is not None else None
            _Run(self, stages, random_seed).assemble(final, sink.write if sink else state.__setitem__)
            if sink is not None:
                sink.close()
        return state, config


def indexed(device: torch.device) -> torch.device:
    """torch.cuda's memory queries want an index: "cuda" means the current device."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _fits(needed: int, merger: MemoryMerger) -> bool:
    """Residents fit if they leave room for two models' worth of candidate output and working tensors."""
    device = indexed(merger.device)
    free, total = torch.cuda.mem_get_info(device)
    capped = total * torch.cuda.get_per_process_memory_fraction(device) - torch.cuda.memory_reserved(device)
    largest = max(
        sum(t.numel() * t.element_size() for t in r.tensors.values()) for r in merger.models.values()
    )
    return needed + 2 * largest <= min(free, capped)


def _task_budget(device: torch.device) -> int:
    """3/4 of what this process may use of the card (its capacity times the per-process memory fraction): the
    Scorer's model waits on the host during a streamed merge, the rest is for lm-eval's small tables and for
    fragmentation."""
    device = indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    return int(0.75 * total * torch.cuda.get_per_process_memory_fraction(device))
