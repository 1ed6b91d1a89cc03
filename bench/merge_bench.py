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
     loaded once). Each path's result is fingerprinted (exact, bitwise) and compared. On CUDA: the peak GPU
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
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from graphlib import TopologicalSorter
from pathlib import Path

import mergekit.merge
import torch
import yaml
from lm_eval.models.huggingface import HFLM
from mergekit.architecture import get_architecture_info
from mergekit.graph import Executor
from mergekit.scripts.multimerge import load_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config
from transformers.trainer_utils import set_seed

from evoforge.config import EvaluationConfig, EvolutionConfig, MergeOperators
from evoforge.evaluate.generation import PooledHFLM
from evoforge.evaluate.scorer import Scorer, load_model
from evoforge.evolve import strategies
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.loop import Evolution, Hooks
from evoforge.evolve.run_dir import RunDir
from evoforge.genome import Genome, GenomeSpace, Step, StructureGene, seed_genomes
from evoforge.merge import mergekit_fixes
from evoforge.merge.disk import merge_options, merge_recipe, validate_recipe
from evoforge.merge.memory import STAGE_DIR, InMemoryLoader, MemoryMerger, batched, models_in_memory
from evoforge.quiet import quiet_libraries
from evoforge.recipe import random_seed, render
from evoforge.tiny import byte_level_tokenizer, make_family

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from evolution_support import TASKS, write_mc_tasks  # noqa: E402  the test suite's multiple-choice tasks
from mergekit_support import plan_in_memory  # noqa: E402  mergekit's in-memory planner, with its workaround

NAMES = ("alpha", "beta", "gamma")
TINY = {"tiny": (6, 64), "tiny-28": (28, 64), "mid-8": (8, 256)}
"""evoforge.tiny families, (layers, hidden): at hidden 64 merge cost is mergekit's per-tensor Python work, not
arithmetic; mid-8's tensors (32-131 K elements, 10 MB a model in float32) reach torch's 32 K-element grain,
above which a multi-threaded whole-tensor reduction is split over threads."""
SEED_ORDER = (0, 7, 5, 2, 1, 6, 3, 4)
"""The 8 seeds in an order whose first few cover interp, crossover and structure methods."""
QWEN2_1_5B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    eos_token_id=0,
    pad_token_id=0,
    bos_token_id=0,
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_family(
    root: Path, scale: str, device: torch.device, tokenizer_dir: Path | None = None
) -> dict[str, Path]:
    """Ancestor + three related children: evoforge.tiny's family, or Qwen2-1.5B-shaped random bf16 models
    built on `device` (the GPU: seconds instead of minutes) with the byte-level tokenizer or `tokenizer_dir`'s."""
    if scale in TINY:
        layers, hidden = TINY[scale]
        return make_family(root, arch="qwen2", num_layers=layers, hidden=hidden)
    paths = {name: root / name for name in ("ancestor", *NAMES)}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else byte_level_tokenizer()
    special = {
        key: getattr(tokenizer, key) if getattr(tokenizer, key) is not None else tokenizer.eos_token_id
        for key in ("eos_token_id", "pad_token_id", "bos_token_id")
    }
    torch.manual_seed(0)
    with torch.device(device):
        config = Qwen2Config(**{**QWEN2_1_5B, **special})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(("ancestor", *NAMES)):
        if i:
            gen = torch.Generator(device).manual_seed(i)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    noise = torch.randn(param.shape, generator=gen, device=device) * 0.02
                    std = base[key].float().std().clamp(min=1e-3)
                    param.copy_(base[key] + (noise * std).to(param.dtype))
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    del model, base
    return paths


