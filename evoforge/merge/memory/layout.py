"""A stage's layout as mergekit plans it: which output tensors, from which inputs, where each one's parameters
are looked up — what a recipe document's structure fixes (methods, models, slices, dtypes, the stages it reads),
not its parameter values.

`Layouts.plan` runs mergekit's own `MergePlanner` (slices, layer templates, optional and tied weights are laid
out as `run_merge` lays them out) and records the arguments of each `plan_tensor` call instead of building the
task; for a stage that draws random numbers it also takes the order mergekit's executor runs the stage's tasks
in, from mergekit's scheduler. Parameters are resolved per candidate (`plan._StagePlan`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import mergekit.merge
import torch
from mergekit import merge_methods
from mergekit.architecture import ConfiguredModuleArchitecture, WeightInfo, get_architecture_info
from mergekit.architecture.json_definitions import JsonModuleArchitecture
from mergekit.common import ImmutableMap, ModelReference, dtype_from_name
from mergekit.config import ConfigReader, InputSliceDefinition, MergeConfiguration
from mergekit.graph import TaskUniverse, build_schedule
from mergekit.io.tasks import GatherTensors
from mergekit.merge_methods import MergeMethod
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit.sparsify import SparsificationMethod
from transformers import PretrainedConfig

from evoforge.merge.mergekit_hooks import InMemoryLoader

_RANDOM_SPARSIFICATION = (SparsificationMethod.random, SparsificationMethod.della_magprune)
_WEIGHTS_KEPT = 1 << 12
"""Layer weight lists kept (one JSON architecture at depths up to 64 needs ~2,000)."""


class NotInMemory(Exception):
    """A recipe the memory path cannot reproduce exactly; merge it through the disk path instead."""


def draws_random_numbers(method_name: str) -> bool:
    """Whether a merge method draws from torch's generator (DARE, DELLA masks; arcee_fusion)."""
    method = merge_methods.get(method_name)
    if isinstance(method, GeneralizedTaskArithmeticMerge):
        return method.sparsification_method in _RANDOM_SPARSIFICATION
    return method_name == "arcee_fusion"


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


class Layouts:
    """Stage layouts over a set of resident models, with what is costly to recompute cached: a JSON
    architecture's layer weights, and a random stage's executor order (by the plan's shape)."""

    def __init__(self, options: MergeOptions, residents: Collection[str]) -> None:
        """`residents`: the paths of the models held in memory (stage outputs are not)."""
        self.options = options
        self.residents = residents
        self._orders: dict[tuple, list[str]] = {}
        self._weights: dict[tuple, tuple[Any, list[WeightInfo]]] = {}

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

    def plan(self, config: MergeConfiguration, path: str, holders: Mapping[str, Mapping]) -> _Skeleton:
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
            if inp.source is not None and inp.source[0] not in self.residents:
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
