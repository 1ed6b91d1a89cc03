"""Sections B and C of bench/merge_bench.py: one generation of the real loop per merge path (B), and the memory
loop with the GPU capped so that the base models stream from pinned host memory (C), its merges compared with
section A's. Both run the loop through the same config, recorder and generation."""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from merge_bench_common import ROOT, Clock, cuda_residue, free_memory, gib, log, oom
from merge_bench_family import NAMES

from evoforge.config import EvolutionConfig
from evoforge.evolve import strategies
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.loop import Evolution, Hooks
from evoforge.evolve.run_dir import RunDir
from evoforge.genome import GenomeSpace
from evoforge.recipe import random_seed

sys.path.insert(0, str(ROOT / "tests"))
from evolution_support import TASKS, write_mc_tasks  # the test suite's multiple-choice tasks


def run_config(
    family: dict[str, Path],
    args: argparse.Namespace,
    out: Path,
    merge_path: str,
    batch_size: int | None = None,
    compile_generation: bool | None = None,
) -> EvolutionConfig:
    if args.tasks == "mc":
        tasks, weights = write_mc_tasks(out.parent / "mc_tasks"), dict.fromkeys(TASKS.values(), 0.5)
    else:
        tasks, weights = ROOT / "tasks", None
    return EvolutionConfig.model_validate(
        {
            "name": f"bench-{merge_path}",
            "base_models": [{"name": n, "path": str(family[n])} for n in NAMES],
            "dtype": args.dtype,
            "device": args.device,
            "merge_path": "disk" if merge_path == "disk" else "memory",
            "overlap_merges": merge_path == "overlap",
            "evaluation": {
                "tasks_dir": str(tasks),
                "batch_size": batch_size or args.batch_size,
                "limit": args.limit,
                "compile_generation": args.static_cache if compile_generation is None else compile_generation,
                "fitness_metric": args.fitness_metric,
            },
            "output_dir": str(out),
            "wandb_mode": "disabled",
            **({"evaluation_weights": weights} if weights else {}),
        }
    )


class Recorder:
    """Wraps a CandidateEvaluator for the loop and keeps each candidate's (merge s, eval s, fitness)."""

    def __init__(self, evaluator: CandidateEvaluator) -> None:
        self.evaluator, self.rows, self.errors = evaluator, [], []
        self.overlap = evaluator.overlap  # the local executor then passes the next candidate (`then`)

    def score_recipe(self, recipe: str, seed: int, split: str, **then):
        try:
            scores, merge_s, eval_s = self.evaluator.score_recipe(recipe, seed, split, **then)
        except Exception as error:
            self.errors.append(f"{type(error).__name__}: {oom(error)}")
            raise
        self.rows.append((split, merge_s, eval_s, scores.fitness))
        log(f"  {split}: merge {merge_s:.2f} s, eval {eval_s:.2f} s, fitness {scores.fitness:.4f}")
        return scores, merge_s, eval_s


def one_generation(cfg: EvolutionConfig, space: GenomeSpace, evaluator: CandidateEvaluator) -> dict:
    """Generation 0 of the real loop; a new best is written as `evoforge run` writes it (`evaluator.merge`)."""
    run_dir = RunDir(cfg.run_dir())
    recorder = Recorder(evaluator)
    best_s = []

    def on_new_best(gen, member, outcome, recipe):
        start = time.perf_counter()
        try:
            evaluator.merge(recipe, member.genome.crossover.seed, run_dir.root / "best")
        except torch.OutOfMemoryError as error:
            recorder.errors.append(f"best model: out of memory: {str(error).splitlines()[0][:100]}")
            free_memory()
        best_s.append(time.perf_counter() - start)
        log(f"  best model written in {best_s[-1]:.2f} s")

    evolution = Evolution(cfg, space, run_dir, recorder, Hooks(on_new_best=on_new_best))
    state = evolution.initial_state()
    strategy = strategies.make(cfg, space, state.rng())  # as `Evolution.run` makes it
    strategy.load_state_dict(state.strategy)
    try:
        record, _ = evolution.run_generation(state, strategy)
    finally:
        evolution.drop_ahead()
    fit = [r for r in recorder.rows if r[0] == cfg.evaluation.fitness_split]
    return {
        "rows": fit,
        "all": recorder.rows,
        "errors": recorder.errors,
        "wall": record.wall_s,
        "best_s": sum(best_s),
    }


