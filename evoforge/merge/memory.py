"""The memory merge path: candidates merged from base models resident on the device, no disk per candidate.

The base models (and the ancestor) are read once. A candidate's recipe is validated and planned by mergekit
itself (`validate_recipe`, mergekit-multi's stage naming, `MergePlanner`: slices, layer templates, optional
and tied weights are laid out as `run_merge` lays them out; parameters, gradients over depth and filters are
resolved by mergekit's `resolve_parameters`); each output tensor is computed by mergekit's own task
(`ExecuteMergeMethodTask.execute`: the registered merge method, its dtype handling, TIES/DARE sparsification),
fed from memory instead of from safetensors files.

Planning is split by what it depends on. A stage's layout (which output tensors, from which inputs, where
each one's parameters are looked up) depends only on the recipe's structure — methods, models, slices,
dtypes, the stages it reads — not on parameter values, so it is planned once per structure and kept
(`_Skeleton`); a candidate whose stage differs only in weights, densities or scales resolves just those, per
tensor it uses (`_StagePlan`), and a stage document seen before (a gene the candidate shares with its parent)
reuses its resolved tasks as well.

Stage tensors are computed on demand from the final stage's needs and dropped after their last use: a stage
tensor the final path does not use costs nothing. A stage that draws random numbers (DARE) is the exception:
mergekit seeds torch at the start of each stage and draws masks in its executor's task order, so such a stage
runs its tasks in exactly that order (from mergekit's own scheduler) under its own saved generator state, up
to the last tensor used; a task nothing uses only draws (DARE's masks depend on shapes, dtypes and densities,
not values, so the stage tensors it would read are replaced by zeros). With that the memory path gives the
disk path's tensors (`merge_recipe`) for the same seed on the same device, and the disk path gives stock
`mergekit-multi --random-seed`'s.

An unscaled passthrough slice is assembled by reference (the output tensor *is* the input tensor).
Base models that do not fit on the GPU stay in pinned host memory and are streamed tensor by tensor.
Anything this path cannot reproduce exactly (tokenizer merges, models not resident, a dtype the residents
were not kept in) raises `NotInMemory`: the caller merges that recipe through the disk path instead.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Generic, Protocol, TypeVar

import immutables
import mergekit.merge
import torch
from mergekit import merge_methods
from mergekit.architecture import ConfiguredModuleArchitecture, WeightInfo, get_architecture_info
from mergekit.architecture.json_definitions import JsonModuleArchitecture
from mergekit.common import ImmutableMap, ModelReference, dtype_from_name
from mergekit.config import ConditionalParameter, ConfigReader, InputSliceDefinition, MergeConfiguration
from mergekit.graph import TaskUniverse, build_schedule
from mergekit.io.tasks import GatherTensors, LoaderCache
from mergekit.merge_methods import MergeMethod
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.parameter_resolver import resolve_parameters
from mergekit.plan import MergePlanner
from mergekit.scripts.multimerge import patched_config
from mergekit.sparsify import SparsificationMethod
from transformers import PretrainedConfig
from transformers.trainer_utils import set_seed

from evoforge.errors import ConfigError
from evoforge.merge import mergekit_fixes
from evoforge.merge.compat import resolve_model
from evoforge.merge.disk import merge_options, validate_recipe

STAGE_DIR = "/evoforge-memory"
"""Stage outputs are named `STAGE_DIR/<stage>` as mergekit-multi names them; nothing is read or written there."""
_RANDOM_SPARSIFICATION = (SparsificationMethod.random, SparsificationMethod.della_magprune)
_KEPT = 32
"""Stage documents, skeletons and resolved stage plans each kept, least recently used dropped (a 28-layer
stage's skeleton and plan are ~5,000 Python objects: kept ones lengthen the garbage collector's full passes)."""
_WORKING_SET = {True: 5, False: 3}
"""A task's peak device memory as a multiple of its inputs' bytes: TIES/DARE/DELLA (sparsification or sign
consensus: task vectors, masks, products, an int64 argsort for TIES) 5, other methods 3. From mergekit 0.1.5's
`GeneralizedTaskArithmeticMerge.merge_group`: four 445 MiB inputs (3×1.5 B embeddings and the base) peak near
14× one input, ~3.6× the inputs, plus TIES's argsort."""
_WEIGHTS_KEPT = 1 << 12
"""Layer weight lists kept (one JSON architecture at depths up to 64 needs ~2,000)."""


