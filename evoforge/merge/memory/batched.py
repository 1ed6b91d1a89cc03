"""A stage's same-shaped tasks merged in one call: every layer's `q_proj.weight` of a linear, TIES, DARE, task
arithmetic or multislerp stage stacked into one [tensors, elements] view, merged once, split.

On CPU at tiny scale the memory path's time is mergekit's per-tensor kernel Python (83-92 %); on a GPU it is
kernel launches. Each task still goes through mergekit's own `ExecuteMergeMethodTask.execute` (input checks,
optional-weight policies, buffers, parameter binding); only its final call, the method's `_execute_resolved`,
is recorded instead of run (`_recorded`), and the recorded calls of tasks that share method, input models,
options (shared non-numeric parameters), dtypes and shapes run as one:

- `linear`: mergekit's own batch kernel (`BatchedMergeMethod._execute_resolved` over many groups: mergekit
  packs them, per-tensor weights become rows of its coefficient tensor). Every step is per element.
- `slerp` (CPU only): mergekit's own batch kernel too, its chunk of columns kept at what one tensor gets
  (`_slerp_chunks`: mergekit divides its 1 M-element chunk by the rows). Its dot product is a whole-chunk
  sum for one tensor, which torch splits over threads above 32,768 elements: with more than one thread,
  larger tensors run alone.
- `ties`, `task_arithmetic` (`_task_arithmetic`): `GeneralizedTaskArithmeticMerge.merge_group` over the
  stack, per-tensor weights and densities per row. TIES's magnitude top-k (`_largest`): the elements at
  least each row's k-th largest magnitude, where exactly k are; where the k-th value is tied, a row-wise
  argsort: torch sorts each row of a [tensors, elements] view exactly as it sorts that tensor alone, so the
  same k elements are kept, ties included (mergekit's CPU float32 conversion kept). Not with `rescale`
  (its l1 norms are whole-tensor sums, which torch splits over threads differently from row sums).
- `dare_ties` and other DARE methods (CPU and CUDA; `execute` with `used`, from `run`'s random stages): mergekit
  draws each task's masks inside its merge, task after task in its executor's order, so every task's masks
  are drawn first, in that order, each with the shape, dtype and density mergekit's `sparsify.bernoulli`
  uses (`_masks`; a task nothing uses draws only); then the used tasks' arithmetic runs over the stack
  (`_dropped`: its l1 rescale sums one row at a time, each as mergekit sums that one tensor). On CUDA the
  same bits too (`test_batched_dare_draws_mergekits_masks_on_cuda`, H100, 2026-12-06; bench/RESULTS.md "GPU
  A2": tiny-28's DARE recipes 0.32-0.56 → 0.12-0.38 s a first merge).
- `multislerp` (`_multislerp`, CPU only): norms, dots and means per row; the cosine and sine of each
  tensor's tangent norm over a column of rows (torch's vectorised and scalar `cos`/`sin` agree: tested with
  40 rows). Tensors no input changes keep the base, as `mergekit_fixes.zero_safe_multislerp` has it.

Equality: the same bits as the per-tensor path (tests/test_batched_merge.py, any thread count on the CPU).
Everything else runs per tensor: DELLA and the other sparsifications, passthrough, the other methods, and
on CUDA slerp and multislerp (GPU reductions are laid out by the
tensor's shape: row sums need not equal whole-tensor sums). On CUDA, linear and TIES batch by the same
argument (per-element steps; CUDA sorts rows of > 4,096 elements with a stable segmented sort, as it sorts
one tensor); checked on an H100 (`test_batched_kernels_give_mergekits_bits_on_cuda`, and the qwen2-1.5b
bench's memory-path merges equal to mergekit's bit for bit with batching on).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import mergekit.merge_methods.slerp as slerp_module
import torch
from mergekit import merge_methods
from mergekit.common import ModelReference
from mergekit.merge_methods.base import BatchedMergeMethod, BatchOptions, ParameterScope, TensorGroup
from mergekit.merge_methods.dtype import align_dtype, promoted_dtype
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.sparsify import SparsificationMethod

from evoforge.merge.memory import chunked

ENABLED = True
"""Batch a stage's same-shaped tasks (False: every task alone, as mergekit's executor runs them; tests and
bench/merge_bench.py's `--no-batch` compare the two)."""

