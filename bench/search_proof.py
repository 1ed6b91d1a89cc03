"""Does the search beat its seeds on data it never saw? Held-out per-item scores of finished runs.

    python bench/search_proof.py heldout RUN_FILE RUN_DIR [RUN_DIR ...] --out heldout.json
    python bench/search_proof.py heldout RUN_FILE --base-models --out base.json
    python bench/search_proof.py calibration RUN_DIR

`heldout` scores, on the run file's held-out split by accuracy (all items), each run's final best (the
run's `Run.best`: the confirmation's choice in a likelihood run, else the fittest), its fittest candidate if
that is another, and its 8 seeds (generation 0), or with
`--base-models` the run file's base models and ancestor, and writes every model's per-item scores (document
order, per task) as JSON. Models are merged as the run merged them (`fitness_metrics.load`: the memory path
into the Scorer's resident model, else mergekit on disk). The paired comparison of these vectors (bootstrap
over the items) is `evoforge.evaluate.stats`'s; `recipes/demo/SEARCH.md` records the runs and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fitness_metrics import Candidate, load, log

from evoforge.config import load_config
from evoforge.evaluate.stats import paired_difference
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.records import parent_ratios
from evoforge.evolve.run_dir import Run
from evoforge.quiet import quiet_libraries
from evoforge.recipe import random_seed


def run_candidates(root: Path, only: str | None = None) -> list[Candidate]:
    """A run's best, its fittest (if another) and its generation-0 seeds (`only`: "best" the first two,
    "seeds" the seeds), as recipes with the DARE seed their header names."""
    run = Run.load(root)
    chosen = []
    if only != "seeds":
        chosen += [("best", run.best)] + ([("fittest", run.fittest)] if run.confirmed_other else [])
    if only != "best":
        chosen += [("seed", e) for e in run.evaluations if e.generation == 0]
    out = []
    for kind, rec in chosen:
        text = (root / rec.recipe).read_text(encoding="utf-8")
        label = f"{root.name} {kind} {rec.label} {rec.id}"
        out.append(Candidate(label=label, kind=kind, recipe=text, seed=random_seed(text)))
    return out


def heldout(args: argparse.Namespace) -> None:
    cfg = load_config(args.run_file)
    split = cfg.evaluation.heldout_split
    cands: list[Candidate] = []
    if args.base_models:
        models = [*cfg.base_models, *([cfg.ancestor] if cfg.ancestor else [])]
        cands += [Candidate(label=f"model {m.name}", kind="model", path=cfg.resolve(m)) for m in models]
    for root in args.run_dirs:
        cands += run_candidates(root, args.only)
    rows = []
    with quiet_libraries(), tempfile.TemporaryDirectory() as scratch:
        evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), Path(scratch) / "work")
        for i, cand in enumerate(cands, 1):
            t0 = time.perf_counter()
            load(evaluator, cand, Path(scratch))
            result = evaluator.scorer.score(split, limit=args.limit, metric="accuracy")
            rows.append({"label": cand.label, "kind": cand.kind, **result.model_dump(mode="json")})
            log(f"[{i}/{len(cands)}] {cand.label}: {result.fitness:.4f} ({time.perf_counter() - t0:.1f} s)")
            args.out.write_text(json.dumps(rows) + "\n")


def _items(row: dict) -> dict[str, list[float]]:
    return {name: t["items"] for name, t in row["tasks"].items()}


def _diff(a: dict, b: dict) -> str:
    """B − A in held-out fitness with its paired 95 % interval, as a table cell."""
    domains = {name: t["domains"] for name, t in a["tasks"].items()}
    d = paired_difference(_items(a), _items(b), domains, a["weights"]).fitness
    mark = " (excludes 0)" if d.excludes_zero else ""
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{mark}"


def _heldout_rows(root: Path) -> list[dict]:
    """What `heldout` wrote for a run (RUN.heldout.json next to its folder), if it did."""
    path = root.parent / f"{root.name}.heldout.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _seed_rows(roots: list[Path]) -> dict[str, dict]:
    """Seeds' held-out rows by member id, from every *.heldout.json next to the runs (runs of one run seed
    share their seeds, so they are scored once, e.g. into seeds-RUNSEED.heldout.json)."""
    files = {f for root in roots for f in root.parent.glob("*.heldout.json")}
    rows = [r for f in sorted(files) for r in json.loads(f.read_text())]
    return {r["label"].rsplit(" ", 1)[1]: r for r in rows if r["kind"] == "seed"}


def _fittest(fittest: dict | None, best: dict | None) -> str:
    """The fittest's held-out fitness and the confirmed best minus it, where the confirmation chose another."""
    if fittest is None or best is None:
        return "-"
    return f"{fittest['fitness']:.4f}; best − it {_diff(fittest, best)}"


def base_rows(root: Path) -> list[dict]:
    """The base models' held-out rows as `heldout --base-models` writes them, from what a run scored before
    generation 0 (heldout_items.json and baselines.json): runs of one run file share them."""
    run = Run.load(root)
    items = run.run_dir.read_items()
    if items is None:
        raise SystemExit(f"error: {root}: no heldout_items.json (its base models' items); pass --base")
    split = run.baselines.heldout_split
    return [
        {
            "label": f"model {name}",
            "kind": "model",
            "fitness": run.baselines.models[name][split].fitness,
            "weights": items.weights,
            "tasks": {t: {"items": v, "domains": items.task_domains[t]} for t, v in per_task.items()},
        }
        for name, per_task in items.base_models.items()
    ]


