"""Paired comparisons as they are printed: table rows, markdown, and a run's two held-out comparisons.

`evoforge compare` prints the rows as a Rich table; the run report and the best model's card print a run's
"best vs best base model" and "best vs best seed" from the held-out per-item scores the run keeps
(`records.ItemScores`). Only numpy and the records: no lm-eval, no matplotlib.
"""

from __future__ import annotations

from evoforge.evaluate.stats import Comparison, Interval, compare
from evoforge.evolve.records import ItemScores


def with_se(value: float, se: float | None) -> str:
    """`0.4123 ± 0.0210`; the value alone where no SE is known (a run from before SEs were kept)."""
    return f"{value:.4f}" + (f" ± {se:.4f}" if se is not None else "")


def verdict(iv: Interval) -> str:
    """Whether the interval of B − A excludes 0, and which way."""
    if not iv.excludes_zero:
        return "no"
    return "yes, B higher" if iv.low > 0 else "yes, A higher"


def header(cmp: Comparison) -> tuple[str, ...]:
    level = f"{cmp.difference.level:.0%}"
    return ("domain", "A ± SE", "B ± SE", "B − A", f"{level} interval", "excludes 0")


def rows(cmp: Comparison) -> list[tuple[str, ...]]:
    """One row per domain, then the fitness: A and B with their SEs, B − A with its paired interval."""
    names = [*cmp.difference.domains, "fitness"]
    out = []
    for name in names:
        a, b, d = (
            e.fitness if name == "fitness" else e.domains[name] for e in (cmp.a, cmp.b, cmp.difference)
        )
        interval = f"[{d.low:+.4f}, {d.high:+.4f}]"
        cells = (with_se(a.estimate, a.se), with_se(b.estimate, b.se), f"{d.estimate:+.4f}", interval)
        out.append((name, *cells, verdict(d)))
    return out


def markdown_table(cmp: Comparison) -> list[str]:
    head = header(cmp)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows(cmp):
        cells = [f"**{c}**" for c in row] if row[0] == "fitness" else list(row)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def heldout_comparisons(
    items: ItemScores | None,
    best: tuple[str, str],
    base: str | None,
    seed: tuple[str, str] | None,
) -> list[str]:
    """Markdown for "best vs best base model" and "best vs best seed" on the held-out split. `best` and
    `seed` are (name, genome hash), `base` a base model's name; what is missing is said, not skipped."""
    if items is None:
        return ["No held-out per-item scores in this run (it predates them): no paired intervals."]
    lines = [
        f"Paired bootstrap over the {items.split} items ({items.metric}): both models resampled with the "
        "same items, within each task. B − A is the best candidate's gain; an interval that excludes 0 is "
        "a difference these items resolve.",
    ]
    best_name, best_hash = best
    best_items = items.candidates.get(best_hash)
    seed_name, seed_hash = seed or (None, None)
    others = [
        ("best base model", base, items.base_models.get(base or "")),
        ("best seed", seed_name, items.candidates.get(seed_hash or "")),
    ]
    for what, name, a_items in others:
        lines += ["", f"### Best vs {what}: A = {name or '–'}, B = {best_name}", ""]
        if what == "best seed" and seed_hash == best_hash:
            lines.append("The best candidate is the best seed: the search found nothing better.")
        elif name is None:
            lines.append(f"Not available: no {what} scored.")
        elif best_items is None or a_items is None:
            missing = best_name if best_items is None else name
            lines.append(f"Not available: {missing} has no per-item scores on {items.split}.")
        else:
            lines += markdown_table(compare(a_items, best_items, items.task_domains, items.weights))
    return lines