class TensorSink(Protocol):
    """Where `MemoryMerger.merge(into=...)` writes a candidate's tensors (e.g. a resident model's weights)."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self) -> None:
        """Every tensor has been written (a sink checks here that nothing is missing)."""


class NotInMemory(Exception):
    """A recipe the memory path cannot reproduce exactly; merge it through the disk path instead."""


def draws_random_numbers(method_name: str) -> bool:
    """Whether a merge method draws from torch's generator (DARE, DELLA masks; arcee_fusion)."""
    method = merge_methods.get(method_name)
    if isinstance(method, GeneralizedTaskArithmeticMerge):
        return method.sparsification_method in _RANDOM_SPARSIFICATION
    return method_name == "arcee_fusion"


class InMemoryLoader:
    """Duck-types mergekit's `LazyTensorLoader` over tensors held in memory (what mergekit's planner and
    scheduler ask a loader: its tensor names, and tensors by name)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor | None]) -> None:
        """`tensors`: name → tensor; a name mapped to None is listed (for planning) but cannot be read."""
        self.tensors = tensors
        self.index = SimpleNamespace(tensor_paths=dict.fromkeys(tensors, "memory"))

    def get_tensor(
        self,
        key: str,
        device: str = "cpu",
        aliases: Sequence[str] | None = None,
        raise_on_missing: bool = True,
    ) -> torch.Tensor | None:
        for name in (key, *(aliases or ())):
            if self.tensors.get(name) is not None:
                return self.tensors[name].to(device)
        if raise_on_missing:
            raise KeyError(key)
        return None

    def flush(self) -> None:
        """Nothing to release: the tensors belong to the caller."""


@contextmanager
def models_in_memory(
    configs: Mapping[str, PretrainedConfig], loaders: Mapping[str, InMemoryLoader]
) -> Iterator[None]:
    """While active, mergekit takes the config and the tensors of these model paths from memory.

    `ModelReference.config()` returns a copy of the given config (mergekit edits what it gets) and
    `LoaderCache.get` the given loader; other paths are read from disk as usual. The mappings may grow while
    active (stage outputs). Process-wide, like the workarounds in `mergekit_fixes`: one merge at a time.
    """
    original_config, original_get = ModelReference.config, LoaderCache.get

    def config(self: ModelReference, trust_remote_code: bool = False) -> PretrainedConfig:
        if self.model.path in configs and self.lora is None and self.override_architecture is None:
            return copy.deepcopy(configs[self.model.path])
        return original_config(self, trust_remote_code=trust_remote_code)

    def get(self: LoaderCache, model: ModelReference) -> Any:
        if model.model.path in loaders and model.lora is None:
            return loaders[model.model.path]
        return original_get(self, model)

    ModelReference.config, LoaderCache.get = config, get
    try:
        yield
    finally:
        ModelReference.config, LoaderCache.get = original_config, original_get


K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Kept(OrderedDict, Generic[K, V]):
    """A mapping that keeps its `_KEPT` most recently used entries."""

    def get_or(self, key: K, build: Callable[..., V], *args: Any) -> V:
        """The value kept under `key`, else `build(*args)`, kept."""
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = build(*args)
        if len(self) > _KEPT:
            self.popitem(last=False)
        return value


# ---------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class _Input:
    """One input of a planned tensor: what mergekit's `LoadTensor` would read for it."""

    ref: ModelReference
    source: tuple[str, str] | None
    """(model path, the name that model holds the weight under); None: an optional weight it lacks."""
    dtype: torch.dtype | None
    """What `LoadTensor` casts it to."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """One output tensor of a stage as mergekit plans it, less its parameter values: the arguments of
    `MergePlanner.plan_tensor`, where its `ConfigReader` points (module, slice index, t), its inputs."""

    weight: WeightInfo
    weights_in: tuple[WeightInfo, ...]
    models: tuple[ModelReference, ...]
    reader: tuple[str, int, float]
    gather: GatherTensors
    inputs: tuple[_Input, ...]
    save_dtype: torch.dtype | None
    """What mergekit's `SaveTensor` casts the output to."""


