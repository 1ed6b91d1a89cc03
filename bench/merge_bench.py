"""Merge latency and loop time: evoforge's memory path vs mergekit run_merge (disk) vs mergekit's in-memory
planner, on the same recipes in one process. Prints markdown tables to stdout (progress goes to stderr).

    python bench/merge_bench.py --scale tiny                    # CPU smoke: tiny Qwen2 family, < 2 min
    python bench/merge_bench.py --scale tiny-28                 # the same at Qwen2-1.5B's depth (28 layers)
    python bench/merge_bench.py --scale mid-8                   # CPU: 8 layers at hidden 256
    python bench/merge_bench.py --scale qwen2-1.5b              # GPU: builds 4 random Qwen2-1.5B-shaped models

Sections
  A. Merge latency per recipe: disk (`merge_recipe`: mergekit run_merge per stage, to a folder), planner
     (mergekit's MergePlanner + Executor in memory per stage, the `plan_in_memory` workaround; base models
     read by mergekit's loaders, stage outputs kept in memory), memory (`MemoryMerger.merge`, residents
     loaded once; a recipe's first merge plans its stage structures, "again" merges it a second time, as
     most of a run's candidates are merged: cmaes/random samples and two mutants in three keep their
     parent's structures). Each path's result is fingerprinted (exact, bitwise) and compared. On CUDA: the peak GPU
     memory each call adds above what was allocated when it started (`max_memory_allocated`).
  B. One generation of the real loop (`Evolution.run_generation`, population = the 8 seeds, best model
     written as `evoforge run` writes it: from memory on the memory path, `evoforge.merge.save`, through
     mergekit's run_merge on the disk path) with `merge_path: memory` and `disk`: per-candidate merge and
     evaluation seconds, generation wall time; both loops must score alike. `--loops overlap` adds the
     memory path with `overlap_merges` (the next candidate merged while this one is scored).
  E. Evaluation throughput on one model (the first child): lm-eval's HFLM (each task's requests decoded in
     their own batches) vs evoforge's Scorer (PooledHFLM on CUDA: every task's requests together), same
     task objects and items; per-candidate wall time (first call and warm median), generation's share,
     fitness, and how many texts equal lm-eval's at --batch-size. lm-eval's HFLM again at --control-batch
     shows how much batch shape alone moves greedy texts in this dtype. With --static-cache, also
     PooledHFLM with transformers' static KV cache (which transformers compiles on CUDA).
  C. (CUDA) The memory loop under `torch.cuda.set_per_process_memory_fraction` (--cap-gb, 8 by default):
     the base models do not fit, so they stay in pinned host memory and stream. The streamed merges must
     equal section A's resident ones bit for bit; candidates are then scored (batch --capped-batch). With
     --capped-loops, also section B's generation (each of --loops) under the cap. What the process holds on
     the GPU before each merge and generation is logged to stderr.

The qwen2-1.5b models: hidden 1536, 28 layers, 12/2 heads, FFN 8960, vocab 151936, tied embeddings, bf16;
an ancestor and three children (ancestor + 2 % Gaussian noise per tensor, like `evoforge.tiny`), 12.4 GB
on disk under --work (kept and reused when --work is given). Expect several minutes on one GPU, most of it
the disk loop's generation; --recipes 2 and --limit 8 shorten the run. Tasks: --tasks real (evoforge's
tasks/, the GPU default) or mc (the tests' two multiple-choice tasks, the CPU default). --tokenizer gives the
random models a real tokenizer folder (e.g. Qwen2's: prompts then have realistic token counts; the default
byte-level tokenizer makes them 2.5-3.5× longer). --sections picks sections (default: all that apply).

--run-file RUN.yaml merges a run file's three base models with its ancestor instead of a built family: real
weights, e.g. recipes/qwen2-1.5b.yaml once `evoforge demo prepare --trio qwen2-1.5b` has built its trio (real
models stop generating where random ones decode the whole budget); its dtype, the GPU defaults on CUDA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from merge_bench_common import log
from merge_bench_eval import section_eval
from merge_bench_family import NAMES, QWEN2_1_5B, TINY, bench_recipes, build_family
from merge_bench_latency import section_latency
from merge_bench_loops import section_capped, section_loops

from evoforge.config import EvolutionConfig, load_config
from evoforge.genome import GenomeSpace
from evoforge.merge.memory import batched
from evoforge.models import locate_model
from evoforge.quiet import quiet_libraries


def run_file_family(cfg: EvolutionConfig) -> tuple[dict[str, Path], int]:
    """The run file's three base models (as the bench's alpha, beta, gamma) and ancestor, and their depth."""
    if len(cfg.base_models) != len(NAMES) or cfg.ancestor is None:
        raise SystemExit(f"error: --run-file needs {len(NAMES)} base models and an ancestor")
    family = {"ancestor": locate_model(cfg.resolve(cfg.ancestor))}
    family |= {name: locate_model(cfg.resolve(m)) for name, m in zip(NAMES, cfg.base_models, strict=True)}
    config = json.loads((family["ancestor"] / "config.json").read_text())
    return family, config["num_hidden_layers"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=(*TINY, "qwen2-1.5b"), default="tiny")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--recipes", type=int, default=None, help="seed recipes in section A (default 8 tiny, 3 GPU)"
    )
    parser.add_argument(
        "--tasks", choices=("mc", "real"), default=None, help="mc: the tests' 2-task suite; real: tasks/"
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="documents per task (default: mc all, real 16)"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cap-gb", type=float, default=8.0)
    parser.add_argument("--capped", type=int, default=2, help="recipes merged and scored in the capped run")
    parser.add_argument("--capped-batch", type=int, default=8, help="evaluation batch size in the capped run")
    parser.add_argument(
        "--capped-loops", action="store_true", help="section C: also one generation per --loops under the cap"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--no-batch",
        action="store_true",
        help="memory path: every merge task alone (evoforge.merge.memory.batched.ENABLED off)",
    )
    parser.add_argument(
        "--sections", default="ABEC", help="sections to run, e.g. AE (C compares recipes only after A)"
    )
    parser.add_argument(
        "--loops",
        default="memory,disk",
        help="section B's loops, comma-separated: memory, disk, overlap (memory, next merge while scoring)",
    )
    parser.add_argument(
        "--control-batch",
        type=int,
        default=8,
        help="section E: lm-eval's HFLM again at this batch size (0: not)",
    )
    parser.add_argument("--eval-reps", type=int, default=3, help="warm calls per wrapper in section E")
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="section E: also a static-cache variant; B: evaluation.compile_generation",
    )
    parser.add_argument(
        "--fitness-metric",
        choices=("accuracy", "likelihood"),
        default="accuracy",
        help="sections B and C: evaluation.fitness_metric (the shipped run files' is likelihood)",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for the 1.5 B models")
    parser.add_argument(
        "--run-file", type=Path, default=None, help="merge this run file's base models and ancestor instead"
    )
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for models and runs (default: temporary)"
    )
    args = parser.parse_args()
    run_cfg = load_config(args.run_file) if args.run_file else None
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = args.scale not in TINY or (run_cfg is not None and args.device != "cpu")
    args.recipes = args.recipes or (3 if gpu else 8)
    args.tasks = args.tasks or ("real" if gpu else "mc")
    args.limit = args.limit or (16 if args.tasks == "real" else None)
    args.dtype = run_cfg.dtype if run_cfg else "bfloat16" if gpu else "float32"
    args.loops = args.loops.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    batched.ENABLED = not args.no_batch
    device = torch.device(args.device)
    args.device = str(device)
    work = args.work or Path(tempfile.mkdtemp(prefix="evoforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with quiet_libraries():
        if run_cfg is None:
            log(f"building the {args.scale} family in {work} ...")
            family = build_family(work / "models", args.scale, device, args.tokenizer)
            layers = TINY[args.scale][0] if args.scale in TINY else QWEN2_1_5B["num_hidden_layers"]
        else:
            family, layers = run_file_family(run_cfg)
            args.scale = f"{args.run_file} ({', '.join(f'{n}={family[n].name}' for n in family)})"
        space = GenomeSpace(
            models=NAMES, paths=tuple(str(family[n]) for n in NAMES), num_layers=layers, dtype=args.dtype
        )
        name = (
            torch.cuda.get_device_name()
            if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} threads"
        )
        print(
            f"## evoforge merge bench: {args.scale} on {name}, torch {torch.__version__}, dtype {args.dtype}, "
            f"batched merges {'on' if batched.ENABLED else 'off'}"
        )
        recipes = bench_recipes(space, args.recipes)
        cuda = device.type == "cuda"
        if "A" in args.sections:
            kept = section_latency(recipes, family, device, work, keep=args.capped if cuda else 0)
        if "C" in args.sections and cuda:  # first: nothing else on the card
            section_capped(family, args, work, recipes, kept if "A" in args.sections else {})
        elif "C" in args.sections:
            print("\n### C. Capped GPU run: skipped (needs a CUDA device)")
        if "B" in args.sections:
            section_loops(family, args, device, work)
        if "E" in args.sections and args.tasks == "real":
            section_eval(family, args, device)
    print(f"\ntotal bench time {time.perf_counter() - start:.0f} s")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
