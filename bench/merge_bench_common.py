"""What every part of bench/merge_bench.py uses: the repository root, progress on stderr, a clock that also
reads CUDA memory peaks, GiB formatting, freeing memory, one-line errors, and what the process holds on the GPU.
A module of its own so that each section's module (latency, loops, eval) stays small and imports only these."""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Clock:
    """Wall time, and on CUDA the peak memory allocated during a block (`peak`) and how much of it the block
    added to what was allocated when it started (`added`); CUDA work is waited for at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.peak = self.added = 0

    @contextmanager
    def __call__(self) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
            start_mem = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.added = self.peak - start_mem
        self.seconds = time.perf_counter() - start


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def oom(error: BaseException) -> str:
    """An error's first line and its notes (evoforge notes which tensor a merge ran out of memory on)."""
    return " ".join([str(error).splitlines()[0], *getattr(error, "__notes__", ())])


def cuda_residue(top: int = 4) -> str:
    """What this process holds on the GPU now: allocated and reserved GiB, and the largest live CUDA tensors
    the garbage collector can see, with the types of what refers to them."""
    if not torch.cuda.is_available():
        return "no CUDA"
    gc.collect()
    tensors = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                tensors[id(obj)] = obj
        except Exception:  # objects that fail isinstance checks (lazy proxies)
            continue
    largest = sorted(tensors.values(), key=lambda t: -t.numel() * t.element_size())[:top]
    held = sum(
        t.untyped_storage().nbytes()
        for t in {t.untyped_storage().data_ptr(): t for t in tensors.values()}.values()
    )
    parts = [
        f"{tuple(t.shape)} {str(t.dtype)[6:]} <- {sorted({type(r).__name__ for r in gc.get_referrers(t)} - {'list', 'frame'})}"
        for t in largest
    ]
    return (
        f"allocated {gib(torch.cuda.memory_allocated())} GiB, reserved {gib(torch.cuda.memory_reserved())} GiB, "
        f"{len(tensors)} live CUDA tensors ({gib(held)} GiB); largest: {'; '.join(parts) or 'none'}"
    )