@dataclass
class _Skeleton:
    """A stage's plan as far as the recipe's structure fixes it (shared by candidates of that structure)."""

    arch_info: Any
    config: PretrainedConfig
    """The stage's output config (hand out copies)."""
    method: MergeMethod
    entries: dict[str, _Entry]
    """Every output tensor, in mergekit's plan order."""
    loader: InMemoryLoader
    """The stage output's tensor names, for planning later stages."""
    order: list[str] | None = None
    """The disk executor's task order, for a stage that draws random numbers (None: any order)."""
    draws: dict[str, tuple[list[_Input], list[tuple[ModelReference, torch.dtype]]]] = field(
        default_factory=dict
    )
    """Random stage: for each task that can run for its draws alone, its resident inputs and its stage
    inputs (replaced by zeros of that dtype)."""


class _Planner(MergePlanner):
    """mergekit's planner, recording for each output tensor the arguments of `plan_tensor` rather than
    building its task (that resolves parameters: per candidate). Layer weight names come from `weights`."""

    def __init__(
        self, *args: Any, weights: Callable[[ConfiguredModuleArchitecture, int], list], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.weights = weights
        self.calls: dict[str, tuple] = {}

    def plan_layer(
        self,
        sources: list[InputSliceDefinition],
        layer_offset: int,
        t: float,
        cfg_reader: ConfigReader,
        module_name: str,
    ) -> None:
        """mergekit's `plan_layer`, with cached weight names and one ConfigReader per layer."""
        weights_out = self.weights(self._out_module_arch(module_name), self._current_module_layers)
        weights_in = [
            self.weights(self._model_arch(s.model).get_module(module_name), s.layer_range[0] + layer_offset)
            for s in sources
        ]
        models, reader = [s.model for s in sources], cfg_reader.with_t(t)
        for idx, weight in enumerate(weights_out):
            self.plan_tensor(weight, [w[idx] for w in weights_in], models, reader)
        self._current_module_layers += 1

    def plan_tensor(
        self, weight: WeightInfo, weights_in: list[WeightInfo], models: list[ModelReference], cfg_reader: Any
    ) -> None:
        if weight.optional:  # mergekit skips an optional weight no input has: let it decide
            planned = len(self._tensors)
            super().plan_tensor(weight, weights_in, models, cfg_reader)
            if len(self._tensors) == planned:
                return
        module = next(name for name, m in self.config.modules.items() if m is cfg_reader.module)
        index = next(i for i, s in enumerate(cfg_reader.module.slices) if s is cfg_reader.slice_out)
        self.calls[weight.name] = (weight, tuple(weights_in), tuple(models), (module, index, cfg_reader.t))


def _reads(setting: Any, filters: set[str]) -> bool | None:
    """What mergekit's `evaluate_setting` reads besides the setting itself: adds to `filters` the substrings
    it tests a tensor's name for, returns whether it reads t (a gradient over depth); None: can't tell."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return False
    if setting and all(isinstance(e, (float, int, bool, str)) for e in setting):
        return True
    reads_t = False
    for cond in setting:
        if not isinstance(cond, ConditionalParameter):
            return None
        if cond.filter not in (None, "*"):
            filters.add(cond.filter)
        reads_t = reads_t or _reads(cond.value, filters)
    return reads_t


@dataclass(frozen=True)
class _Scope:
    """Where a slice's tensors look their parameters up (mergekit's `ConfigReader`), and what of a tensor
    the result can depend on: the names it tests against `filters`, and t where `reads_t`."""

    reader: ConfigReader
    filters: tuple[str, ...]
    reads_t: bool
    exact: bool
    """Settings `_reads` does not know: results depend on everything."""

    @classmethod
    def of(cls, config: MergeConfiguration, module: str, index: int) -> _Scope:
        definition = config.modules[module]
        reader = ConfigReader.model_construct(
            config=config, t=0, slice_out=definition.slices[index], module=definition
        )
        filters: set[str] = set()
        reads = [
            _reads(setting, filters)
            for model in (None, *(source.model for source in reader.slice_out.sources))
            for settings in reader.parameter_sources(model)
            for setting in (settings or {}).values()
        ]
        return cls(reader, tuple(sorted(filters)), any(reads), None in reads)


@dataclass
class _StagePlan:
    """A stage of one candidate: its skeleton, its own (normalised) config, its tasks as resolved."""

    skeleton: _Skeleton
    config: MergeConfiguration
    tasks: dict[str, ExecuteMergeMethodTask] = field(default_factory=dict)
    scopes: dict[tuple[str, int], _Scope] = field(default_factory=dict)
    resolved: dict[tuple, tuple[immutables.Map, immutables.Map]] = field(default_factory=dict)
    """Parameters resolved by mergekit, by what they depend on: tensors of one slice whose names pass the
    same filters (at the same t, if it matters) share them."""

    def task(self, name: str) -> ExecuteMergeMethodTask:
        """mergekit's task for this output, as `MergePlanner.plan_tensor` builds it (its parameters resolved
        by mergekit's `resolve_parameters`); built once: its inputs were validated when planned."""
        task = self.tasks.get(name)
        if task is None:
            entry = self.skeleton.entries[name]
            module, index, t = entry.reader
            scope = self.scopes.get((module, index))
            if scope is None:
                scope = self.scopes[module, index] = _Scope.of(self.config, module, index)
            names = (entry.weight.name, *(w.name for w in entry.weights_in))
            key = (
                module,
                index,
                (type(t), t) if scope.reads_t or scope.exact else None,  # 0 and 0.0 interpolate apart
                names if scope.exact else tuple(f in n for n in names for f in scope.filters),
            )
            parameters = self.resolved.get(key)
            if parameters is None:  # the models of a slice's tensors are its sources: they need no key
                shared, per_input = resolve_parameters(
                    self.skeleton.method.spec,
                    tensor_name=entry.weight.name,
                    inputs={model: w.name for model, w in zip(entry.models, entry.weights_in)},
                    sources=scope.reader.parameter_sources,
                    base_model=scope.reader.base_model,
                    t=t,
                )
                parameters = self.resolved[key] = (
                    immutables.Map(shared),
                    immutables.Map({m: immutables.Map(p) for m, p in per_input.items()}),
                )
            task = self.tasks[name] = ExecuteMergeMethodTask.model_construct(
                method_name=self.skeleton.method.spec.name,
                gather_tensors=entry.gather,
                model_order=entry.models,
                parameters=parameters[0],
                input_parameters=parameters[1],
                base_model=scope.reader.base_model,
                output_weight=entry.weight,
            )
        return task