def bench_recipes(space: GenomeSpace, count: int) -> dict[str, str]:
    """`count` of the 8 seeds (spread over the method triples) and a deep DARE DFS path: 1.5× the depth,
    repeated layers, every source, scaled steps."""
    seeds = seed_genomes(space, MergeOperators(), [1.0] * len(NAMES), run_seed=7)
    labels = [list(seeds)[i] for i in SEED_ORDER[:count]]
    out = {label: render(seeds[label], space) for label in labels}
    rng = random.Random(0)
    sources = ("crossover", "crossover", "interp", *NAMES)
    path = tuple(
        Step(source=rng.choice(sources), layer=i % space.num_layers, scale=round(rng.uniform(0.7, 1.3), 3))
        for i in range(space.max_depth)
    )
    seed = seeds["slerp-dare-dfs"]
    deep = Genome(
        interp=seed.interp, crossover=seed.crossover, structure=StructureGene(method="dfs", path=path)
    )
    out["deep-dfs (dare)"] = render(deep, space)
    return out


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


# ---------------------------------------------------------------------------------------------- sections


def run_path(
    path: str, text: str, seed: int | None, merger: MemoryMerger, device: torch.device, work: Path
) -> dict[str, torch.Tensor] | None:
    """One merge through one path: the state dict, or None for the disk path (its folder is work/out)."""
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
    head = "| recipe | disk s | planner s | memory s | disk/memory | planner/memory | same bits |"
    if cuda:
        head += " GiB added at peak: disk / planner / memory |"
    print(head + "\n|" + "---|" * (head.count("|") - 1))
    runs: dict[str, list[float]] = {"disk": [], "planner": [], "memory": []}
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
        same = prints["disk"] == prints["planner"] == prints["memory"]
        row = (
            f"| {label} | {times['disk']:.3f} | {times['planner']:.3f} | {times['memory']:.3f} | "
            f"{times['disk'] / times['memory']:.1f}× | {times['planner'] / times['memory']:.1f}× | {same} |"
        )
        if cuda:
            row += f" {gib(peaks['disk'])} / {gib(peaks['planner'])} / {gib(peaks['memory'])} |"
        print(row, flush=True)
    mean = {k: statistics.fmean(v) for k, v in runs.items()}
    print(
        f"| **mean** | {mean['disk']:.3f} | {mean['planner']:.3f} | {mean['memory']:.3f} | "
        f"{mean['disk'] / mean['memory']:.1f}× | {mean['planner'] / mean['memory']:.1f}× | |",
        flush=True,
    )
    shutil.rmtree(work / "out", ignore_errors=True)
    del merger
    free_memory()
    return kept


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
        with clock():
            results[merge_path] = one_generation(cfg, space, evaluator)
        results[merge_path]["peak"] = clock.peak
        del evaluator
        free_memory()
        shutil.rmtree(work / f"loop-{merge_path}", ignore_errors=True)
    print(f"\n### {title} (8 candidates; tasks: {args.tasks}, limit {args.limit})\n")
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


class Texts:
    """Wraps an lm-eval LM's generate_until: keeps every text and the seconds spent generating."""

    def __init__(self, lm: HFLM) -> None:
        self.lm, self.texts, self.seconds = lm, [], 0.0
        self.inner = lm.generate_until
        lm.generate_until = self

    def __call__(self, requests, disable_tqdm: bool = False) -> list[str]:
        start = time.perf_counter()
        out = self.inner(requests, disable_tqdm=disable_tqdm)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.texts = [
            (r.args[0], tuple(r.args[1]["until"]), r.args[1]["max_gen_toks"], t)
            for r, t in zip(requests, out, strict=True)
        ]
        return out


