"""Which number should evolution climb? Exact-match accuracy vs gold-answer likelihood on the fitness split,
judged by how well each ranks candidates by their held-out accuracy, how noisy it is and what it costs.

    python bench/fitness_metrics.py                                        # recipes/demo.yaml, all items
    python bench/fitness_metrics.py --candidates 6 --limit 5 --device cpu  # CPU smoke test, minutes

Candidates (--candidates, default 60), interleaved by kind so that a small N still holds every kind: the run
file's base models and ancestor as given, the 8 seed genomes, mutants (`genome.mutate` of a seed or an earlier
mutant or child, the run's mutation_rate) and children (`genome.recombine` of three random pool members with
random weights), all drawn from one `random.Random(--seed)`. Each is merged as the run would merge it (the
memory path into the Scorer's resident model, else mergekit on disk) and scored three times: the fitness
split by accuracy and by likelihood, the held-out split by accuracy (the quality claim).

Reported per metric: mean wall time per candidate (warm: one untimed candidate first; scoring only, not the
merge), the mean over candidates of the bootstrap SE of a candidate's fitness (--resamples resamples of the
items within each task, fixed seed, aggregated by the run's domain weights as fitness is), the spread of
fitness across candidates (SD) and the Spearman correlation of fitness with held-out accuracy, with a
percentile bootstrap CI over candidates. scipy is a dependency of mergekit, so it is always there.

Markdown goes to stdout and --out (default fitness_metrics.md); the per-candidate, per-item scores go next to
it as JSON (same name, .json), so the numbers can be re-analysed without scoring again. Progress: stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean

import numpy as np
import torch
from scipy.stats import spearmanr

from evoforge.config import EvolutionConfig, load_config
from evoforge.evaluate.scorer import EvalResult
from evoforge.evaluate.stats import bootstrap
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.genome import Genome, GenomeSpace, mutate, recombine, seed_genomes
from evoforge.merge.memory import NotInMemory
from evoforge.quiet import quiet_libraries
from evoforge.recipe import render

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("accuracy", "likelihood")
KINDS = ("model", "seed", "mutant", "child")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Candidate:
    """A model to score: a folder (`path`), or a genome's recipe merged with its crossover seed."""

    label: str
    kind: str
    path: str | None = None
    recipe: str | None = None
    seed: int | None = None


def _genome_candidate(kind: str, genome: Genome, space: GenomeSpace) -> Candidate:
    return Candidate(
        label=f"{kind} {genome.label} {genome.hash[:8]}",
        kind=kind,
        recipe=render(genome, space, title=f"bench/fitness_metrics.py {kind}"),
        seed=genome.crossover.seed,
    )


def build_candidates(cfg: EvolutionConfig, space: GenomeSpace, count: int, seed: int) -> list[Candidate]:
    """`count` distinct candidates, one of each kind in turn while a kind has some left (models and seeds
    run out; mutants and children are drawn as needed)."""
    rng = random.Random(seed)
    models = [*cfg.base_models, *([cfg.ancestor] if cfg.ancestor else [])]
    by_kind: dict[str, list[Candidate]] = {
        "model": [Candidate(label=f"model {m.name}", kind="model", path=cfg.resolve(m)) for m in models],
        "seed": [],
    }
    pool = list(
        seed_genomes(space, cfg.merge_operators, [m.weight for m in cfg.base_models], cfg.seed).values()
    )
    by_kind["seed"] = [_genome_candidate("seed", g, space) for g in pool]
    known = {g.hash for g in pool}
    out: list[Candidate] = []
    taken = dict.fromkeys(KINDS, 0)
    while len(out) < count:
        for kind in KINDS:
            if len(out) == count:
                break
            if kind in by_kind:
                if taken[kind] < len(by_kind[kind]):
                    out.append(by_kind[kind][taken[kind]])
                    taken[kind] += 1
                continue
            for _ in range(32):  # a fresh genome (mutants of one parent can coincide)
                if kind == "mutant":
                    genome = mutate(rng.choice(pool), space, rng, cfg.mutation_rate)
                else:
                    genome = recombine(rng.sample(pool, 3), [rng.random() for _ in range(3)], space, rng)
                if genome.hash not in known:
                    break
            known.add(genome.hash)
            pool.append(genome)
            out.append(_genome_candidate(kind, genome, space))
    return out