def summarize(args: argparse.Namespace) -> None:
    """Markdown: per run, evaluations, best-so-far fitness, and held-out paired comparisons of its best."""
    rows = json.loads(args.base.read_text()) if args.base else base_rows(args.run_dirs[0])
    base = [r for r in rows if r["label"] != f"model {args.ancestor}"]
    specialist = max(base, key=lambda r: r["fitness"])
    print(f"Best specialist on held-out: {specialist['label']} {specialist['fitness']:.4f}\n")
    print(
        "| run | evaluations | best fitness: round 0 → end | best | held-out: best | − gen-0 best seed "
        "| − best seed on held-out | − best specialist | held-out: fittest, if not the best | median mutant / parent |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    scored = {root: _heldout_rows(root) for root in args.run_dirs}
    seed_rows = _seed_rows(args.run_dirs)
    for root, rows in scored.items():
        run = Run.load(root)
        fresh = [e for e in run.evaluations if not e.cached]
        history = [g.best_fitness for g in run.generations]
        ratios = parent_ratios(run.evaluations, run.baselines.fitness_split)
        ratio = ", ".join(f"{op} {r:.3f}" for op, r in ratios.items()) or "-"
        best = next((r for r in rows if r["kind"] == "best"), None)
        fittest = next((r for r in rows if r["kind"] == "fittest"), None)
        seeds = [seed_rows[e.id] for e in run.evaluations if e.generation == 0 and e.id in seed_rows]
        cells = ["not scored"] * 4
        if best is not None and len(seeds) == len([e for e in run.evaluations if e.generation == 0]):
            gen0 = next(r for r in seeds if r["label"].endswith(run.generations[0].best_id))
            top_seed = max(seeds, key=lambda r: r["fitness"])
            cells = [
                f"{best['fitness']:.4f}",
                _diff(gen0, best),
                _diff(top_seed, best),
                _diff(specialist, best),
            ]
        elif run.best_heldout is not None:
            cells[0] = f"{run.best_heldout.fitness:.4f} (no per-item scores)"
        print(
            f"| {root.name} | {len(fresh)} | {history[0]:.4f} → {max(history):.4f} | {run.best.label} "
            f"{run.best.id} | {' | '.join(cells)} | {_fittest(fittest, best)} | {ratio} |"
        )


def _table(title: str, rows: list[tuple[str, dict[str, float], float]]) -> str:
    domains = sorted({d for _, scores, _ in rows for d in scores})
    lines = [
        f"{title}",
        "",
        "| model | " + " | ".join(domains) + " | fitness |",
        "|---" * (len(domains) + 2) + "|",
    ]
    top = {d: max(scores.get(d, float("-inf")) for _, scores, _ in rows) for d in domains}
    for name, scores, fitness in rows:
        cells = [f"**{scores[d]:.3f}**" if scores[d] == top[d] else f"{scores[d]:.3f}" for d in domains]
        lines.append(f"| {name} | {' | '.join(cells)} | {fitness:.4f} |")
    return "\n".join(lines) + "\n"


def calibration(args: argparse.Namespace) -> None:
    """Markdown: the base models, the ancestor and the 8 seeds per domain on both splits, from what one run
    scored anyway (baselines.json, round 0, and its seeds' held-out scores next to it), the best of each
    domain in bold: is each specialist ahead on its own domain, and what share of it do the seeds keep."""
    run = Run.load(args.run_dir)
    fit, held = run.baselines.fitness_split, run.baselines.heldout_split
    models = run.baselines.models
    seeds = [e for e in run.evaluations if e.generation == 0 and e.scores is not None]
    held_rows = _seed_rows([args.run_dir])
    fit_rows = [(f"model {m}", s[fit].domains, s[fit].fitness) for m, s in models.items()]
    fit_rows += [(f"seed {e.label}", e.scores.domains, e.scores.fitness) for e in seeds]
    held_out = [(f"model {m}", s[held].domains, s[held].fitness) for m, s in models.items()]
    held_out += [
        (f"seed {e.label}", held_rows[e.id]["domains"], held_rows[e.id]["fitness"])
        for e in seeds
        if e.id in held_rows
    ]
    metric = next(iter(models.values()))[fit].metric
    print(_table(f"{fit} ({metric}, the fitness split)", fit_rows))
    print(_table(f"{held} (accuracy, held out)", held_out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("heldout", help="per-item held-out scores of runs' bests and seeds, or base models")
    p.add_argument("run_file", type=Path)
    p.add_argument("run_dirs", type=Path, nargs="*")
    p.add_argument("--base-models", action="store_true", help="score the base models and ancestor")
    p.add_argument(
        "--only",
        choices=["best", "seeds"],
        help="a run's best (and fittest) or its seeds alone (runs of one run seed share their seeds)",
    )
    p.add_argument("--limit", type=int, help="first N items per task (default: all; a smoke test)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("summarize", help="markdown table of finished runs and their held-out comparisons")
    p.add_argument("run_dirs", type=Path, nargs="+", help="run directories; RUN.heldout.json next to each")
    p.add_argument(
        "--base",
        type=Path,
        help="`heldout --base-models` output (default: the base models the first run scored)",
    )
    p.add_argument("--ancestor", default="smollm2", help="left out of the specialists")
    p = sub.add_parser("calibration", help="base models, ancestor and seeds per domain, both splits")
    p.add_argument("run_dir", type=Path, help="a run directory; seeds-RUNSEED.heldout.json next to it")
    args = parser.parse_args()
    {"heldout": heldout, "summarize": summarize, "calibration": calibration}[args.command](args)


if __name__ == "__main__":
    main()