@dataclass(frozen=True)
class _Document:
    """A recipe document as mergekit-multi loads it (validated, stage names patched to paths)."""

    config: MergeConfiguration
    """As loaded: mergekit's planner normalises the config it plans in place, so each plan gets a copy."""
    dependencies: frozenset[str]
    structure: Hashable
    """The document without its parameter values: what its stage's skeleton depends on (with its inputs')."""


def _structure(value: Any) -> Hashable:
    """A document as a hashable value, every `parameters` block left out."""
    if isinstance(value, dict):
        return tuple((key, _structure(item)) for key, item in value.items() if key != "parameters")
    if isinstance(value, list):
        return tuple(_structure(item) for item in value)
    return value


def _shape(entries: Mapping[str, _Entry]) -> tuple:
    """What mergekit's schedule order depends on: outputs, their inputs and the names those resolve to."""
    return tuple(
        (
            name,
            entry.gather.dtype,
            *(
                (ref.model.path, w.name, w.aliases, w.tied_names, w.optional, w.force_dtype, inp.source)
                for (ref, w), inp in zip(entry.gather.weight_info.items(), entry.inputs)
            ),
        )
        for name, entry in entries.items()
    )


def _resolve(weight: WeightInfo, available: Mapping[str, Any]) -> str | None:
    """The name a model holds a weight under, in mergekit's LoadTensor order (name, aliases, tied names)."""
    for name in (weight.name, *(weight.aliases or ()), *(weight.tied_names or ())):
        if name in available:
            return name
    return None


