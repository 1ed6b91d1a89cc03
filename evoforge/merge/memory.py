"""The memory merge path: candidates merged from base models resident on the device, no disk per candidate.

The base models (and the ancestor) are read once. A candidate's recipe is validated and planned by mergekit
itself (`validate_recipe`, mergekit-multi's stage naming, `MergePlanner`: parameters, gradients over depth,
filters, slices, optional and tied weights are resolved as `run_merge` resolves them); each planned output
tensor is computed by mergekit's own task (`ExecuteMergeMethodTask.execute`: the registered merge method,
its dtype handling, TIES/DARE sparsification), fed from memory instead of from safetensors files.

Stage tensors are planned and computed on demand, by layer, from the final stage's needs, and dropped after
their last use: a stage tensor the final path does not use costs nothing. A stage that draws random numbers
(DARE) is the exception: mergekit seeds torch at the start of each stage and draws masks in its executor's
task order, so such a stage runs its tasks in exactly that order (from mergekit's own scheduler) under its
own saved generator state, up to the last tensor used; a task nothing uses only draws (DARE's masks depend
on shapes, dtypes and densities, not values, so the stage tensors it would read are replaced by zeros).
With that the memory path gives the disk path's tensors (`merge_recipe`) for the same seed on the same
device, and the disk path gives stock `mergekit-multi --random-seed`'s.

An unscaled passthrough slice is assembled by reference (the output tensor *is* the input tensor).
Base models that do not fit on the GPU stay in pinned host memory and are streamed tensor by tensor.
Anything this path cannot reproduce exactly (tokenizer merges, models not resident, a dtype the residents
were not kept in) raises `NotInMemory`: the caller merges that recipe through the disk path instead.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mergekit.merge
import torch
from mergekit import merge_methods
from mergekit.architecture import WeightInfo, get_architecture_info
from mergekit.common import ModelReference, dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.graph import TaskUniverse, build_schedule
from mergekit.io.tasks import GatherTensors, LoaderCache
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
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


# ---------------------------------------------------------------------------------------------- planning


class _Planner(MergePlanner):
    """mergekit's planner, each tensor planned by mergekit's own `plan_tensor`, but only when first asked for
    (`task`): a stage tensor the final path does not use costs no parameter resolution. With `lazy=False`
    every tensor is planned at once, in mergekit's order (what a random stage's schedule needs)."""

    def __init__(self, *args: Any, lazy: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy
        self.outputs: dict[str, WeightInfo] = {}
        """Every output tensor, in plan order."""
        self._pending: dict[str, tuple] = {}
        self._planned: dict[str, ExecuteMergeMethodTask] = {}

    def plan_tensor(
        self, weight: WeightInfo, weights_in: list[WeightInfo], models: list[ModelReference], cfg_reader: Any
    ) -> None:
        if self.lazy and not weight.optional:  # mergekit may skip an optional weight: let it decide now
            self.outputs[weight.name] = weight
            self._pending[weight.name] = (weight, weights_in, models, cfg_reader)
            return
        self._plan_now(weight, weights_in, models, cfg_reader)

    def _plan_now(self, weight: WeightInfo, *args: Any) -> None:
        planned = len(self._tensors)
        super().plan_tensor(weight, *args)
        if len(self._tensors) > planned:
            task = self._tensors[-1][1]
            if not isinstance(task, ExecuteMergeMethodTask) or not isinstance(
                task.gather_tensors, GatherTensors
            ):
                raise NotInMemory(f"{weight.name}: vocabulary changes are only run through the disk path")
            self.outputs[weight.name], self._planned[weight.name] = weight, task

    def task(self, name: str) -> ExecuteMergeMethodTask:
        if name not in self._planned:
            self._plan_now(*self._pending.pop(name))
        return self._planned[name]

    def save_dtype(self, name: str) -> torch.dtype | None:
        """What mergekit's SaveTensor casts this output to."""
        return dtype_from_name(self.outputs[name].force_dtype or self.config.out_dtype)


@dataclass
class _Stage:
    """One merge document, planned by mergekit."""

    path: str
    config: PretrainedConfig
    plan: _Planner
    order: list[str] | None
    """The disk executor's task order, for a stage that draws random numbers (None: any order)."""
    position: int = 0
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None