def section_loops(
    family: dict[str, Path],
    args: argparse.Namespace,
    device: torch.device,
    work: Path,
    title: str = "B. One generation of the loop",
    capped: bool = False,
) -> None:
    """Section B (with `capped`: section C's generation under the cap, batch --capped-batch, no static cache)."""
    results = {}
    for merge_path in args.loops:
        out = work / f"loop-{merge_path}"
        cfg = (
            run_config(family, args, out, merge_path, args.capped_batch, compile_generation=False)
            if capped
            else run_config(family, args, out, merge_path)
        )
        space = GenomeSpace.from_config(cfg)
        clock = Clock(device)
        with clock():
            evaluator = CandidateEvaluator(cfg, space.paths[0], RunDir(cfg.run_dir()).work)
        evaluator.score_model(space.paths[0], cfg.evaluation.fitness_split)  # warm-up: tasks, wrapper
        log(f"loop {merge_path}: set up in {clock.seconds:.1f} s; one generation ...")
        log(f"before the generation: {cuda_residue()}")
        before = Counter(evaluator.memory.placements) if evaluator.memory else Counter()
        with clock():
            results[merge_path] = one_generation(cfg, space, evaluator)
        results[merge_path]["peak"] = clock.peak
        if evaluator.memory:
            results[merge_path]["placed"] = evaluator.memory.placements - before
        del evaluator
        free_memory()
        shutil.rmtree(work / f"loop-{merge_path}", ignore_errors=True)
    print(
        f"\n### {title} (8 candidates; tasks: {args.tasks}, limit {args.limit}, fitness: {args.fitness_metric})\n"
    )
    head = (
        "| loop | scored | merge s / candidate | eval s / candidate | candidate s | generation s "
        "| best model written s |"
    )
    cuda = device.type == "cuda"
    if cuda:
        head += " peak GiB |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    per = {}
    for merge_path, r in results.items():
        if not r["rows"]:
            print(f"| {merge_path} | 0 | | | | {r['wall']:.2f} | {r['best_s']:.2f} |")
            continue
        merge_s = statistics.fmean(x[1] for x in r["rows"])
        eval_s = statistics.fmean(x[2] for x in r["rows"])
        per[merge_path] = (merge_s, eval_s, r["wall"])
        row = (
            f"| {merge_path} | {len(r['rows'])} | {merge_s:.3f} | {eval_s:.3f} | {merge_s + eval_s:.3f} | "
            f"{r['wall']:.2f} | {r['best_s']:.2f} |"
        )
        print(row + (f" {gib(r['peak'])} |" if cuda else ""))
    for merge_path, r in results.items():
        for error in r["errors"]:
            print(f"- {merge_path} loop, failed: {error}")
        if capped and "placed" in r:
            print(f"- {merge_path} loop, merge tasks off the card (host / chunked): {off_card(r['placed'])}")
    if "memory" in per and "disk" in per:
        (dm, de, dw), (mm, me, mw) = per["disk"], per["memory"]
        print(
            f"\nspeed-up memory vs disk: merge {dm / mm:.1f}×, candidate (merge + eval) "
            f"{(dm + de) / (mm + me):.1f}×, generation {dw / mw:.1f}×"
        )
    if "memory" in per and "overlap" in per:
        print(f"\nspeed-up overlap vs memory: generation {per['memory'][2] / per['overlap'][2]:.2f}×")
    for other in ("disk", "overlap"):
        if "memory" in per and other in per:
            same = [a[3] for a in results["memory"]["all"]] == [b[3] for b in results[other]["all"]]
            print(f"same fitness for every candidate on the memory and {other} loops: {same}", flush=True)


def off_card(placed: Counter[tuple[str, str]]) -> str:
    """`MemoryMerger.placements` counts as "host / chunked", each with its methods: "0 / 3 (ties 2, dare_ties 1)"."""
    parts = []
    for where in ("host", "chunked"):
        methods = {m: n for (w, m), n in sorted(placed.items()) if w == where}
        detail = ", ".join(f"{m} {n}" for m, n in methods.items())
        parts.append(str(sum(methods.values())) + (f" ({detail})" if detail else ""))
    return " / ".join(parts)


class Compare:
    """A merge sink that compares each tensor with an expected CPU copy and keeps nothing."""

    def __init__(self, expected: dict[str, torch.Tensor]) -> None:
        self.expected, self.seen, self.same = expected, set(), True

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.seen.add(name)
        self.same &= name in self.expected and torch.equal(tensor.cpu(), self.expected[name])

    def close(self) -> None:
        self.same &= self.seen == self.expected.keys()


def section_capped(
    family: dict[str, Path], args: argparse.Namespace, work: Path, recipes: dict[str, str], kept: dict
) -> None:
    """Section C: the memory loop with the GPU capped; merged weights compared with section A's."""
    free_memory()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 2**30 / total))
    torch.cuda.reset_peak_memory_stats()
    print(f"\n### C. Memory loop capped at {args.cap_gb} GiB (`set_per_process_memory_fraction`)\n")
    try:
        cfg = run_config(
            family,
            args,
            work / "loop-capped",
            "memory",
            batch_size=args.capped_batch,
            compile_generation=False,
        )
        evaluator = CandidateEvaluator(cfg, str(family[NAMES[0]]), RunDir(cfg.run_dir()).work)
        merger = evaluator.memory
        print(f"residents streamed from pinned host memory: {merger.stream}\n")
        if kept:
            print(
                "| recipe | merge s | merge peak GiB | same tensors as uncapped | tasks off the card: host / chunked "
                "| merge + load s | eval s | fitness |\n|---|---|---|---|---|---|---|---|"
            )
            for label, expected in kept.items():
                text, clock, compare = recipes[label], Clock(torch.device("cuda")), Compare(expected)
                log(f"capped, before {label}: {cuda_residue()}")
                try:
                    before = Counter(merger.placements)
                    with evaluator.scorer.on_host(), clock():  # as score_recipe merges when streaming
                        merger.merge(text, random_seed(text), into=lambda _config, c=compare: c)
                    placed = merger.placements - before
                    scores, merge_s, eval_s = evaluator.score_recipe(
                        text, random_seed(text) or 0, cfg.evaluation.fitness_split
                    )
                except torch.OutOfMemoryError as error:
                    print(
                        f"| {label} | out of memory: {oom(error)} | | | | | | |",
                        flush=True,
                    )
                    free_memory()
                    continue
                print(
                    f"| {label} | {clock.seconds:.3f} | {gib(clock.peak)} | {compare.same} | {off_card(placed)} | "
                    f"{merge_s:.3f} | {eval_s:.3f} | {scores.fitness:.4f} |",
                    flush=True,
                )
            print(
                f"\npeak GPU memory allocated: {gib(torch.cuda.max_memory_allocated())} GiB (cap {args.cap_gb} GiB)"
            )
        del evaluator, merger
        free_memory()
        if args.capped_loops:
            section_loops(
                family, args, torch.device("cuda"), work, f"C. Generation capped at {args.cap_gb} GiB", True
            )
    except torch.OutOfMemoryError as error:
        print(f"out of memory: {oom(error)}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
