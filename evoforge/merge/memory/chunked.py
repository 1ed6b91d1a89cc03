"""mergekit's generalized task arithmetic (TIES, DARE, task arithmetic) computed over a tensor in chunks.

Under a memory cap a TIES/DARE task over a large tensor (a 3×1.5 B embedding: 233 M elements) needs ~14× one
input at once in mergekit's `GeneralizedTaskArithmeticMerge.merge_group` (stacked task vectors, an int64
argsort, sign masks, products), which does not fit an 8 GiB card. Here the same arithmetic runs over flat
chunks of `chunk` elements: device memory is the inputs, the output, (DARE) one bool mask per task vector, and
a small multiple of one chunk per task vector.

- TIES's magnitude top-k: the k-th largest |delta| of the whole tensor is found exactly by a radix select over
  the float bits (non-negative floats order as their bit patterns): 16 bits per pass, one histogram per chunk.
  Elements above it are kept, and of those equal to it the first in flat order, as many as k needs: the order
  of mergekit's `argsort(descending=True)` on CUDA, where torch sorts more than 32 elements stably (Sort.cu:
  `launch_stable_sort_kernel` above 4096). The CPU's argsort orders equal values its own way.
- DARE's random mask: mergekit draws it with `torch.bernoulli` over the whole task vector, on the tensor's
  device (`mergekit.sparsify.bernoulli`). The CPU's generator draws one number per element in flat order, so
  there chunk after chunk gives the same mask. CUDA's Philox maps elements to threads by the launch, so on a
  card the mask is drawn as mergekit draws it, over the whole task vector at once (a density tensor and the
  draws: two task vectors' worth, `working_set`), and kept as one bool per element.
- Sign consensus, weights, normalisation and lambda are elementwise over the task-vector axis: mergekit's own
  `get_mask` and the same operations, per chunk.

Equality with mergekit's method on the same inputs (tests/test_chunked_merge.py): `ties` and
`task_arithmetic` bit for bit on CUDA (on the CPU too where the k-th magnitude is not tied); DARE's masks
bit for bit with mergekit's on the same device, so DARE without rescaling too; with
`rescale` (DARE's default) the l1 norms are sums over the whole tensor accumulated chunk by chunk, so the
scale factor, and with it the output, may differ by dtype rounding. Other sparsification methods
(breadcrumbs, DELLA) are not handled (`handles`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge, get_mask
from mergekit.sparsify import SparsificationMethod

CHUNK = 1 << 23
"""Elements per chunk: 8 M (a 233 M-element embedding in 28 chunks)."""

_DIGIT = 16
"""Bits of the float pattern resolved per radix-select pass (a 65536-bin histogram)."""

WORKSPACE_PER_VECTOR = 16
"""Bytes per chunk element and task vector that a chunk's arithmetic holds at most on the CPU (measured by
tests/test_chunked_merge.py: 14.3 with float32 inputs, 11 with bfloat16, three task vectors)."""

Chunks = Callable[[], Iterator[tuple[int, torch.Tensor]]]
"""A task vector's chunks, each with its flat start index, computed afresh on each call."""


def handles(method_name: str) -> bool:
    """Whether mergekit's method `method_name` can be computed in chunks here."""
    method = merge_methods.get(method_name)
    return isinstance(method, GeneralizedTaskArithmeticMerge) and method.sparsification_method in (
        None,
        SparsificationMethod.magnitude,
        SparsificationMethod.random,
    )


def working_set(method_name: str, input_bytes: int, inputs: int, chunk: int = CHUNK) -> int:
    """Device bytes a chunked task of `method_name` over `inputs` equal-shaped tensors of `input_bytes` in all
    holds at most on a card: the inputs, the output and DARE's bool masks (together at most the inputs), DARE's
    draw of one whole task vector (its density tensor and draws, each one input's size), and the chunk's
    arithmetic (twice the CPU's figure: the CUDA caching allocator rounds blocks up and kernels take scratch
    space)."""
    draw = 2 * input_bytes // inputs if _draws_masks(method_name) else 0
    return 2 * input_bytes + draw + 2 * WORKSPACE_PER_VECTOR * chunk * inputs


def _draws_masks(method_name: str) -> bool:
    method = merge_methods.get(method_name)
    return getattr(method, "sparsification_method", None) == SparsificationMethod.random