def section_eval(family: dict[str, Path], args: argparse.Namespace, device: torch.device) -> None:
    """Section E: one model scored by each wrapper, same tasks and items, warm medians of --eval-reps calls."""
    model, tokenizer = load_model(family[NAMES[0]], str(device), args.dtype)
    evaluation = EvaluationConfig(batch_size=args.batch_size, limit=args.limit)
    small = args.control_batch
    variants: dict[str, HFLM] = {
        "lm-eval HFLM": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
        f"lm-eval HFLM, batch {small}": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=small),
        "PooledHFLM": PooledHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size),
    }
    if args.static_cache:
        variants["PooledHFLM + static cache"] = PooledHFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, static_cache=True
        )
    print(
        f"\n### E. Evaluation throughput (tasks/ validation, limit {args.limit} per task, batch {args.batch_size})\n"
    )
    print(
        "| wrapper | items | first call s | warm s (median) | generation s (warm) | fitness | texts as lm-eval's |"
        "\n|---|---|---|---|---|---|---|"
    )
    reference = None
    for label, lm in variants.items():
        scorer = Scorer(lm, evaluation=evaluation, tasks_dir=ROOT / "tasks")
        texts = Texts(lm)
        walls, gens = [], []
        for _ in range(args.eval_reps + 1):
            texts.seconds = 0.0
            result = scorer.score()
            walls.append(result.wall_s)
            gens.append(texts.seconds)
        reference = reference or texts.texts
        same = sum(a == b for a, b in zip(reference, texts.texts, strict=True))
        print(
            f"| {label} | {result.n_items} | {walls[0]:.2f} | {statistics.median(walls[1:]):.2f} | "
            f"{statistics.median(gens[1:]):.2f} | {result.fitness:.4f} | {same}/{len(reference)} |",
            flush=True,
        )
    groups = {(until, budget): budget for _, until, budget, _ in reference}
    print(
        f"\ndecoding steps a model that never stops takes: lm-eval (one group per distinct generation kwargs) "
        f"{sum(groups.values())} if each group fits one batch, pooled {max(groups.values())}"
    )
    del variants, model, scorer, texts, lm
    torch._dynamo.reset()  # compiled graphs and their memory pools
    free_memory()


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
                "| recipe | merge s | merge peak GiB | same tensors as uncapped | merge + load s | eval s | fitness |\n"
                "|---|---|---|---|---|---|---|"
            )
            for label, expected in kept.items():
                text, clock, compare = recipes[label], Clock(torch.device("cuda")), Compare(expected)
                log(f"capped, before {label}: {cuda_residue()}")
                try:
                    with evaluator.scorer.on_host(), clock():  # as score_recipe merges when streaming
                        merger.merge(text, random_seed(text), into=lambda _config, c=compare: c)
                    scores, merge_s, eval_s = evaluator.score_recipe(
                        text, random_seed(text) or 0, cfg.evaluation.fitness_split
                    )
                except torch.OutOfMemoryError as error:
                    print(
                        f"| {label} | out of memory: {oom(error)} | | | | | |",
                        flush=True,
                    )
                    free_memory()
                    continue
                print(
                    f"| {label} | {clock.seconds:.3f} | {gib(clock.peak)} | {compare.same} | {merge_s:.3f} | {eval_s:.3f} | "
                    f"{scores.fitness:.4f} |",
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
        "--control-batch", type=int, default=8, help="section E: lm-eval's HFLM again at this batch size"
    )
    parser.add_argument("--eval-reps", type=int, default=3, help="warm calls per wrapper in section E")
    parser.add_argument(
        "--static-cache",
        action="store_true",
        help="section E: also a static-cache variant; B: evaluation.compile_generation",
    )
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer folder for the 1.5 B models")
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for models and runs (default: temporary)"
    )
    args = parser.parse_args()
    gpu = args.scale not in TINY
    args.recipes = args.recipes or (3 if gpu else 8)
    args.tasks = args.tasks or ("real" if gpu else "mc")
    args.limit = args.limit or (16 if args.tasks == "real" else None)
    args.dtype = "bfloat16" if gpu else "float32"
    args.loops = args.loops.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    batched.ENABLED = not args.no_batch
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    args.device = str(device)
    work = args.work or Path(tempfile.mkdtemp(prefix="evoforge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with quiet_libraries():
        log(f"building the {args.scale} family in {work} ...")
        family = build_family(work / "models", args.scale, device, args.tokenizer)
        space = GenomeSpace(
            models=NAMES,
            paths=tuple(str(family[n]) for n in NAMES),
            num_layers=TINY[args.scale][0] if args.scale in TINY else QWEN2_1_5B["num_hidden_layers"],
            dtype=args.dtype,
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
