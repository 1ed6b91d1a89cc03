"""The run report: plots and a markdown summary drawn only from what the run wrote (`evolve.run_dir.Run`).

It reads any prefix of a run (one generation, a run stopped by Ctrl-C or a plateau) and failed candidates.
Figures are drawn on `matplotlib.figure.Figure` objects, which save PNGs through the Agg canvas: no pyplot,
no GUI backend, no global figure state in a long-lived process.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import accumulate
from pathlib import Path
from statistics import median

from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from evoforge.config import DOMAINS, read_mapping
from evoforge.evolve.records import EvaluationRecord, Scores, parent_ratios
from evoforge.evolve.run_dir import Run
from evoforge.track.comparisons import heldout_comparisons, with_se

OPERATOR_COLOURS = {
    "seed": "#9ecae1",
    "elite": "#dadaeb",
    "mutation": "#a1d99b",
    "recombination": "#fdae6b",
    "cmaes": "#bcbddc",
    "random": "#d9d9d9",
}
BEST_COLOUR = "#d62728"


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _first_line(error: str) -> str:
    """An error's first line, capped: a traceback's detail belongs in evaluations.jsonl, not the summary."""
    return (error.splitlines() or [""])[0][:200]


def domains(run: Run) -> list[str]:
    """Every domain any record scored, in the config's order, others after."""
    seen = {d for g in run.generations for d in g.domain_avg}
    seen |= {d for splits in run.baselines.models.values() for s in splits.values() for d in s.domains}
    return [d for d in DOMAINS if d in seen] + sorted(seen - set(DOMAINS))