def _shape(tensors: Sequence[tuple[WeightInfo, ExecuteMergeMethodTask]], names: Mapping[str, Any]) -> tuple:
    """What mergekit's schedule order depends on: outputs, their inputs and the names those resolve to."""
    return tuple(
        (
            weight.name,
            task.gather_tensors.dtype,
            *(
                (
                    ref.model.path,
                    w.name,
                    w.aliases,
                    w.tied_names,
                    w.optional,
                    w.force_dtype,
                    _resolve(w, names[ref.model.path]),
                )
                for ref, w in task.gather_tensors.weight_info.items()
            ),
        )
        for weight, task in tensors
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
        self._orders: dict[tuple, list[str]] = {}
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

    def _plan(self, config: MergeConfiguration, path: str, names: Mapping[str, Mapping[str, Any]]) -> _Stage:
        """Plan one document as `run_merge` does (mergekit's planner and disk targets; for a stage that draws
        random numbers, the executor's task order from mergekit's scheduler, cached by the plan's shape).
        `names`: model path → the tensor names it holds."""
        if config.tokenizer_source is not None or config.tokenizer is not None:
            raise NotInMemory("tokenizer merges are only run through the disk path")
        arch_info = get_architecture_info(config, self.options)
        out_config = mergekit.merge._model_out_config(config, arch_info, self.options.trust_remote_code)
        random = draws_random_numbers(config.merge_method)
        plan = _Planner(config, arch_info, options=self.options, out_model_config=out_config, lazy=not random)
        targets = plan.plan_to_disk(out_path=f"{path}.out")
        order = None
        if random:
            key = _shape(plan._tensors, names)
            if key not in self._orders:
                universe = TaskUniverse(targets)
                schedule = build_schedule([universe.add_task(t) for t in targets], {})
                self._orders[key] = [
                    h.task().output_weight.name
                    for h in schedule.tasks
                    if isinstance(h.task(), ExecuteMergeMethodTask)
                ]
            order = self._orders[key]
        return _Stage(path, out_config, plan, order)

    def merge(
        self, recipe_yaml: str, random_seed: int | None = None, source: str = "recipe"
    ) -> tuple[dict[str, torch.Tensor], PretrainedConfig]:
        """The final model's tensors and config, equal to what `merge_recipe` writes for the same seed.

        Tensors are on the merge device; an unscaled passthrough tensor is the resident tensor itself (read
        it, do not modify it). Same validation and errors as `merge_recipe`; `NotInMemory` for what only the
        disk path can run."""
        documents = validate_recipe(recipe_yaml, source=source)
        configs, dependencies = {}, {}
        for doc in documents:  # what mergekit-multi's load_config does after parsing the YAML
            body = {key: value for key, value in doc.items() if key != "name"}
            configs[doc.get("name")] = MergeConfiguration.model_validate(body)
        for name, config in configs.items():
            configs[name], dependencies[name] = patched_config(config, set(configs), STAGE_DIR)
        try:
            order = list(TopologicalSorter(dependencies).static_order())
        except CycleError as error:
            raise ConfigError(f"{source}: stages depend on each other in a cycle: {error.args[1]}") from None
        stage_paths = {f"{STAGE_DIR}/{name}" for name in order if name is not None}
        for config in configs.values():
            for ref in config.referenced_models():
                if (
                    ref.lora
                    or ref.override_architecture
                    or ref.model.path not in {*self.models, *stage_paths}
                ):
                    raise NotInMemory(f"{ref}: not one of the resident models")
        model_configs = {path: r.config for path, r in self.models.items()}
        loaders = {path: InMemoryLoader(r.tensors) for path, r in self.models.items()}
        stages: dict[str, _Stage] = {}
        with mergekit_fixes.applied(), models_in_memory(model_configs, loaders):
            for name in order:
                path = f"{STAGE_DIR}/{name}" if name is not None else f"{STAGE_DIR}/.final"
                stage = self._plan(
                    configs[name], path, {p: lo.index.tensor_paths for p, lo in loaders.items()}
                )
                stages[path] = stage
                model_configs[path] = stage.config
                loaders[path] = InMemoryLoader(dict.fromkeys(stage.plan.outputs))
            final = stages.pop(f"{STAGE_DIR}/.final")
            state = _Run(self, stages, random_seed).assemble(final)
        return state, final.config


def _fits(needed: int, merger: MemoryMerger) -> bool:
    """Residents fit if they leave room for two models' worth of candidate output and working tensors."""
    device = torch.device(merger.device)
    if device.index is None:  # torch.cuda's memory queries want an index: "cuda" means the current device
        device = torch.device("cuda", torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    capped = total * torch.cuda.get_per_process_memory_fraction(device) - torch.cuda.memory_reserved(device)
    largest = max(
        sum(t.numel() * t.element_size() for t in r.tensors.values()) for r in merger.models.values()
    )
    return needed + 2 * largest <= min(free, capped)


# ---------------------------------------------------------------------------------------------- execution


class _Run:
    """One candidate: stage tensors computed on demand, each kept until its last consumer has read it.

    A stage that draws random numbers runs its tasks in the disk executor's order, up to the last one used.
    A task of such a stage that nothing uses runs only for its draws: DARE's masks depend on shapes, dtypes,
    device and densities, not on values, so stage outputs it would read are replaced by zeros (and are not
    computed)."""

    def __init__(self, merger: MemoryMerger, stages: dict[str, _Stage], seed: int | None) -> None:
        self.merger, self.stages, self.seed = merger, stages, seed
        self.values: dict[tuple[str, str], torch.Tensor | None] = {}
        self.uses: Counter[tuple[str, str]] = Counter()
        self._counted: set[tuple[str, str]] = set()
        """Stage tasks that run for their output (their inputs are counted in `uses`)."""

    def _source(self, ref: ModelReference, weight: WeightInfo) -> tuple[str, str] | None:
        path = ref.model.path
        holder = self.stages[path].plan.outputs if path in self.stages else self.merger.models[path].tensors
        name = _resolve(weight, holder)
        if name is None and not weight.optional:
            raise NotInMemory(f"{weight.name} is not in {path}")  # the disk path names the problem
        return None if name is None else (path, name)

    def _count_inputs(self, task: ExecuteMergeMethodTask) -> None:
        for ref, weight in task.gather_tensors.weight_info.items():
            source = self._source(ref, weight)
            if source and source[0] in self.stages:
                self.uses[source] += 1
                if source not in self._counted:
                    self._counted.add(source)
                    self._count_inputs(self.stages[source[0]].plan.task(source[1]))

    def _draw_plan(self, task: ExecuteMergeMethodTask) -> tuple[list, list] | None:
        """For a DARE task whose output nothing uses: its resident inputs (loaded as usual) and its stage
        inputs (replaced by zeros of their shape and dtype), which make it draw exactly what it draws for real.
        None where that cannot be known without computing (another method, a stage input of unknown dtype)."""
        method = merge_methods.get(task.method_name)
        if getattr(method, "sparsification_method", None) != SparsificationMethod.random:
            return None
        gather, residents, zeros = task.gather_tensors, [], []
        for ref, weight in gather.weight_info.items():
            source, dtype = self._source(ref, weight), dtype_from_name(weight.force_dtype or gather.dtype)
            if source is not None and source[0] in self.stages:
                if dtype is None:
                    return None
                zeros.append((ref, dtype))
            elif source is not None:
                residents.append((ref, weight, dtype))
        return (residents, zeros) if residents else None

    def _draw(self, stage: _Stage, name: str) -> None:
        task = stage.plan.task(name)
        residents, zeros = self._draw_plan(task)
        tensors = {ref: self._load(ref, weight, dtype) for ref, weight, dtype in residents}
        shape = next(iter(tensors.values())).shape
        tensors.update({ref: torch.zeros(shape, dtype=d, device=self.merger.device) for ref, d in zeros})
        with self._generator(stage):
            task.execute(tensors=tensors)

    def assemble(self, stage: _Stage) -> dict[str, torch.Tensor]:
        """The final stage's tensors: in the disk executor's order if it draws random numbers itself, else
        in an order that takes random stages' outputs as they come (few are held at once)."""
        for name in stage.plan.outputs:
            self._count_inputs(stage.plan.task(name))
        for random in reversed([s for s in self.stages.values() if s.order]):  # consumers first
            for name in random.order:
                key = (random.path, name)
                if key not in self._counted and self._draw_plan(random.plan.task(name)) is None:
                    self._counted.add(key)
                    self._count_inputs(random.plan.task(name))
        position = {
            (path, name): i for path, st in self.stages.items() for i, name in enumerate(st.order or ())
        }

        def first_needed(name: str) -> int:
            sources = (
                self._source(r, w) for r, w in stage.plan.task(name).gather_tensors.weight_info.items()
            )
            return min((position[s] for s in sources if s in position), default=-1)

        state = {}
        for name in stage.order or sorted(stage.plan.outputs, key=first_needed):
            tensor = self._execute(stage, name)
            if tensor is not None:
                state[name] = tensor
        return state

    def _tensor(self, source: tuple[str, str]) -> torch.Tensor | None:
        """A stage output, computed if needed; forgotten after its last use."""
        if source not in self.values:
            stage = self.stages[source[0]]
            if stage.order is None:
                self.values[source] = self._execute(stage, source[1])
            while source not in self.values:
                name = stage.order[stage.position]
                stage.position += 1
                key = (stage.path, name)
                if key not in self._counted:  # unused: only its draws matter
                    self._draw(stage, name)
                    continue
                tensor = self._execute(stage, name)
                if self.uses[key]:
                    self.values[key] = tensor
        self.uses[source] -= 1
        return self.values[source] if self.uses[source] else self.values.pop(source)

    def _load(
        self, ref: ModelReference, weight: WeightInfo, dtype: torch.dtype | None
    ) -> torch.Tensor | None:
        """What mergekit's LoadTensor gives: the tensor under its first available name, cast to `dtype`."""
        source = self._source(ref, weight)
        if source is None:
            return None
        if source[0] in self.stages:
            tensor = self._tensor(source)
        else:
            resident = self.merger.models[source[0]]
            tensor = resident.tensors[source[1]]
            kept, stored = tensor.dtype, resident.stored[source[1]]
            if kept != stored and (dtype or stored) != kept:
                raise NotInMemory(f"residents are kept in {kept}; this recipe reads {dtype or stored}")
            tensor = tensor.to(self.merger.device, non_blocking=True)
        if tensor is not None and dtype is not None and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def _execute(self, stage: _Stage, name: str) -> torch.Tensor | None:
        task = stage.plan.task(name)
        gather = task.gather_tensors
        tensors = {}
        for ref, weight in gather.weight_info.items():
            tensor = self._load(ref, weight, dtype_from_name(weight.force_dtype or gather.dtype))
            if tensor is not None:
                tensors[ref] = tensor
        if task.method_name == "passthrough" and len(tensors) == 1 and task.dtype is task.out_dtype is None:
            (ref,) = tensors
            if task.input_parameters[ref]["scale"] in (None, 1.0):  # x * 1.0 == x: keep the reference
                result = tensors[ref]
            else:
                result = task.execute(tensors=tensors)
        elif stage.order is not None:
            with self._generator(stage):
                result = task.execute(tensors=tensors)
        else:
            result = task.execute(tensors=tensors)
        dtype = stage.plan.save_dtype(name)
        return result.to(dtype) if result is not None and dtype is not None else result

    @contextmanager
    def _generator(self, stage: _Stage) -> Iterator[None]:
        """torch's generators as the disk path has them for this task: seeded at the stage's start
        (`run_merge` calls transformers' `set_seed`), then advanced only by this stage's own tasks."""
        if self.seed is None:
            yield
            return
        cuda = self.merger.device if self.merger.device.type == "cuda" else None
        if stage.rng is None:
            set_seed(self.seed)
        else:
            torch.set_rng_state(stage.rng[0])
            if cuda is not None:
                torch.cuda.set_rng_state(stage.rng[1], cuda)
        yield
        stage.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda is not None else None)
