"""Section E of bench/merge_bench.py: one model's evaluation through lm-eval's HFLM and evoforge's Scorer
(PooledHFLM), same tasks and items, timed, with how many generated texts equal lm-eval's."""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM
from merge_bench_common import ROOT, free_memory
from merge_bench_family import NAMES

from evoforge.config import EvaluationConfig
from evoforge.evaluate.generation import PooledHFLM
from evoforge.evaluate.scorer import Scorer, load_model


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
        "lm-eval HFLM": HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    }
    if small:
        variants[f"lm-eval HFLM, batch {small}"] = HFLM(
            pretrained=model, tokenizer=tokenizer, batch_size=small
        )
    variants["PooledHFLM"] = PooledHFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
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