MAX_BYTES = {"cpu": 1 << 21, "cuda": 1 << 28}
"""Inputs of one batched call at most, by device type (counted at 4 bytes an element; the stack, masks and
float32 intermediates come on top, a few times this); a device type not listed runs tensor by tensor. CPU:
2 MiB, batches that stay in cache: the Python saved is per tensor, while a batch larger than the cache sends
each elementwise pass to memory (at 2 M elements a tensor, 4 layers batched, multislerp took 1.35 s against
~0.8 s tensor by tensor; with 8 MiB, mid-8's merges of 32-131 K-element tensors took 7 % longer than with
2 MiB, tiny-28's the same: bench/RESULTS.md "CPU A"). CUDA: 256 MiB, a 1.5 B model's 28 q_proj of three
bfloat16 inputs in two calls (H100, qwen2-1.5b, bench/RESULTS.md: TIES recipes 0.281 → 0.217 s and 0.641 →
0.544 s a merge, same bits)."""

_CPU_ONLY = frozenset({"multislerp", "slerp"})
_UNTIED = 1 << 16
"""Rows of at most this many elements try `kthvalue` before the sort (`_largest`). Deltas are multiples of
the weights' rounding step, so large tensors tie at the k-th magnitude: at 2 M float32 elements (TIES, hidden
1024) all 18 batches had tied rows, and the try cost a fifth of the sort; at 8 K elements rows are untied."""
_EPS = 1e-7
"""`sparsify.rescaled_masked_tensor`'s default: a norm below it is not rescaled."""
_GRAIN = 32768
"""torch's `at::internal::GRAIN_SIZE`: a reduction to one value over fewer elements runs on one thread."""


def batchable(method_name: str, device: torch.device) -> bool:
    """Whether tasks of `method_name` on `device` are merged in batches."""
    if method_name == "linear":
        return True
    if method_name in _CPU_ONLY:
        return device.type == "cpu"
    method = merge_methods.get(method_name)
    return isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method in (
        None,
        SparsificationMethod.magnitude,
    )


def draws_in_batches(method_name: str, device: torch.device) -> bool:
    """Whether a random stage's tasks of `method_name` (DARE: `sparsify.bernoulli`) are merged in batches
    (`execute` with `used`): on the CPU and on CUDA, where each draws mergekit's bits (tested on both)."""
    method = merge_methods.get(method_name)
    return (
        device.type in ("cpu", "cuda")
        and isinstance(method, GeneralizedTaskArithmeticMerge)
        and method.sparsification_method is SparsificationMethod.random
    )


def options(task: ExecuteMergeMethodTask) -> Hashable | None:
    """What tasks merged in one call must share besides inputs and shapes: the method, input models, dtypes
    and the shared parameters a batch cannot vary per row. None: this task runs alone."""
    method = merge_methods.get(task.method_name)
    shared = tuple(
        (p.name, task.parameters.get(p.name))
        for p in method.spec.parameters
        if p.scope == ParameterScope.SHARED and not p.batch_tensor
    )
    magnitude = getattr(method, "sparsification_method", None) is SparsificationMethod.magnitude
    if magnitude and task.parameters.get("rescale"):
        return None
    return (task.method_name, task.model_order, task.base_model, task.dtype, task.out_dtype, shared)


@dataclass
class _Call:
    """One task's `_execute_resolved` call, as `ExecuteMergeMethodTask.execute` made it."""

    group: TensorGroup
    parameters: dict[str, Any]
    dtype: torch.dtype | None
    out_dtype: torch.dtype | None

    def signature(self) -> Hashable:
        """What calls merged together must have alike."""
        entries = tuple(
            (e.id, e.is_base, e.tensor.shape, e.tensor.dtype, e.tensor.device) for e in self.group.entries
        )
        return (self.dtype, self.out_dtype, entries)


_PENDING = object()


@contextmanager
def _recorded(method: Any, calls: list[_Call | None]) -> Iterator[None]:
    """While active, `method._execute_resolved` appends its call to `calls` instead of merging."""

    def record(groups: Sequence[TensorGroup], parameters: list, *, dtype=None, out_dtype=None, **_: Any):
        (group,), (bound,) = groups, parameters
        calls[-1] = _Call(group, bound, dtype, out_dtype)
        return (_PENDING,)

    object.__setattr__(method, "_execute_resolved", record)
    try:
        yield
    finally:
        object.__delattr__(method, "_execute_resolved")