def plot_fitness(run: Run, path: Path) -> None:
    """Best and average fitness per generation, every candidate as a dot, the best base model as a line."""
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ok = [e for e in run.evaluations if e.error is None]
    failed = [e for e in run.evaluations if e.error is not None]
    if ok:
        ax.scatter(
            [e.generation for e in ok],
            [e.fitness for e in ok],
            s=14,
            color="0.6",
            alpha=0.6,
            label="candidates",
        )
    if failed:
        ax.scatter(
            [e.generation for e in failed],
            [e.fitness for e in failed],
            s=30,
            marker="x",
            color="black",
            label="failed",
        )
    gens = [g.generation for g in run.generations]
    ax.plot(gens, [g.avg_fitness for g in run.generations], "o-", color="#1f77b4", label="average")
    ax.plot(gens, [g.best_fitness for g in run.generations], "o-", color=BEST_COLOUR, label="best")
    base = run.best_base(run.baselines.fitness_split)
    if base is not None:
        ax.axhline(
            base[1].fitness, ls="--", color="0.3", label=f"best base model: {base[0]} ({base[1].fitness:.3f})"
        )
    ax.set_xlim(min(gens) - 0.5, max(gens) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("generation")
    ax.set_ylabel(f"fitness ({run.baselines.fitness_split} split)")
    ax.set_title(f"{run.name}: fitness per generation")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # fitness is ≥ 0: bars of progress start at zero
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(path, dpi=110)


def fresh_evaluations(run: Run) -> list[EvaluationRecord]:
    """The run's evaluations in the order they were paid for: cached ones (elites, repeats) cost nothing."""
    return sorted((e for e in run.evaluations if not e.cached), key=lambda e: e.generation)


def best_so_far(evaluations: list[EvaluationRecord]) -> list[float]:
    """The running maximum of fitness: the search's progress per evaluation."""
    return list(accumulate((e.fitness for e in evaluations), max))


def plot_search(run: Run, path: Path) -> None:
    """Best-so-far fitness per evaluation (cached candidates cost none and are left out): how fast the search
    strategy climbs, comparable across strategies at equal budgets; the best seed and base model as lines."""
    fresh = fresh_evaluations(run)
    curve = best_so_far(fresh)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.step(range(1, len(curve) + 1), curve, where="post", color=BEST_COLOUR, label="best so far")
    seeds = [e.fitness for e in fresh if e.operator == "seed"]
    if seeds:
        ax.axhline(max(seeds), ls=":", color="#1f77b4", label=f"best seed ({max(seeds):.3f})")
    base = run.best_base(run.baselines.fitness_split)
    if base is not None:
        ax.axhline(
            base[1].fitness, ls="--", color="0.3", label=f"best base model: {base[0]} ({base[1].fitness:.3f})"
        )
    search = read_mapping(run.run_dir.config).get("search", {}) if run.run_dir.config.is_file() else {}
    ratios = parent_ratios(run.evaluations, run.baselines.fitness_split)
    kept = ", ".join(f"{op} {r:.0%}" for op, r in ratios.items())
    ax.set_title(
        f"{run.name}: search {search.get('strategy', 'ga')}"
        + (f" (median fitness vs parents: {kept})" if kept else ""),
        fontsize=10,
    )
    ax.set_xlabel("evaluation")
    ax.set_ylabel(f"best fitness so far ({run.baselines.fitness_split} split)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    fig.savefig(path, dpi=110)


def plot_domains(run: Run, path: Path) -> None:
    """The best candidate against each base model, per domain, on the fitness and the held-out split."""
    groups = ["fitness", *domains(run)]
    best_label = f"best: {run.best.label}"
    panels = [
        (run.baselines.fitness_split, "fitness split", run.best.scores),
        (run.baselines.heldout_split, "held-out split", run.best_heldout),
    ]
    models = list(run.baselines.models)
    series = [best_label, *models]
    palette = [f"C{i}" for i in range(10) if i != 3]  # C3 is the best candidate's red
    colours = {best_label: BEST_COLOUR}
    for i, m in enumerate(models):
        colours[m] = "0.7" if m == run.ancestor else palette[i % len(palette)]
    fig = Figure(figsize=(max(9.0, 2.4 * len(groups) + 1), 4.8), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    width = 0.8 / len(series)
    for ax, (split, what, best_scores) in zip(axes, panels):
        rows: dict[str, Scores | None] = {best_label: best_scores}
        rows.update({m: run.baselines.models[m].get(split) for m in models})
        for i, name in enumerate(series):
            scores = rows[name]
            if scores is None:
                continue
            values = [scores.fitness if g == "fitness" else scores.domains.get(g, 0.0) for g in groups]
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
            ax.bar(xs, values, width, color=colours[name], edgecolor="white", linewidth=0.5)
        ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 5 else 0)
        note = "" if best_scores is not None else "\n(best candidate not scored on this split)"
        ax.set_title(f"{what}: {split}{note}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score")
    labels = [s if s != run.ancestor else f"{s} (ancestor)" for s in series]
    fig.legend(
        [Patch(color=colours[s]) for s in series],
        labels,
        loc="outside lower center",
        ncols=min(len(series), 5),
        fontsize=8,
    )
    fig.suptitle(f"{run.name}: domain scores of {run.best.id}")
    fig.savefig(path, dpi=110)


def _lineage_layout(nodes: dict[str, EvaluationRecord]) -> dict[str, tuple[float, float]]:
    """Rows by generation (seeds on top); within a row, nodes ordered by their parents' mean position,
    which keeps most edges from crossing, then spread evenly and centred."""
    rows: dict[int, list[str]] = defaultdict(list)
    for h, e in nodes.items():
        rows[e.generation].append(h)
    pos: dict[str, tuple[float, float]] = {}
    for gen in sorted(rows):

        def key(h: str) -> tuple[float, str]:
            xs = [pos[p][0] for p in nodes[h].parents if p in pos]
            return (sum(xs) / len(xs) if xs else 0.0, h)

        row = sorted(rows[gen], key=key)
        for i, h in enumerate(row):
            pos[h] = (i - (len(row) - 1) / 2, -gen)
    return pos


def plot_lineage(run: Run, path: Path) -> None:
    """The ancestry graph of the best candidate, back to the seeds; nodes: short hash, generation, fitness."""
    nodes = run.ancestry()
    pos = _lineage_layout(nodes)
    gens = sorted({e.generation for e in nodes.values()})
    widest = max(sum(1 for e in nodes.values() if e.generation == g) for g in gens)
    fig = Figure(
        figsize=(max(6.0, 1.5 * widest + 1.5), max(3.0, 1.1 * len(gens) + 1.2)), layout="constrained"
    )
    ax = fig.add_subplot()
    best_hash = run.best.genome_hash
    boxes = {}
    for h, e in nodes.items():
        status = "failed" if e.error is not None else f"{e.fitness:.3f}"
        label = ax.text(
            *pos[h],
            f"{h[:7]}\ngen {e.generation} · {status}",
            ha="center",
            va="center",
            fontsize=8,
            family="monospace",
            bbox={
                "boxstyle": "round,pad=0.4",
                "facecolor": OPERATOR_COLOURS[e.operator],
                "edgecolor": BEST_COLOUR if h == best_hash else ("black" if e.error else "0.4"),
                "linewidth": 2.2 if h == best_hash else 0.8,
                "linestyle": "--" if e.error else "-",
            },
        )
        boxes[h] = label.get_bbox_patch()
    # Drawn after the boxes, each arrow is clipped to the two boxes' outlines (patchA/patchB), so every
    # arrowhead lands on its child's edge whatever the angle.
    for h, e in nodes.items():
        for p in e.parents:
            if p in pos:
                ax.annotate(
                    "",
                    xy=pos[h],
                    xytext=pos[p],
                    arrowprops={
                        "arrowstyle": "-|>",
                        "color": "0.45",
                        "lw": 0.8,
                        "patchA": boxes[p],
                        "patchB": boxes[h],
                        "shrinkA": 1,
                        "shrinkB": 1,
                    },
                )
    xs = [x for x, _ in pos.values()]
    ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
    ax.set_ylim(-max(gens) - 0.6, -min(gens) + 0.6)
    ax.set_yticks([-g for g in gens], [f"gen {g}" for g in gens])
    ax.set_xticks([])
    ax.tick_params(axis="y", length=0)
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    handles = [Patch(facecolor=c, edgecolor="0.4", label=op) for op, c in OPERATOR_COLOURS.items()]
    handles.append(Patch(facecolor="white", edgecolor=BEST_COLOUR, linewidth=2, label="best"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    ax.set_title(f"ancestry of the best candidate {run.best.id} ({run.best.label})", fontsize=10)
    fig.savefig(path, dpi=100)


def _improvement_row(split: str, kind: str, best: float | None, base: tuple[str, Scores] | None) -> str:
    if base is None:
        return f"| {split} ({kind}) | no base model scored | | | | |"
    name, scores = base
    if best is None:
        return f"| {split} ({kind}) | {name} | {_fmt(scores.fitness)} | not scored | | |"
    delta = best - scores.fitness
    relative = f"{100 * delta / scores.fitness:+.2f}%" if scores.fitness else "n/a"
    return (
        f"| {split} ({kind}) | {name} | {_fmt(scores.fitness)} | {_fmt(best)} | {delta:+.4f} | {relative} |"
    )


def _scores_table(run: Run, split: str, best_scores: Scores | None) -> list[str]:
    names = domains(run)
    head = ["model", "fitness", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: list[tuple[str, Scores | None]] = [(f"**best: {run.best.id}**", best_scores)]
    rows += [
        (m if m != run.ancestor else f"{m} (ancestor)", run.baselines.models[m].get(split))
        for m in run.baselines.models
    ]
    for name, scores in rows:
        if scores is None:
            cells = ["not scored"] + [""] * len(names)
        else:
            cells = [with_se(scores.fitness, scores.fitness_se)] + [
                with_se(scores.domains[d], scores.domain_se.get(d)) if d in scores.domains else "–"
                for d in names
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _comparisons(run: Run) -> list[str]:
    base = run.best_base(run.baselines.heldout_split)
    seed = run.best_seed
    return heldout_comparisons(
        run.run_dir.read_items(),
        (run.best.id, run.best.genome_hash),
        base[0] if base else None,
        (seed.id, seed.genome_hash) if seed else None,
    )


def _throughput(run: Run) -> list[str]:
    """Candidates an hour of generation time and where their time went; none for records without times."""
    wall = sum(g.wall_s for g in run.generations)
    fresh = [e for e in run.evaluations if not e.cached]
    if wall <= 0 or not fresh:
        return []
    held = [e.merge_s + e.eval_s for e in run.heldout_evaluations]
    return [
        f"- Throughput: {len(fresh)} candidates merged and scored in {wall:.0f} s of generations, "
        f"{3600 * len(fresh) / wall:.0f} an hour; a candidate's merge on the critical path "
        f"{median(e.merge_s for e in fresh):.2f} s, its scoring {median(e.eval_s for e in fresh):.2f} s "
        f"(medians); {len(held)} held-out passes of new bests, {sum(held):.0f} s"
    ]


def _confirmation(run: Run) -> list[str]:
    """How a likelihood run's best was chosen (`evolve.confirm`): each candidate's fitness and accuracy."""
    conf = run.confirmation
    if conf is None or conf.top == 0:  # top 0: only the held-out pass at the end (`heldout_each_best`)
        return []
    lines = [
        f"- Chosen by accuracy on {conf.split} among the {conf.top} fittest and the best seed "
        "(fitness is likelihood, a proxy that ranks the top candidates less well):",
        "",
        f"  | candidate | fitness | accuracy on {conf.split} |",
        "  |---|---|---|",
    ]
    for c in conf.candidates:
        acc = (
            with_se(c.scores.fitness, c.scores.fitness_se)
            if c.scores
            else f"failed: {_first_line(c.error or '')}"
        )
        mark = "**" if c.id == conf.chosen else ""
        lines.append(f"  | {mark}`{c.id}`{mark} | {_fmt(c.fitness)} | {mark}{acc}{mark} |")
    return lines


def summary_markdown(run: Run) -> str:
    """The summary: the best candidate, its improvement over the best base model on both splits, tables."""
    best, held = run.best, run.best_heldout
    model, _ = run.best_model
    fit_split, held_split = run.baselines.fitness_split, run.baselines.heldout_split
    failed = [e for e in run.evaluations if e.error is not None]
    cached = sum(e.cached for e in run.evaluations)
    first, last = run.generations[0].generation, run.generations[-1].generation
    recipe = run.run_dir.root / best.recipe
    lines = [
        f"# evoforge run `{run.name}`",
        "",
        f"- Generations: {len(run.generations)} (gen {first}–{last}); evaluations: {len(run.evaluations)} "
        f"({len(run.by_hash())} distinct genomes, {cached} cached, {len(failed)} failed)",
        *_throughput(run),
        f"- Best candidate: `{best.id}` — {best.label}, genome `{best.genome_hash}`, made by {best.operator} "
        f"in generation {best.generation}"
        + (f" (it failed: {_first_line(best.error)})" if best.error is not None else ""),
        f"- Fitness ({fit_split}): {_fmt(best.fitness)}",
        f"- Held-out fitness ({held_split}): " + (_fmt(held.fitness) if held else "not scored"),
        f"- Recipe: `{best.recipe}`" + ("" if recipe.is_file() else " (file missing)"),
        f"- Model: `{model}/`" if model else "- Model: not written",
        *_confirmation(run),
        "",
        "## Improvement over the best base model",
        "",
        "| split | best base model | base fitness | best candidate | Δ absolute | Δ relative |",
        "|---|---|---|---|---|---|",
        _improvement_row(fit_split, "fitness", best.fitness, run.best_base(fit_split)),
        _improvement_row(held_split, "held-out", held.fitness if held else None, run.best_base(held_split)),
        "",
        f"## Held-out comparisons ({held_split})",
        "",
        *_comparisons(run),
        "",
        f"## Domain scores, {fit_split} (fitness) split",
        "",
        "Scores ± bootstrap standard error over the items.",
        "",
        *_scores_table(run, fit_split, best.scores),
        "",
        f"## Domain scores, {held_split} (held-out) split",
        "",
        *_scores_table(run, held_split, held),
        "",
        "## Generations",
        "",
        "| gen | best fitness | avg fitness | best candidate | held-out fitness | population | s | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    failed_by_gen = defaultdict(int)
    for e in failed:
        failed_by_gen[e.generation] += 1
    for g in run.generations:
        h = _fmt(g.best_heldout.fitness) if g.best_heldout else "–"
        lines.append(
            f"| {g.generation} | {_fmt(g.best_fitness)} | {_fmt(g.avg_fitness)} | `{g.best_id}` | {h} "
            f"| {g.population_size} | {g.wall_s:.1f} | {failed_by_gen[g.generation]} |"
        )
    unsaved = [g for g in run.generations if g.best_model_error]
    if failed or unsaved:
        lines += ["", "## Failed candidates", ""]
        for e in failed:
            kind = e.error_kind or "permanent"
            lines.append(f"- `{e.id}` (gen {e.generation}, {e.label}): {kind}: {_first_line(e.error or '')}")
        for g in unsaved:
            lines.append(
                f"- best model of gen {g.generation} (`{g.best_id}`) not written: "
                f"{_first_line(g.best_model_error or '')} (`evoforge run --resume` writes it)"
            )
    lines += [
        "",
        "## Plots",
        "",
        "![Fitness per generation](fitness.png)",
        "",
        "![Domain scores](domains.png)",
        "",
        "![Best fitness so far per evaluation](search.png)",
        "",
        "![Ancestry of the best candidate](lineage.png)",
        "",
    ]
    return "\n".join(lines)


def write_report(run_dir: Path) -> list[Path]:
    """Write `run_dir/report/`: fitness.png, domains.png, lineage.png, search.png, summary.md; return their
    paths."""
    run = Run.load(run_dir)
    out = run.run_dir.report
    out.mkdir(exist_ok=True)
    paths = [
        out / "fitness.png",
        out / "domains.png",
        out / "lineage.png",
        out / "search.png",
        out / "summary.md",
    ]
    plot_fitness(run, paths[0])
    plot_domains(run, paths[1])
    plot_lineage(run, paths[2])
    plot_search(run, paths[3])
    paths[4].write_text(summary_markdown(run), encoding="utf-8")
    return paths