def load(evaluator: CandidateEvaluator, cand: Candidate, scratch: Path) -> None:
    """Put the candidate's weights into the Scorer's model, as the run does: merged tensor by tensor on the
    memory path, else (a recipe it cannot reproduce, or `merge_path: disk`) through a merged folder."""
    scorer = evaluator.scorer
    if cand.path is not None:
        scorer.load_weights(cand.path)
        return
    memory = evaluator.memory
    if memory is not None:
        try:
            with scorer.on_host() if memory.stream else nullcontext():
                memory.merge(cand.recipe, cand.seed, into=scorer.open_weights)
            return
        except NotInMemory:
            pass
    folder = evaluator.merge(cand.recipe, cand.seed, scratch / "candidate")
    scorer.load_weights(folder)


# ------------------------------------------------------------------------------------------ statistics


def bootstrap_se(result: EvalResult, resamples: int, seed: int) -> float:
    """SD of the candidate's fitness over resamples of the items (`evaluate.stats.bootstrap`)."""
    est = bootstrap(result.item_scores(), result.task_domains(), result.weights, resamples, seed)
    if not np.isclose(est.fitness.estimate, result.fitness):
        raise RuntimeError(f"{result.split}/{result.metric}: per-item scores do not add up to the fitness")
    return est.fitness.se


def spearman_ci(x: list[float], y: list[float], resamples: int, seed: int) -> tuple[float, float, float]:
    """Spearman ρ of x with y and its 95 % percentile bootstrap CI over candidates (NaN where constant)."""
    xs, ys = np.asarray(x), np.asarray(y)
    rho = float(spearmanr(xs, ys).statistic)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        idx = rng.integers(0, len(xs), size=len(xs))
        if np.ptp(xs[idx]) > 0 and np.ptp(ys[idx]) > 0:
            draws.append(spearmanr(xs[idx], ys[idx]).statistic)
    lo, hi = np.percentile(draws, [2.5, 97.5]) if draws else (float("nan"), float("nan"))
    return rho, float(lo), float(hi)


# ------------------------------------------------------------------------------------------ main


def measure(evaluator: CandidateEvaluator, cands: list[Candidate], args: argparse.Namespace) -> list[dict]:
    """Per candidate: both metrics on the fitness split, accuracy on the held-out split, times, per-item."""
    scorer, ev = evaluator.scorer, evaluator.cfg.evaluation
    rows = []
    with tempfile.TemporaryDirectory(prefix="fitness_metrics_") as tmp:
        log(f"warm-up: {cands[0].label}")
        load(evaluator, cands[0], Path(tmp))
        for metric in METRICS:
            scorer.score(ev.fitness_split, metric=metric)
        scorer.score(ev.heldout_split, metric="accuracy")
        for i, cand in enumerate(cands):
            t0 = time.perf_counter()
            load(evaluator, cand, Path(tmp))
            merge_s = time.perf_counter() - t0
            fit = {m: scorer.score(ev.fitness_split, metric=m) for m in METRICS}
            held = scorer.score(ev.heldout_split, metric="accuracy")
            rows.append(
                {
                    "label": cand.label,
                    "kind": cand.kind,
                    "merge_s": merge_s,
                    "heldout": held.fitness,
                    "heldout_s": held.wall_s,
                    **{
                        m: {
                            "fitness": r.fitness,
                            "wall_s": r.wall_s,
                            "se": bootstrap_se(r, args.resamples, args.seed),
                            "items": {n: t.items for n, t in r.tasks.items()},
                        }
                        for m, r in fit.items()
                    },
                }
            )
            log(
                f"[{i + 1}/{len(cands)}] {cand.label}: accuracy {fit['accuracy'].fitness:.4f} "
                f"({fit['accuracy'].wall_s:.1f} s), likelihood {fit['likelihood'].fitness:.4f} "
                f"({fit['likelihood'].wall_s:.1f} s), held-out {held.fitness:.4f}"
            )
    return rows