def execute(
    tasks: Sequence[ExecuteMergeMethodTask],
    tensors: Sequence[dict[ModelReference, torch.Tensor]],
    used: Sequence[bool] | None = None,
) -> list[torch.Tensor | None]:
    """`[task.execute(tensors=t) for task, t in zip(tasks, tensors)]`, the merges of tasks with alike inputs
    done in one call per method (the tasks share `options`).

    A method that draws masks (`draws_in_batches`: DARE) draws them here first, for every task in task order
    and each task's models in mergekit's order, as mergekit's executor draws them task after task (`_masks`);
    then only the `used` tasks are merged, with those masks (the others are None: they ran for their draws)."""
    method = merge_methods.get(tasks[0].method_name)
    results: list[Any] = []
    calls: list[_Call | None] = []
    with _recorded(method, calls):
        for task, inputs in zip(tasks, tensors):
            calls.append(None)
            results.append(task.execute(tensors=inputs))
    drawn = used is not None
    masks = [_masks(call) if call is not None else [] for call in calls] if drawn else []
    batches: dict[Hashable, list[int]] = {}
    for index, call in enumerate(calls):
        if call is not None and (used is None or used[index]):
            batches.setdefault(call.signature(), []).append(index)
        elif drawn and call is not None:
            results[index] = None
    for indices in batches.values():
        merged = _merge(method, [calls[i] for i in indices], [masks[i] for i in indices] if drawn else None)
        if len(indices) > 1:
            merged = _own(merged)
        for index, tensor in zip(indices, merged):
            results[index] = tensor
    return results


def _merge(
    method: Any, calls: list[_Call], masks: list[list[torch.Tensor | None]] | None = None
) -> Sequence[torch.Tensor]:
    """The recorded calls' results: one call of the method's batch kernel (alone: mergekit's own call, except
    with drawn `masks`, which mergekit's call would draw again)."""
    first = calls[0]
    groups = [call.group for call in calls]
    parameters = [call.parameters for call in calls]
    numel = first.group.entries[0].tensor.numel()

    def alone() -> list[torch.Tensor]:
        return [
            method._execute_resolved((g,), [p], dtype=first.dtype, out_dtype=first.out_dtype)[0]
            for g, p in zip(groups, parameters)
        ]

    if masks is None and (
        len(calls) == 1
        or numel == 0
        or (isinstance(method, BatchedMergeMethod) and not _rows_alike(method, numel))
    ):
        return alone()
    if isinstance(method, BatchedMergeMethod):
        limits = BatchOptions(max_bytes=1 << 62, max_groups=len(calls))
        with _slerp_chunks(len(calls)) if method is merge_methods.get("slerp") else nullcontext():
            return method._execute_resolved(
                groups, parameters, dtype=first.dtype, out_dtype=first.out_dtype, batch_options=limits
            )
    aligned = [align_dtype(g, first.dtype or promoted_dtype(g)) for g in groups]
    shape = aligned[0].entries[0].tensor.shape
    with torch.autocast(device_type=aligned[0].entries[0].tensor.device.type, enabled=False):
        if isinstance(method, GeneralizedTaskArithmeticMerge):
            merged = _task_arithmetic(method, aligned, parameters, masks)
        else:
            merged = _multislerp(aligned, parameters)
    del aligned
    if merged is None:  # a degenerate row: mergekit's own calls, one by one
        return alone()
    if first.out_dtype is not None:
        merged = merged.to(first.out_dtype)
    return [row.reshape(shape) for row in merged.unbind(0)]


