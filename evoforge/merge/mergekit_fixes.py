"""Workarounds for mergekit 0.1.5 bugs that hit evoforge — the one place they live.

Each workaround has a test in tests/test_mergekit_fixes.py that shows the upstream bug still exists. When such
a test fails, upstream fixed the bug: drop the workaround and its tests.

(a) `layer_types_follow_slices` — depth-changing slice merges lose config.json under transformers 5.
(b) `clear_loader_cache` — mergekit's LoaderCache serves stale tensors after a model folder is rewritten.
(c) `stage_dir` / `check_stage_names` — multi-stage merges reuse stale stage outputs, and a stage name
    rewrites every equal string in the recipe.
(d) `MergePlanner.plan_in_memory()` always raises TypeError: evoforge does not call it; the workaround for the
    tests and the bench that use mergekit's in-memory planner as a reference is tests/mergekit_support.py.
(e) `zero_safe_multislerp` — multislerp raises on tensors that no input changes (zero deltas, zero biases).
(f) `copy_generation_config` — `tokenizer_source` skips copying generation_config.json.
(g) `global_rng_preserved` — a seeded merge re-seeds the caller's `random`, numpy and torch generators.
(h) cached Hugging Face ids: mergekit asks the hub for a model's file list even when the model is in the
    local cache, so offline merges of HF ids fail; `evoforge.merge.disk` hands mergekit local folders instead
    (resolved by `evoforge.merge.compat.resolve_model`).
(i) `planners_released` — `MergePlanner._model_arch` is a class-level `functools.lru_cache` keyed on the
    planner: it keeps the last 128 planners alive, and with them whatever they reference (in the memory path,
    the merger and its resident base models: 11.5 GiB of GPU memory at Qwen2-1.5B scale).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mergekit.merge
import numpy as np
import torch
from mergekit import merge_methods
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import LoaderCache
from mergekit.merge_methods.base import TensorGroup
from mergekit.plan import MergePlanner
from transformers import PretrainedConfig

from evoforge.errors import ConfigError

# Keys whose string values name a model; anywhere else a string equal to a stage name is a collision (c).
MODEL_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})


# (a) ------------------------------------------------------------------------------------------------------
def rebuild_layer_types(
    out_config: PretrainedConfig, merge_config: MergeConfiguration, trust_remote_code: bool = False
) -> None:
    """Give each output layer the `layer_types` entry of the source layer it is copied from.

    mergekit sets `num_hidden_layers` for a slice merge but leaves transformers 5's `layer_types` at the base
    model's length, and `save_pretrained` then refuses the config (merge.py ~97): the weights are written,
    config.json is not. Taking each type from its source layer also keeps sliding/full attention layers right
    when layers are reordered or repeated.
    """
    if getattr(out_config, "layer_types", None) is None or not merge_config.slices:
        return
    source_types: dict[ModelReference, list[str]] = {}
    layer_types: list[str] = []
    for out_slice in merge_config.slices:
        source = out_slice.sources[0]  # every source of a slice spans the same layers of one architecture
        if source.model not in source_types:
            source_types[source.model] = source.model.config(trust_remote_code=trust_remote_code).layer_types
        start, end = source.layer_range
        layer_types.extend(source_types[source.model][start:end])
    out_config.layer_types = layer_types


@contextmanager
def layer_types_follow_slices() -> Iterator[None]:
    """While active, mergekit's output config gets `layer_types` rebuilt by `rebuild_layer_types`."""
    original = mergekit.merge._model_out_config

    def model_out_config(config: MergeConfiguration, arch_info: Any, trust_remote_code: bool = False):
        out_config = original(config, arch_info, trust_remote_code=trust_remote_code)
        rebuild_layer_types(out_config, config, trust_remote_code)
        return out_config

    mergekit.merge._model_out_config = model_out_config
    try:
        yield
    finally:
        mergekit.merge._model_out_config = original


# (b) ------------------------------------------------------------------------------------------------------
def clear_loader_cache() -> None:
    """Forget every model mergekit has opened.

    `LoaderCache` keeps one loader per model path, with its index and an open (memory-mapped) shard, for the
    life of the process: a merge that reads a path rewritten since it was first read gets the old tensors,
    and deleted folders keep their disk space while mapped.
    """
    cache = LoaderCache()
    cache.flush_all()
    cache.loaders.clear()


