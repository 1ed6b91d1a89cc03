"""A candidate's stages: each recipe document loaded as mergekit-multi loads it, laid out once per structure,
its parameters resolved by mergekit per tensor it uses.

A stage's layout (`layout.Layouts`) depends only on the recipe's structure, not on parameter values, so it is
planned once per structure and kept (`_Skeleton`); a candidate whose stage differs only in weights, densities
or scales resolves just those, per tensor it uses (`_StagePlan`: mergekit's `resolve_parameters`, results shared
by tensors whose names pass the same filters), and a stage document seen before (a gene the candidate shares
with its parent) reuses its resolved tasks as well.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import immutables
from mergekit.config import ConditionalParameter, ConfigReader, MergeConfiguration
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.options import MergeOptions
from mergekit.parameter_resolver import resolve_parameters
from mergekit.plan import MergePlanner
from mergekit.scripts.multimerge import patched_config

from evoforge.merge.memory.layout import Layouts, _Skeleton

STAGE_DIR = "/evoforge-memory"
"""Stage outputs are named `STAGE_DIR/<stage>` as mergekit-multi names them; nothing is read or written there."""
_KEPT = 32
"""Stage documents, skeletons and resolved stage plans each kept, least recently used dropped (a 28-layer
stage's skeleton and plan are ~5,000 Python objects: kept ones lengthen the garbage collector's full passes)."""

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


class StagePlanner:
    """Documents, skeletons and stage plans over a set of resident models, the most recently used kept."""

    def __init__(self, options: MergeOptions, residents: Collection[str]) -> None:
        """`residents`: the paths of the models held in memory."""
        self.options = options
        self.layouts = Layouts(options, residents)
        self._documents: _Kept[tuple, _Document] = _Kept()
        self._skeletons: _Kept[Hashable, _Skeleton] = _Kept()
        self._plans: _Kept[tuple, _StagePlan] = _Kept()

    def document(self, text: tuple[str, frozenset[str]], doc: dict[str, Any]) -> _Document:
        """One document as mergekit-multi's `load_config` reads it (cached by its text)."""

        def load() -> _Document:
            body = {key: value for key, value in doc.items() if key != "name"}
            config, used = patched_config(MergeConfiguration.model_validate(body), set(text[1]), STAGE_DIR)
            return _Document(config, frozenset(used), _structure(doc))

        return self._documents.get_or(text, load)

    def stage_plan(
        self,
        text: tuple[str, frozenset[str]],
        doc: _Document,
        key: tuple,
        path: str,
        holders: Mapping[str, Mapping],
    ) -> _StagePlan:
        """The stage plan of `doc` (read from `text`), kept by its text and `key` (its structure and its
        inputs' structures: what its skeleton depends on). `path`: where the stage's output is named;
        `holders`: model path → the tensor names it holds."""
        return self._plans.get_or((text, key), self._stage_plan, doc, key, path, holders)

    def _stage_plan(
        self, doc: _Document, key: tuple, path: str, holders: Mapping[str, Mapping]
    ) -> _StagePlan:
        """A stage of a document not seen with these inputs: its structure's skeleton (planned if new) and
        a copy of the document's config, normalised as mergekit's planner normalises it (idempotent). The
        normalisation replaces `models`/`slices` by new module objects and edits only `modules` objects in
        place: a shallow copy is enough unless the document has `modules`."""
        config = doc.config.model_copy(deep=doc.config.modules is not None)
        skeleton = self._skeletons.get_or(key, self.layouts.plan, config, path, holders)
        MergePlanner(config, skeleton.arch_info, self.options, skeleton.config).normalize_config()
        return _StagePlan(skeleton, config)