def _own(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rows of a batch, each in storage of its own: a sink may write them to one safetensors file, which
    refuses tensors that share memory."""
    return [t.clone() for t in tensors]


def _rows_alike(method: BatchedMergeMethod, numel: int) -> bool:
    """Whether mergekit's batch kernel gives each row the bits of that tensor alone: linear always; slerp
    when one tensor's whole-chunk dot product runs on one thread."""
    return (
        method is not merge_methods.get("slerp")
        or torch.get_num_threads() == 1
        or min(numel, slerp_module._CHUNK_ELEMENTS) < _GRAIN
    )


@contextmanager
def _slerp_chunks(rows: int) -> Iterator[None]:
    """While active, mergekit's slerp over `rows` tensors splits them into the columns one tensor gets."""
    chunk = slerp_module._CHUNK_ELEMENTS
    slerp_module._CHUNK_ELEMENTS = chunk * rows
    try:
        yield
    finally:
        slerp_module._CHUNK_ELEMENTS = chunk


def _rows(groups: Sequence[TensorGroup], index: int) -> torch.Tensor:
    """Entry `index` of every group, stacked as [groups, elements]."""
    return torch.stack([g.entries[index].tensor.reshape(-1) for g in groups])


def _task_arithmetic(
    method: GeneralizedTaskArithmeticMerge,
    groups: Sequence[TensorGroup],
    parameters: Sequence[dict[str, Any]],
    masks: Sequence[list[torch.Tensor | None]] | None = None,
) -> torch.Tensor:
    """mergekit's `GeneralizedTaskArithmeticMerge.merge_group` over rows: magnitude sparsification, none, or
    DARE's with the `masks` drawn for each group's non-base inputs."""
    first = groups[0]
    base_index = next(i for i, e in enumerate(first.entries) if e.is_base)
    others = [i for i in range(len(first.entries)) if i != base_index]
    base = _rows(groups, base_index)
    deltas = base.new_empty((len(others), *base.shape))
    for row, index in enumerate(others):
        delta = _rows(groups, index) - base
        if masks is not None:
            delta = _dropped(delta, [m[row] for m in masks], bool(parameters[0]["rescale"]))
        elif method.sparsification_method is not None:
            densities = [p["density"][g.entries[index].id] for g, p in zip(groups, parameters)]
            delta = _magnitude(delta, densities)
        deltas[row] = delta
        del delta
    weights = torch.tensor(
        [[p["weight"][g.entries[i].id] for g, p in zip(groups, parameters)] for i in others],
        dtype=deltas.dtype,
        device=deltas.device,
    ).unsqueeze(-1)
    return chunked.combine(method, deltas, weights, base, parameters[0])


def _masks(call: _Call) -> list[torch.Tensor | None]:
    """The masks mergekit's DARE draws for one task, in its order: for each non-base input, `sparsify.bernoulli`'s
    draw over the delta's shape and work dtype (none where the density is ≥ 1), flattened."""
    dtype = call.dtype or promoted_dtype(call.group)
    out: list[torch.Tensor | None] = []
    for entry in call.group.non_base:
        density = call.parameters["density"][entry.id]
        if density >= 1:
            out.append(None)
            continue
        tensor = entry.tensor
        work = _bernoulli_dtype(dtype, tensor.device)
        out.append(
            torch.bernoulli(torch.full(tensor.shape, density, dtype=work, device=tensor.device)).reshape(-1)
        )
    return out


def _bernoulli_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`sparsify.bernoulli`'s work dtype: the delta's, except float32 for other than bfloat16 on the CPU."""
    return dtype if device.type != "cpu" or dtype == torch.bfloat16 else torch.float32


def _dropped(delta: torch.Tensor, masks: Sequence[torch.Tensor | None], rescale: bool) -> torch.Tensor:
    """mergekit's `sparsify.bernoulli` of each row with its drawn mask (None: kept whole); with `rescale`, each
    row scaled by its l1 norm before over after the drop, each sum over one row as mergekit sums one tensor
    (`rescaled_masked_tensor`)."""
    rows = [i for i, mask in enumerate(masks) if mask is not None]
    if not rows:
        return delta
    part = delta[rows].to(_bernoulli_dtype(delta.dtype, delta.device))
    masked = part * torch.stack([masks[i] for i in rows])
    if rescale:
        for j in range(len(rows)):
            before, after = part[j].abs().sum(), masked[j].abs().sum()
            if not (before < _EPS or after < _EPS):
                masked[j] = masked[j] * (before / after)
    if len(rows) == len(masks):
        return masked.to(delta.dtype)
    delta = delta.clone()
    delta[rows] = masked.to(delta.dtype)
    return delta


def _magnitude(delta: torch.Tensor, densities: Sequence[float]) -> torch.Tensor:
    """mergekit's `sparsify.magnitude` (unscaled) of each row: the k = max(1, int(density × elements)) largest
    magnitudes kept (`_largest`; on the CPU compared in float32, as mergekit sorts them)."""
    count = delta.shape[1]
    rows = [i for i, d in enumerate(densities) if 0 < d < 1]
    if rows:
        part = delta[rows] if len(rows) < len(densities) else delta
        w = part.abs()
        if w.device.type == "cpu":
            w = w.float()
        keep = _largest(w, [max(1, int(densities[i] * count)) for i in rows])
        del w
        masked = part * keep.to(delta.dtype)
        if len(rows) == len(densities):
            return masked
        delta = delta.clone()
        delta[rows] = masked
    for i, density in enumerate(densities):
        if density <= 0:
            delta[i] = 0  # mergekit: zeros_like (never -0.0)
    return delta


def _largest(w: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Each row's `kept[i]` largest elements as mergekit's `argsort(descending=True)[:k]` picks them: those
    at least the row's k-th largest value where exactly k are (`kthvalue`, linear time: 6× faster than the
    sort at 8 K elements); in a row where the k-th value is tied (or NaN), and in rows over `_UNTIED`
    elements, the first k of the row's argsort, whose order of equal values is what one tensor's argsort
    gives."""
    count = w.shape[1]
    keep = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    tied = list(range(len(kept))) if count > _UNTIED else []
    for k in sorted(set(kept)) if count <= _UNTIED else ():
        rows = [i for i, x in enumerate(kept) if x == k]
        part = w[rows] if len(rows) < len(kept) else w
        threshold = torch.kthvalue(part, count - k + 1, dim=1, keepdim=True).values
        above = part >= threshold
        keep[rows] = above
        tied += [row for row, n in zip(rows, above.sum(dim=1).tolist()) if n != k]
    if tied:
        order = torch.argsort(w[tied], dim=1, descending=True)
        first = (
            torch.arange(count, device=w.device)
            < torch.tensor([kept[i] for i in tied], device=w.device)[:, None]
        )
        keep[tied] = torch.zeros_like(first).scatter_(1, order, first)
    return keep


def _multislerp(groups: Sequence[TensorGroup], parameters: Sequence[dict[str, Any]]) -> torch.Tensor | None:
    """mergekit's `multislerp` over rows (two or more inputs besides the base); None if a row is degenerate
    (mergekit's fallback or error) and is not a tensor no input changes."""
    first, shared = groups[0], parameters[0]
    eps = shared["eps"]
    has_base = first.base is not None
    others = [i for i, e in enumerate(first.entries) if not e.is_base]
    if len(others) < 2:
        return None
    base = _rows(groups, next(i for i, e in enumerate(first.entries) if e.is_base)) if has_base else None
    tensors = torch.stack([_rows(groups, i) for i in others], dim=1)  # [rows, inputs, elements]
    origin = base if base is not None else torch.zeros_like(tensors[:, 0])
    unchanged = (tensors == origin.unsqueeze(1)).all(dim=2).all(dim=1)  # mergekit_fixes (e): the origin
    if base is not None:
        tensors -= base.unsqueeze(1)
    weights = torch.tensor(
        [[p["weight"][g.entries[i].id] for i in others] for g, p in zip(groups, parameters)],
        dtype=tensors.dtype,
        device=tensors.device,
    )
    if shared["normalize_weights"]:
        weights = torch.stack([w / w.sum() for w in weights])  # each as mergekit sums it alone
    norms = torch.norm(tensors, dim=-1, keepdim=True)
    unit_tensors = tensors / (norms + eps)
    mean = (unit_tensors * weights.unsqueeze(-1)).sum(1)
    mean_norm = torch.norm(mean, dim=-1, keepdim=True)
    if bool(((mean_norm.squeeze(1) < eps) & ~unchanged).any()):
        return None
    mean = mean / mean_norm
    dots = (unit_tensors * mean.unsqueeze(1)).sum(-1, keepdim=True)
    tangent_vectors = unit_tensors - dots * mean.unsqueeze(1)
    tangent_result = (tangent_vectors * weights.unsqueeze(-1)).sum(1)
    tangent_norm = torch.norm(tangent_result, dim=-1, keepdim=True) + eps
    result = mean * torch.cos(tangent_norm) + tangent_result * (torch.sin(tangent_norm) / tangent_norm)
    avg_norm = (norms.squeeze(-1) * weights).sum(-1, keepdim=True)
    result = result * avg_norm
    if base is not None:
        result = result + base
    if bool(unchanged.any()):
        result[unchanged] = origin[unchanged]
    return result