# ---------------------------------------------------------------------------------------------- residents


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
        self._loaders = {path: InMemoryLoader(r.tensors) for path, r in self.models.items()}
        self._documents: _Kept[tuple, _Document] = _Kept()
        self._skeletons: _Kept[Hashable, _Skeleton] = _Kept()
        self._plans: _Kept[tuple, _StagePlan] = _Kept()
        self._orders: dict[tuple, list[str]] = {}
        self._weights: dict[tuple, tuple[Any, list[WeightInfo]]] = {}

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

    def _layer_weights(self, arch: ConfiguredModuleArchitecture, index: int) -> list[WeightInfo]:
        """mergekit's weights of one layer. A JSON-defined architecture builds them from templates (pydantic
        dump, substitution, validation: most of a stage's planning time) that depend only on the layer
        index and the layer count, so those are built once."""
        if type(arch.info) is not JsonModuleArchitecture:
            return arch.layer_weights(index)
        key = (id(arch.info), arch.weight_prefix, arch.num_layers(), index)
        if key not in self._weights:
            if len(self._weights) >= _WEIGHTS_KEPT:  # only inferred architectures are built per call
                self._weights.clear()
            self._weights[key] = (arch.info, arch.layer_weights(index))  # holding info keeps its id unique
        return self._weights[key][1]

    def _document(self, text: tuple[str, frozenset[str]], doc: dict[str, Any]) -> _Document:
        """One document as mergekit-multi's `load_config` reads it (cached by its text)."""

        def load() -> _Document:
            body = {key: value for key, value in doc.items() if key != "name"}
            config, used = patched_config(MergeConfiguration.model_validate(body), set(text[1]), STAGE_DIR)
            return _Document(config, frozenset(used), _structure(doc))

        return self._documents.get_or(text, load)

    def _skeleton(self, config: MergeConfiguration, path: str, holders: Mapping[str, Mapping]) -> _Skeleton:
        """Plan one document's layout as `run_merge` does (mergekit's planner; for a stage that draws random
        numbers, the executor's task order from mergekit's scheduler, cached by what it depends on).
        `holders`: model path → the tensor names it holds. Normalises `config` in place, as mergekit does."""
        if (
            config.tokenizer_source is not None
            or config.tokenizer is not None
            or self.options.unsafe_truncate_embeddings
        ):
            raise NotInMemory("tokenizer merges and vocabulary changes are only run through the disk path")
        arch_info = get_architecture_info(config, self.options)
        out_config = mergekit.merge._model_out_config(config, arch_info, self.options.trust_remote_code)
        planner = _Planner(
            config, arch_info, options=self.options, out_model_config=out_config, weights=self._layer_weights
        )
        planner._plan()
        device = self.options.device if self.options.read_to_gpu else None
        entries = {}
        for name, (weight, weights_in, models, reader) in planner.calls.items():
            gather = GatherTensors.model_construct(  # plan_tensor's (validation keeps these values as given)
                weight_info=ImmutableMap(data=dict(zip(models, weights_in))),
                dtype=config.dtype,
                device=device,
            )
            inputs = []
            for ref, w in gather.weight_info.items():
                held = _resolve(w, holders[ref.model.path])
                if held is None and not w.optional:  # the disk path names the problem
                    raise NotInMemory(f"{w.name} is not in {ref.model.path}")
                source = None if held is None else (ref.model.path, held)
                inputs.append(_Input(ref, source, dtype_from_name(w.force_dtype or config.dtype)))
            save_dtype = dtype_from_name(weight.force_dtype or config.out_dtype)
            entries[name] = _Entry(weight, weights_in, models, reader, gather, tuple(inputs), save_dtype)
        skeleton = _Skeleton(
            arch_info, out_config, planner._method, entries, InMemoryLoader(dict.fromkeys(entries))
        )
        if draws_random_numbers(config.merge_method):
            skeleton.order = self._order(skeleton, config, path)
            if getattr(skeleton.method, "sparsification_method", None) == SparsificationMethod.random:
                skeleton.draws = {
                    name: draw
                    for name, entry in entries.items()
                    if (draw := self._draw_inputs(entry)) is not None
                }
        return skeleton

    def _draw_inputs(
        self, entry: _Entry
    ) -> tuple[list[_Input], list[tuple[ModelReference, torch.dtype]]] | None:
        """For a DARE task whose output nothing uses: its resident inputs (loaded as usual) and its stage
        inputs (replaced by zeros of their shape and dtype), which make it draw exactly what it draws for real.
        None where that cannot be known without computing (a stage input of unknown dtype, no resident)."""
        residents, zeros = [], []
        for inp in entry.inputs:
            if inp.source is not None and inp.source[0] not in self.models:
                if inp.dtype is None:
                    return None
                zeros.append((inp.ref, inp.dtype))
            elif inp.source is not None:
                residents.append(inp)
        return (residents, zeros) if residents else None

    def _order(self, skeleton: _Skeleton, config: MergeConfiguration, path: str) -> list[str]:
        """The order mergekit's executor runs a stage's merge tasks in (cached by the plan's shape)."""
        key = _shape(skeleton.entries)
        if key not in self._orders:
            planner = MergePlanner(config, skeleton.arch_info, self.options, skeleton.config)
            targets = planner.plan_to_disk(out_path=f"{path}.out")
            universe = TaskUniverse(targets)
            schedule = build_schedule([universe.add_task(t) for t in targets], {})
            self._orders[key] = [
                h.task().output_weight.name
                for h in schedule.tasks
                if isinstance(h.task(), ExecuteMergeMethodTask)
            ]
        return self._orders[key]

    def _stage_plans(self, documents: list[dict[str, Any]], source: str) -> dict[str | None, _StagePlan]:
        """Each document's stage plan, in dependency order (the final document's under None)."""
        stage_names = frozenset(doc["name"] for doc in documents if "name" in doc)
        texts = {doc.get("name"): (repr(doc), stage_names) for doc in documents}
        docs = {name: self._document(text, doc) for (name, text), doc in zip(texts.items(), documents)}
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
                plans[name] = self._plans.get_or(
                    (texts[name], keys[name]), self._stage_plan, doc, keys[name], path, holders
                )
                configs[path] = plans[name].skeleton.config
                loaders[path] = plans[name].skeleton.loader
        return plans

    def _stage_plan(
        self, doc: _Document, key: tuple, path: str, holders: Mapping[str, Mapping]
    ) -> _StagePlan:
        """A stage of a document not seen with these inputs: its structure's skeleton (planned if new) and
        a copy of the document's config, normalised as mergekit's planner normalises it (idempotent). The
        normalisation replaces `models`/`slices` by new module objects and edits only `modules` objects in
        place: a shallow copy is enough unless the document has `modules`."""
        config = doc.config.model_copy(deep=doc.config.modules is not None)
        skeleton = self._skeletons.get_or(key, self._skeleton, config, path, holders)
        MergePlanner(config, skeleton.arch_info, self.options, skeleton.config).normalize_config()
        return _StagePlan(skeleton, config)

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


