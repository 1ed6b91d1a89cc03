"""Section A of bench/merge_bench.py: each recipe merged once through each path (mergekit's run_merge to disk,
mergekit's in-memory planner, evoforge's MemoryMerger, then MemoryMerger again with the recipe's structures
planned), timed, and the results compared bit for bit."""

from __future__ import annotations

import shutil
import statistics
import sys
from graphlib import TopologicalSorter
from pathlib import Path

import mergekit.merge
import torch
import yaml
from merge_bench_common import ROOT, Clock, free_memory, gib
from merge_bench_family import NAMES
from mergekit.architecture import get_architecture_info
from mergekit.graph import Executor
from mergekit.scripts.multimerge import load_config
from safetensors.torch import load_file
from transformers.trainer_utils import set_seed

from evoforge.merge import mergekit_fixes
from evoforge.merge.disk import merge_options, merge_recipe, validate_recipe
from evoforge.merge.memory import STAGE_DIR, InMemoryLoader, MemoryMerger, models_in_memory
from evoforge.recipe import random_seed

sys.path.insert(0, str(ROOT / "tests"))
from mergekit_support import plan_in_memory  # mergekit's in-memory planner, with its workaround

# ---------------------------------------------------------------------------------------------- the paths


def planner_merge(recipe: str, seed: int | None, device: str) -> dict[str, torch.Tensor]:
    """mergekit's in-memory planner, stage by stage: `plan_in_memory` + `Executor` as run_merge runs them
    (seeded per stage), base models read by mergekit's loaders, each stage's output kept in memory and
    served to later stages through `models_in_memory`."""
    options = merge_options(device, seed)
    configs, dependencies = load_config(
        yaml.safe_dump_all(validate_recipe(recipe), sort_keys=False), STAGE_DIR
    )
    model_configs: dict = {}
    loaders: dict = {}
    with mergekit_fixes.applied(), models_in_memory(model_configs, loaders):
        for name in TopologicalSorter(dependencies).static_order():
            config = configs[name]
            if seed is not None:
                set_seed(seed)
            arch_info = get_architecture_info(config, options)
            out_config = mergekit.merge._model_out_config(config, arch_info, options.trust_remote_code)
            executor = Executor(
                plan_in_memory(config, options),
                math_device=options.device,
                storage_device=options.device if options.low_cpu_memory else "cpu",
            )
            outputs = {task.weight_info.name: value for task, value in executor.run(quiet=True)}
            model_configs[f"{STAGE_DIR}/{name}"] = out_config
            loaders[f"{STAGE_DIR}/{name}"] = InMemoryLoader(outputs)
    return {k: v for k, v in outputs.items() if v is not None}


def load_folder(folder: Path, device: torch.device) -> dict[str, torch.Tensor]:
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file, device=str(device)))
    return state


def fingerprint(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """An exact, position-sensitive digest of each tensor's bits (integer sums: no rounding)."""
    out = {}
    for name, tensor in state.items():
        bits = tensor.detach().contiguous().flatten()
        bits = bits.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()]).long()
        index = torch.arange(1, bits.numel() + 1, device=bits.device)
        out[name] = (int(bits.sum()), int((bits * index).sum()))
    return out


# ---------------------------------------------------------------------------------------------- sections


def run_path(
    path: str, text: str, seed: int | None, merger: MemoryMerger, device: torch.device, work: Path
) -> dict[str, torch.Tensor] | None:
    """One merge through one path (memory or "again": `MemoryMerger.merge`): the state dict, or None for the
    disk path (its folder is work/out)."""
    if path == "disk":
        merge_recipe(text, work / "out", device=str(device), random_seed=seed)
        return None
    if path == "planner":
        return planner_merge(text, seed, str(device))
    return merger.merge(text, seed)[0]


def section_latency(
    recipes: dict[str, str], family: dict[str, Path], device: torch.device, work: Path, keep: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Section A; returns the memory path's output (on the CPU) of the first `keep` recipes."""
    cuda = device.type == "cuda"
    clock = Clock(device)
    with clock():
        merger = MemoryMerger([family[n] for n in (*NAMES, "ancestor")], device=str(device))
    print(
        f"\n### A. Merge latency per recipe ({device.type})\n\nmemory path residents: "
        f"{gib(merger.resident_bytes)} GiB, loaded once in {clock.seconds:.2f} s (streamed: {merger.stream})\n"
    )
    head = "| recipe | disk s | planner s | memory s | memory s, again | disk/memory | planner/memory | same bits |"
    if cuda:
        head += " GiB added at peak: disk / planner / memory |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    # "again": the memory path a second time, its stage structures planned, as for most of a run's candidates
    runs: dict[str, list[float]] = {"disk": [], "planner": [], "memory": [], "again": []}
    kept: dict[str, dict[str, torch.Tensor]] = {}
    label0 = next(iter(recipes))
    merger.merge(recipes[label0], random_seed(recipes[label0]))  # warm-up: imports, scheduler cache
    planner_merge(recipes[label0], random_seed(recipes[label0]), str(device))
    for label, text in recipes.items():
        seed, times, peaks, prints = random_seed(text), {}, {}, {}
        for path in runs:
            with clock():
                state = run_path(path, text, seed, merger, device, work)
            times[path], peaks[path] = clock.seconds, clock.added
            if state is None:
                state = load_folder(work / "out", device)
            prints[path] = fingerprint(state)
            if path == "memory" and len(kept) < keep:
                kept[label] = {name: tensor.cpu() for name, tensor in state.items()}
            del state
            free_memory()
            runs[path].append(times[path])
        same = prints["disk"] == prints["planner"] == prints["memory"] == prints["again"]
        row = (
            f"| {label} | {times['disk']:.3f} | {times['planner']:.3f} | {times['memory']:.3f} | "
            f"{times['again']:.3f} | {times['disk'] / times['memory']:.1f}× | "
            f"{times['planner'] / times['memory']:.1f}× | {same} |"
        )
        if cuda:
            row += f" {gib(peaks['disk'])} / {gib(peaks['planner'])} / {gib(peaks['memory'])} |"
        print(row, flush=True)
    mean = {k: statistics.fmean(v) for k, v in runs.items()}
    print(
        f"| **mean** | {mean['disk']:.3f} | {mean['planner']:.3f} | {mean['memory']:.3f} | {mean['again']:.3f} | "
        f"{mean['disk'] / mean['memory']:.1f}× | {mean['planner'] / mean['memory']:.1f}× | |",
        flush=True,
    )
    shutil.rmtree(work / "out", ignore_errors=True)
    del merger
    free_memory()
    return kept
