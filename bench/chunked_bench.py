"""One large TIES/DARE task three ways: mergekit on the device, mergekit on the host (the streamed path's
fallback), and evoforge's chunked merge (`evoforge.merge.memory.chunked`) on the device under a memory cap.
Prints a markdown table: seconds, peak device memory above the inputs, and whether the bits equal mergekit's.

    python bench/chunked_bench.py                                   # CUDA: a 3×Qwen2-1.5B embedding, 8 GiB cap
    python bench/chunked_bench.py --device cpu --rows 4096          # CPU smoke (no peak figures)

The inputs are a bfloat16 base of --rows × --cols and three children (base + 2 % Gaussian noise, as
`evoforge.tiny`). mergekit's own device merge runs first, uncapped (it needs ~14× one input); the chunked
merge then runs with `torch.cuda.set_per_process_memory_fraction` at --cap-gb. Every row is compared with
mergekit on the device under the same seed. TIES: equal magnitudes at the k-th value are kept in flat order
by the chunked merge, as by CUDA's stable radix sort of a large tensor (this row checks that); the CPU's
argsort orders them its own way, so on the CPU TIES rows differ where bfloat16 magnitudes tie. DARE: the
chunked merge draws mergekit's mask on the same device; with l1 rescaling (DARE's default) the scale factor
is summed otherwise (float64 over chunks; mergekit's sum in the tensor's dtype), so the column gives the
largest difference.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from mergekit.merge_methods.api import merge_tensors

from evoforge.merge.memory import chunked
from evoforge.merge.memory.merger import indexed

PARAMETERS = {
    "ties": {"weight": [0.5, 0.3, 0.9], "density": [0.3, 0.5, 0.7]},
    "dare_ties": {"weight": [0.5, 0.3, 0.9], "density": [0.3, 0.5, 0.7]},
    "task_arithmetic": {"weight": [0.5, 0.3, 0.9]},
}


def timed(run: Callable[[], torch.Tensor], device: torch.device) -> tuple[torch.Tensor, float, int | None]:
    """`run()`'s result, seconds, and (CUDA) its peak device bytes above what was allocated before."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    result = run()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) - before if cuda else None
    return result, seconds, peak


def merge(method: str, tensors: list[torch.Tensor], seed: int, chunk: int | None = None) -> torch.Tensor:
    torch.manual_seed(seed)
    if chunk is None:
        return merge_tensors(tensors, method, parameters=PARAMETERS[method], base_index=0)
    with chunked.in_chunks(method, chunk):
        return merge_tensors(tensors, method, parameters=PARAMETERS[method], base_index=0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=151936)
    parser.add_argument("--cols", type=int, default=1536)
    parser.add_argument("--cap-gb", type=float, default=8.0)
    parser.add_argument("--chunk", type=int, default=chunked.CHUNK, help="elements per chunk")
    parser.add_argument("--methods", default="ties,dare_ties,task_arithmetic")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        device = indexed(device)  # torch.cuda's memory fraction wants an index
    generator = torch.Generator().manual_seed(args.seed)
    base = torch.randn(args.rows, args.cols, generator=generator).to(torch.bfloat16)
    host = [base] + [
        (base + 0.02 * torch.randn(base.shape, generator=generator)).to(torch.bfloat16) for _ in range(3)
    ]
    tensors = [t.to(device) for t in host]
    gib = 2**30
    print(
        f"### One task over {len(tensors)} bfloat16 inputs of {args.rows}×{args.cols} "
        f"({base.numel() * 2 / gib:.3f} GiB each) on {device}, chunk {args.chunk} elements\n"
    )
    print("| method | path | s | peak GiB above inputs | same bits |\n|---|---|---|---|---|")
    for method in args.methods.split(","):
        reference, seconds, peak = timed(lambda m=method: merge(m, tensors, args.seed), device)
        print(f"| {method} | mergekit, {device.type} | {seconds:.2f} | {fmt(peak)} | reference |", flush=True)
        on_host, seconds, _ = timed(lambda m=method: merge(m, host, args.seed), torch.device("cpu"))
        print(f"| {method} | mergekit, host | {seconds:.2f} | | {compare(on_host, reference)} |", flush=True)
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * gib / total), device)
        try:
            result, seconds, peak = timed(lambda m=method: merge(m, tensors, args.seed, args.chunk), device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0, device)
        print(
            f"| {method} | chunked, {device.type}, cap {args.cap_gb} GiB | {seconds:.2f} | {fmt(peak)} | "
            f"{compare(result, reference)} |",
            flush=True,
        )
        del reference, on_host, result


def fmt(peak: int | None) -> str:
    return f"{peak / 2**30:.3f}" if peak is not None else ""


def compare(got: torch.Tensor, want: torch.Tensor) -> str:
    """ "True", or the largest absolute difference."""
    got, want = got.cpu(), want.cpu()
    if torch.equal(got, want):
        return "True"
    return f"False (max diff {float((got.float() - want.float()).abs().max()):.3g})"


if __name__ == "__main__":
    main()