def _indexed(device: torch.device) -> torch.device:
    """torch.cuda's memory queries want an index: "cuda" means the current device."""
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def _fits(needed: int, merger: MemoryMerger) -> bool:
    """Residents fit if they leave room for two models' worth of candidate output and working tensors."""
    device = _indexed(merger.device)
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
    device = _indexed(device)
    total = torch.cuda.get_device_properties(device).total_memory
    return int(0.75 * total * torch.cuda.get_per_process_memory_fraction(device))


# ---------------------------------------------------------------------------------------------- execution


class _Run:
    """One candidate: stage tensors computed on demand, each kept until its last consumer has read it.

    A stage that draws random numbers runs its tasks in the disk executor's order, up to the last one used.
    A task of such a stage that nothing uses runs only for its draws: DARE's masks depend on shapes, dtypes,
    device and densities, not on values, so stage outputs it would read are replaced by zeros (and are not
    computed)."""

    def __init__(self, merger: MemoryMerger, stages: dict[str, _StagePlan], seed: int | None) -> None:
        self.merger, self.stages, self.seed = merger, stages, seed
        self.values: dict[tuple[str, str], torch.Tensor | None] = {}
        self.uses: Counter[tuple[str, str]] = Counter()
        self.counted: set[tuple[str, str]] = set()
        """Stage tasks that run for their output (their inputs are counted in `uses`)."""
        self.position = dict.fromkeys(stages, 0)
        self.rng: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _count_inputs(self, entry: _Entry) -> None:
        for inp in entry.inputs:
            source = inp.source
            if source is not None and source[0] in self.stages:
                self.uses[source] += 1
                if source not in self.counted:
                    self.counted.add(source)
                    self._count_inputs(self.stages[source[0]].skeleton.entries[source[1]])

    def assemble(self, final: _StagePlan, write: Callable[[str, torch.Tensor], None]) -> None:
        """The final stage's tensors, each handed to `write`: in the disk executor's order if the stage
        draws random numbers itself, else in an order that takes random stages' outputs as they come (few
        are held at once)."""
        entries = final.skeleton.entries
        for entry in entries.values():
            self._count_inputs(entry)
        for path, stage in reversed(self.stages.items()):  # consumers first
            for name in stage.skeleton.order or ():
                key = (path, name)
                if key not in self.counted and name not in stage.skeleton.draws:
                    self.counted.add(key)
                    self._count_inputs(stage.skeleton.entries[name])
        position = {
            (path, name): i
            for path, stage in self.stages.items()
            for i, name in enumerate(stage.skeleton.order or ())
        }

        def first_needed(name: str) -> int:
            sources = (inp.source for inp in entries[name].inputs)
            return min((position[s] for s in sources if s in position), default=-1)

        for name in final.skeleton.order or sorted(entries, key=first_needed):
            tensor = self._execute(None, final, name)
            if tensor is not None:
                write(name, tensor)

    def _tensor(self, source: tuple[str, str]) -> torch.Tensor | None:
        """A stage output, computed if needed; forgotten after its last use. With streamed residents (a GPU
        too small for them) a tensor kept for a later use waits on the host: a random stage computed in
        its executor's order can otherwise hold most of a model on the card until the final stage reads it."""
        if source not in self.values:
            path = source[0]
            stage = self.stages[path]
            order = stage.skeleton.order
            if order is None:
                self.values[source] = self._execute(path, stage, source[1])
            while source not in self.values:
                name = order[self.position[path]]
                self.position[path] += 1
                key = (path, name)
                if key not in self.counted:  # unused: only its draws matter
                    self._draw(path, stage, name)
                    continue
                tensor = self._execute(path, stage, name)
                if self.uses[key]:
                    self.values[key] = self._park(tensor) if key != source else tensor
        self.uses[source] -= 1
        if not self.uses[source]:
            return self.values.pop(source)
        tensor = self.values[source] = self._park(self.values[source])
        return tensor

    def _park(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Where a stage tensor waits for its next use: on the host when residents are streamed."""
        return tensor.to("cpu") if self.merger.stream and tensor is not None else tensor

    def _load(self, inp: _Input) -> torch.Tensor | None:
        """What mergekit's LoadTensor gives: the tensor under its first available name, cast to its dtype."""
        if inp.source is None:
            return None
        path, name = inp.source
        if path in self.stages:
            tensor = self._tensor(inp.source)
            if tensor is not None:
                tensor = tensor.to(self.merger.device, non_blocking=True)
        else:
            resident = self.merger.models[path]
            tensor = resident.tensors[name]
            kept, stored = tensor.dtype, resident.stored[name]
            if kept != stored and (inp.dtype or stored) != kept:
                raise NotInMemory(f"residents are kept in {kept}; this recipe reads {inp.dtype or stored}")
            tensor = tensor.to(self.merger.device, non_blocking=True)
        if tensor is not None and inp.dtype is not None and tensor.dtype != inp.dtype:
            tensor = tensor.to(inp.dtype)
        return tensor

    def _draw(self, path: str, stage: _StagePlan, name: str) -> None:
        residents, zeros = stage.skeleton.draws[name]
        tensors = {inp.ref: self._load(inp) for inp in residents}
        shape = next(iter(tensors.values())).shape
        tensors.update({ref: torch.zeros(shape, dtype=d, device=self.merger.device) for ref, d in zeros})
        self._run_task(path, stage.task(name), tensors, random=True)

    def _execute(self, path: str | None, stage: _StagePlan, name: str) -> torch.Tensor | None:
        """One output tensor of a stage (`path` None: the final document)."""
        entry, task = stage.skeleton.entries[name], stage.task(name)
        tensors = {}
        for inp in entry.inputs:
            tensor = self._load(inp)
            if tensor is not None:
                tensors[inp.ref] = tensor
        if task.method_name == "passthrough" and len(tensors) == 1 and task.dtype is task.out_dtype is None:
            (ref,) = tensors
            if task.input_parameters[ref]["scale"] in (None, 1.0):  # x * 1.0 == x: keep the reference
                result = tensors[ref]
            else:
                result = task.execute(tensors=tensors)
        else:
            result = self._run_task(path, task, tensors, random=stage.skeleton.order is not None)
        dtype = entry.save_dtype
        return result.to(dtype) if result is not None and dtype is not None else result

    def _run_task(
        self,
        path: str | None,
        task: ExecuteMergeMethodTask,
        tensors: dict[ModelReference, torch.Tensor],
        random: bool,
    ) -> Any:
        """mergekit's task on its inputs (under its stage's generators if it draws random numbers).

        With streamed residents (a GPU too small for them) a task whose working set would not fit on the
        card (`MemoryMerger.runs_on_host`: TIES/DARE over a 233 M-element embedding need ~14× its size) runs
        mergekit's same code on the host, as the disk path does with a CPU device; the rule depends only on
        the card and the shapes, so a recipe and seed give the same tensors on the same card every time, but
        not the bits of a larger GPU (sort order of equal magnitudes, summation order, host generator). A
        deterministic task that still runs out of device memory is retried on the host the same way."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            with self._generator(path) if random else nullcontext():
                if self.merger.runs_on_host(task.method_name, size):
                    return self._on_host(task, tensors)
                try:
                    return task.execute(tensors=tensors)
                except torch.OutOfMemoryError:
                    if random or not self.merger.stream:
                        raise
                torch.cuda.empty_cache()
                return self._on_host(task, tensors)
        except torch.OutOfMemoryError as error:
            names = f"{task.output_weight.name} ({task.method_name}, inputs {size / 2**30:.2f} GiB)"
            error.add_note(f"evoforge: out of GPU memory merging {names}")
            raise

    def _on_host(self, task: ExecuteMergeMethodTask, tensors: dict[ModelReference, torch.Tensor]) -> Any:
        host = {ref: tensor.cpu() for ref, tensor in tensors.items()}
        tensors.clear()  # the caller's references to the device copies go too
        return task.execute(tensors=host).to(self.merger.device)

    @contextmanager
    def _generator(self, path: str | None) -> Iterator[None]:
        """torch's generators as the disk path has them for this stage's task: seeded at the stage's start
        (`run_merge` calls transformers' `set_seed`), then advanced only by this stage's own tasks."""
        if self.seed is None:
            yield
            return
        cuda = self.merger.device if self.merger.device.type == "cuda" else None
        if path not in self.rng:
            set_seed(self.seed)
        else:
            torch.set_rng_state(self.rng[path][0])
            if cuda is not None:
                torch.cuda.set_rng_state(self.rng[path][1], cuda)
        yield
        self.rng[path] = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda is not None else None)
