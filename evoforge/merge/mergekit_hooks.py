"""Process-wide mergekit hooks that are not bug workarounds: mergekit reading models from memory.

Like the patches in `mergekit_fixes` (their neighbour), they replace mergekit attributes for the whole process
while active: run one merge at a time (evoforge merges sequentially). The memory merge path
(`evoforge.merge.memory`) plans candidates with mergekit's own planner over resident models through these.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from mergekit.common import ModelReference
from mergekit.io.tasks import LoaderCache
from transformers import PretrainedConfig


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