def report(rows: list[dict], cfg: EvolutionConfig, args: argparse.Namespace, device: str) -> str:
    ev = cfg.evaluation
    heldout = [r["heldout"] for r in rows]
    kinds = [r["kind"] for r in rows]
    lines = [
        f"# Fitness metrics: accuracy vs likelihood ({args.run_file})",
        "",
        f"{len(rows)} candidates ({', '.join(f'{kinds.count(k)} {k}' for k in KINDS)}), "
        f"device {device}, dtype {cfg.dtype}, batch {ev.batch_size}, "
        f"{'all items' if ev.limit is None else f'first {ev.limit} items'} per task; fitness split "
        f"`{ev.fitness_split}`, held-out `{ev.heldout_split}` (accuracy); {args.resamples} bootstrap "
        f"resamples, seed {args.seed}. Held-out accuracy: mean {fmean(heldout):.4f}, "
        f"{len(set(heldout))} distinct values. Held-out scoring took {fmean(r['heldout_s'] for r in rows):.2f} s "
        f"per candidate, merging {fmean(r['merge_s'] for r in rows):.2f} s.",
        "",
        "| metric | time / candidate (s) | bootstrap SE of fitness | SD of fitness across candidates "
        "| SE / SD | Spearman ρ with held-out accuracy [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    for m in METRICS:
        fitness = [r[m]["fitness"] for r in rows]
        se, sd = fmean(r[m]["se"] for r in rows), float(np.std(fitness, ddof=1)) if len(rows) > 1 else 0.0
        rho, lo, hi = spearman_ci(fitness, heldout, args.resamples, args.seed)
        lines.append(
            f"| {m} | {fmean(r[m]['wall_s'] for r in rows):.2f} | {se:.4f} | {sd:.4f} | "
            f"{se / sd if sd else float('nan'):.2f} | {rho:.3f} [{lo:.3f}, {hi:.3f}] |"
        )
    lines += ["", "| candidate | accuracy | likelihood | held-out accuracy |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['accuracy']['fitness']:.4f} ± {r['accuracy']['se']:.4f} | "
            f"{r['likelihood']['fitness']:.4f} ± {r['likelihood']['se']:.4f} | {r['heldout']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_file", nargs="?", type=Path, default=ROOT / "recipes" / "demo.yaml")
    parser.add_argument("--candidates", type=int, default=60, help="how many candidates (default 60)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: the run file's")
    parser.add_argument("--limit", type=int, help="first N items per task (default: all, not the run file's)")
    parser.add_argument("--out", type=Path, default=Path("fitness_metrics.md"), help="markdown report")
    parser.add_argument("--seed", type=int, default=0, help="candidate draws and bootstrap resamples")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    args = parser.parse_args()
    if args.candidates < 2:
        parser.error("--candidates: a rank correlation needs at least 2")
    cfg = load_config(args.run_file, device=args.device)
    cfg = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"limit": args.limit})})
    space = GenomeSpace.from_config(cfg)
    cands = build_candidates(cfg, space, args.candidates, args.seed)
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="fitness_metrics_work_") as work:
        log(f"loading {len(cfg.base_models)} base models and the scorer ({cfg.device})")
        evaluator = CandidateEvaluator(cfg, space.paths[0], Path(work))
        device = str(next(evaluator.scorer.model.parameters()).device)
        if device.startswith("cuda"):
            device += f" ({torch.cuda.get_device_name()})"
        rows = measure(evaluator, cands, args)
    text = report(rows, cfg, args, device)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
