"""The memory merge path: candidates merged from base models resident on the device, no disk per candidate.

The base models (and the ancestor) are read once (`merger`). A candidate's recipe is validated and planned by
mergekit itself (`validate_recipe`, mergekit-multi's stage naming, `MergePlanner`: slices, layer templates,
optional and tied weights are laid out as `run_merge` lays them out; parameters, gradients over depth and
filters are resolved by mergekit's `resolve_parameters`); each output tensor is computed by mergekit's own task
(`ExecuteMergeMethodTask.execute`), fed from memory instead of from safetensors files. With that the memory
path gives the disk path's tensors (`merge_recipe`) for the same seed on the same device, and the disk path
gives stock `mergekit-multi --random-seed`'s.

Modules by concern: `layout` (a stage's layout, planned once per recipe structure), `plan` (a candidate's
stages: documents loaded, parameters resolved, kept for the next candidates), `run` (executing the plans:
stage tensors on demand, random stages in mergekit's order), `batched` (a stage's same-shaped tasks merged
in one call, same bits), `chunked` (TIES/DARE over a tensor in chunks, for tasks too big for a small card),
`merger` (the residents, streaming, `merge`).
mergekit reads the residents through `evoforge.merge.mergekit_hooks`. Anything this path cannot reproduce
exactly (tokenizer merges, models not resident, a dtype the residents were not kept in) raises `NotInMemory`:
the caller merges that recipe through the disk path instead.
"""

from evoforge.merge.memory.layout import NotInMemory, draws_random_numbers
from evoforge.merge.memory.merger import MemoryMerger, TensorSink
from evoforge.merge.memory.plan import STAGE_DIR
from evoforge.merge.mergekit_hooks import InMemoryLoader, models_in_memory

__all__ = [
    "STAGE_DIR",
    "InMemoryLoader",
    "MemoryMerger",
    "NotInMemory",
    "TensorSink",
    "draws_random_numbers",
    "models_in_memory",
]