# (c) ------------------------------------------------------------------------------------------------------
@contextmanager
def stage_dir(parent: Path | None = None) -> Iterator[Path]:
    """A new empty folder for stage outputs, deleted afterwards.

    `mergekit-multi` skips any stage whose folder already holds a model (`lazy=True`, the default), so a
    re-run with changed weights silently reuses the old stage. Use a fresh folder per merge and `lazy=False`.
    """
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="evoforge-stages-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_stage_names(documents: Sequence[Mapping[str, Any]], source: str) -> None:
    """Refuse a stage name that equals a string used anywhere but as a model reference.

    mergekit replaces every string equal to a stage name with that stage's output path, wherever it is
    (a stage named `ties` rewrites another stage's `merge_method: ties`).
    """
    names = {doc["name"] for doc in documents if isinstance(doc.get("name"), str)}

    def walk(value: Any, loc: tuple[Any, ...]) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                if not (key in MODEL_KEYS and isinstance(item, str)):
                    walk(item, (*loc, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*loc, index))
        elif isinstance(value, str) and value in names:
            raise ConfigError(
                f"{source}: document {loc[0] + 1}: field {'.'.join(map(str, loc[1:]))}: "
                f"{value!r} is also a stage name, and mergekit would replace it with that stage's output "
                "path: rename the stage"
            )

    for index, doc in enumerate(documents):
        walk({key: item for key, item in doc.items() if key != "name"}, (index,))


# (e) ------------------------------------------------------------------------------------------------------
@contextmanager
def zero_safe_multislerp() -> Iterator[None]:
    """While active, multislerp returns the base (or zeros) for a tensor no input changes.

    multislerp normalises each input's delta; when every delta is zero (a frozen embedding among fine-tunes
    of the base, or biases that are zero in every model) it raises "The weighted sum of the input tensors is
    zero" instead of returning the unchanged tensor.
    """
    method = merge_methods.get("multislerp")
    original = method.implementation

    def implementation(group: TensorGroup, **parameters: Any) -> torch.Tensor:
        origin = group.base.tensor if group.base else torch.zeros_like(group.non_base[0].tensor)
        if all(torch.equal(entry.tensor, origin) for entry in group.non_base):
            return origin.clone()
        return original(group, **parameters)

    method.implementation = implementation
    try:
        yield
    finally:
        method.implementation = original


# (f) ------------------------------------------------------------------------------------------------------
def copy_generation_config(merge_config: MergeConfiguration, out_path: Path) -> None:
    """Copy generation_config.json from the config donor (base model, else first model) if the merge lacks it.

    With `tokenizer_source`/`tokenizer`, mergekit saves the built tokenizer instead of copying the donor's
    tokenizer files, and generation_config.json (eos ids, sampling defaults) is left behind.
    """
    target = Path(out_path) / "generation_config.json"
    donor = merge_config.base_model or merge_config.referenced_models()[0]
    origin = Path(donor.model.path) / "generation_config.json"
    if not target.exists() and origin.is_file():
        shutil.copy(origin, target)


# (g) ------------------------------------------------------------------------------------------------------
@contextmanager
def global_rng_preserved() -> Iterator[None]:
    """Restore the global `random`, numpy and torch generators after a merge.

    run_merge with a random seed calls transformers' `set_seed`, which re-seeds all global generators: the
    caller's random stream (an evolution loop's mutations) would restart at the same point after every merge.
    """
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# (i) ------------------------------------------------------------------------------------------------------
_MODEL_ARCH = MergePlanner.__dict__["_model_arch"]


def _model_arch_per_planner(self: MergePlanner, model: ModelReference) -> Any:
    """mergekit's `_model_arch`, cached on the planner itself (freed with it)."""
    cache = self.__dict__.setdefault("_evoforge_model_arch", {})
    if model not in cache:
        cache[model] = _MODEL_ARCH.__wrapped__(self, model)
    return cache[model]


@contextmanager
def planners_released() -> Iterator[None]:
    """Planners made while active cache their model architectures on themselves, not in a global LRU."""
    MergePlanner._model_arch = _model_arch_per_planner
    try:
        yield
    finally:
        MergePlanner._model_arch = _MODEL_ARCH


@contextmanager
def applied() -> Iterator[None]:
    """Every workaround a merge run needs: patches active, loader cache empty before and after, RNG kept.

    The patches are process-wide: run one merge at a time (evoforge merges sequentially).
    """
    clear_loader_cache()
    try:
        with global_rng_preserved(), layer_types_follow_slices(), zero_safe_multislerp(), planners_released():
            yield
    finally:
        clear_loader_cache()