@contextmanager
def in_chunks(method_name: str, chunk: int = CHUNK) -> Iterator[None]:
    """While active, mergekit's `method_name` merges each tensor group through `merge_group` in chunks (its
    dtype handling, optional-tensor policies and parameter binding stay mergekit's)."""
    method = merge_methods.get(method_name)
    object.__setattr__(method, "merge_group", partial(merge_group, method, chunk=chunk))
    try:
        yield
    finally:
        object.__delattr__(method, "merge_group")


@dataclass
class _Sparsifier:
    """One task vector's sparsification, applied chunk by chunk in flat order."""

    density: float
    method: SparsificationMethod | None
    threshold: int = -1
    """Magnitude: the bit pattern of the k-th largest |delta|; `quota` elements equal to it are kept."""
    quota: int = 0
    mask: torch.Tensor | None = None
    """Random: the whole tensor's Bernoulli draws (bool, on the device)."""
    work: torch.dtype | None = None
    scale: torch.Tensor | None = None
    """l1 rescaling factor, None when mergekit leaves the masked vector unscaled."""
    seen: int = field(default=0, repr=False)

    def passes(self) -> bool:
        """Whether this task vector is kept whole (mergekit returns it unchanged)."""
        return self.method is None or self.density >= 1

    def apply(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """The sparsified, rescaled chunk of the task vector starting at flat index `start`."""
        if self.passes():
            return delta
        masked = self.masked(delta, start)
        return (masked * self.scale if self.scale is not None else masked).to(delta.dtype)

    def masked(self, delta: torch.Tensor, start: int) -> torch.Tensor:
        """The chunk masked, in the working dtype, unscaled (chunks in flat order, each once)."""
        if self.method == SparsificationMethod.magnitude:
            if self.density <= 0:
                return torch.zeros_like(delta)
            return delta * self._top_k(delta).to(delta.dtype)
        mask = self.mask[start : start + delta.numel()]
        return delta.to(self.work) * mask.to(self.work)

    def _top_k(self, delta: torch.Tensor) -> torch.Tensor:
        """Elements above the threshold, and the next `quota` equal to it in flat order (calls in order)."""
        bits = _magnitude_bits(delta)
        keep = bits > self.threshold
        remaining = self.quota - self.seen
        if remaining:
            equal = bits == self.threshold
            keep |= equal & (equal.cumsum(0) <= remaining)
            self.seen += min(int(equal.sum()), remaining)
        return keep

    def reset(self) -> None:
        """Back to the first chunk (after a pass that applied the mask, before the merge pass)."""
        self.seen = 0


def merge_group(
    method: GeneralizedTaskArithmeticMerge, group: TensorGroup, /, chunk: int = CHUNK, **parameters: Any
) -> torch.Tensor:
    """`method.merge_group(group, **parameters)`, computed over flat chunks of `chunk` elements."""
    base = group.base.tensor
    entries = group.non_base
    if not entries:
        return base
    flat = base.reshape(-1)
    inputs = [entry.tensor.reshape(-1) for entry in entries]
    spans = [(start, min(start + chunk, flat.numel())) for start in range(0, flat.numel(), chunk)]

    def deltas(index: int) -> Iterator[tuple[int, torch.Tensor]]:
        for start, end in spans:
            yield start, inputs[index][start:end] - flat[start:end]

    sparsifiers = []
    for index, entry in enumerate(entries):
        sparsifier = _Sparsifier(parameters["density"][entry.id], method.sparsification_method)
        _prepare(sparsifier, partial(deltas, index), flat.numel(), parameters["rescale"])
        sparsifiers.append(sparsifier)

    weights = torch.tensor(
        [parameters["weight"][entry.id] for entry in entries], dtype=base.dtype, device=base.device
    ).unsqueeze(-1)
    out = torch.empty_like(flat)
    for start, end in spans:
        rows = base.new_empty((len(entries), end - start))
        for index, sparsifier in enumerate(sparsifiers):
            rows[index] = sparsifier.apply(inputs[index][start:end] - flat[start:end], start)
        out[start:end] = combine(method, rows, weights, flat[start:end], parameters)
        del rows
    return out.reshape(base.shape)


def _prepare(sparsifier: _Sparsifier, deltas: Chunks, numel: int, rescale: bool) -> None:
    """What applying the sparsification chunk by chunk needs from the whole task vector: the magnitude
    threshold, DARE's mask (drawn now, in mergekit's order: one task vector after the other), the l1 scale."""
    if sparsifier.passes():
        return
    if sparsifier.method == SparsificationMethod.magnitude:
        if sparsifier.density <= 0 or numel == 0:
            sparsifier.density = 0.0  # mergekit: zeros, unscaled
            return
        k = max(1, int(sparsifier.density * numel))
        sparsifier.threshold, greater = _kth_largest(deltas, k)
        sparsifier.quota = k - greater
        work = None
    else:
        first = next(deltas())[1]
        dtype, device = first.dtype, first.device
        # mergekit.sparsify.bernoulli's working dtype: the tensor's, but float32 for float16 on the CPU
        work = dtype if device.type != "cpu" or dtype == torch.bfloat16 else torch.float32
        sparsifier.work = work
        if device.type == "cpu":
            sparsifier.mask = torch.empty(numel, dtype=torch.bool)
            for start, delta in deltas():
                draws = torch.bernoulli(torch.full((delta.numel(),), sparsifier.density, dtype=work))
                sparsifier.mask[start : start + delta.numel()] = draws
        else:
            density = torch.full((numel,), sparsifier.density, dtype=work, device=device)
            sparsifier.mask = torch.bernoulli(density).to(torch.bool)
            del density
    if rescale:
        sparsifier.scale = _l1_scale(sparsifier, deltas, work)
        sparsifier.reset()


def _l1_scale(sparsifier: _Sparsifier, deltas: Chunks, work: torch.dtype | None) -> torch.Tensor | None:
    """mergekit's `rescaled_masked_tensor` factor for l1: |delta|₁ / |masked|₁ in the working dtype, None
    (unscaled) when either is below 1e-7; the sums are accumulated over chunks in float64."""
    before = after = 0.0
    for start, delta in deltas():
        delta = delta.to(work) if work is not None else delta
        before += float(delta.abs().sum(dtype=torch.float64))
        after += float(sparsifier.masked(delta, start).abs().sum(dtype=torch.float64))
    before_t, after_t = (torch.tensor(v, dtype=delta.dtype, device=delta.device) for v in (before, after))
    if before_t < 1e-7 or after_t < 1e-7:
        return None
    return before_t / after_t


def _magnitude_bits(tensor: torch.Tensor) -> torch.Tensor:
    """|tensor|'s float bit patterns as non-negative integers, ordered as the magnitudes (NaN above inf, as
    sort has it): int32 for 16- and 32-bit floats, int64 for float64."""
    size = tensor.element_size()
    bits = tensor.abs().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    return bits.to(torch.int32) & 0xFFFF if size == 2 else bits


def _kth_largest(deltas: Chunks, k: int) -> tuple[int, int]:
    """The bit pattern of the k-th largest magnitude over all chunks, and how many elements are above it:
    a radix select, `_DIGIT` bits per pass from the top, one histogram over the chunks per pass."""
    width = next(deltas())[1].element_size() * 8
    prefix, greater = 0, 0
    for shift in range(width - _DIGIT, -1, -_DIGIT):
        histogram = None
        for _, delta in deltas():
            bits = _magnitude_bits(delta)
            if shift + _DIGIT < width:
                bits = bits[(bits >> (shift + _DIGIT)) == prefix]
            counts = torch.bincount((bits >> shift) & ((1 << _DIGIT) - 1), minlength=1 << _DIGIT)
            histogram = counts if histogram is None else histogram + counts
        at_least = histogram.flip(0).cumsum(0)  # at_least[j]: elements whose digit is >= last - j
        j = int(torch.searchsorted(at_least, k - greater))
        digit = (1 << _DIGIT) - 1 - j
        greater += int(at_least[j] - histogram[digit])
        prefix = (prefix << _DIGIT) | digit
    return prefix, greater


def combine(
    method: GeneralizedTaskArithmeticMerge,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    base: torch.Tensor,
    parameters: dict[str, Any],
) -> torch.Tensor:
    """mergekit's `merge_group` after sparsification: weighted task vectors (`deltas`, [models, ...]), sign
    consensus, normalisation and λ, added to `base`. Every step is per element, so it serves a chunk of one
    tensor (here) and a stack of same-shaped tensors (`batched`) alike."""
    deltas.mul_(weights)
    if method.consensus_method:
        mask_dtype = torch.int8 if parameters["int8_mask"] else base.dtype
        mask = get_mask(deltas, method=method.consensus_method, mask_dtype=mask_dtype)
        mixed_delta = (deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if parameters["normalize"]:
        mixed_delta /= divisor
    if parameters["lambda"] != 1:
        mixed_delta *= parameters["lambda"]
    return (base + mixed_delta).to(base.dtype)
