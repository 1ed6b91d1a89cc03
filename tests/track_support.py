"""Support for the tracking tests: a synthetic run directory written with the real record models.

`make_run` writes what the evolution loop writes (baselines, evaluations, generations, best-model folders)
for a run of 8 seeds per generation over three base models, without merging or scoring anything.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from evoforge.evolve.records import (
    Baselines,
    EvaluationRecord,
    GenerationRecord,
    Scores,
    append_record,
    write_json_atomic,
)

DOMAINS = ["code", "math", "multilingual", "structured_data"]
SEEDS = [
    f"{a}-{b}-{c}" for a in ("linear", "slerp") for b in ("ties", "dare") for c in ("frankenmerge", "dfs")
]
BASES = {"alpha": 0.30, "beta": 0.42, "gamma": 0.25}  # fitness-split level of each base model


def scores(rng: random.Random, level: float) -> Scores:
    domains = {d: round(min(1.0, max(0.0, level + rng.uniform(-0.1, 0.1))), 4) for d in DOMAINS}
    return Scores(fitness=sum(domains.values()) / len(domains), domains=domains, tasks={})


LEVELS = [0.30, 0.45, 0.35]  # per generation: generation 1 peaks, so the run's best is not the last one's


def make_run(run_dir: Path, generations: int = 3, ancestor: float | None = None) -> list[EvaluationRecord]:
    """A run shaped like the loop's: 8 seeds, then per generation 6 mutants of the top 2 and 2 children of
    the bottom 6 in triples; candidate g001-c4 fails and g002-c7 is a cache hit of g001-c0.
    A new overall best gets a held-out line and a best-model folder. Returns the fitness-split records."""
    rng = random.Random(7)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        "name: synthetic\n" + ("ancestor: {name: root, path: /models/root}\n" if ancestor is not None else "")
    )
    models = {
        m: {"validation": scores(rng, lvl), "test": scores(rng, lvl - 0.02)} for m, lvl in BASES.items()
    }
    if ancestor is not None:
        models["root"] = {"validation": scores(rng, ancestor), "test": scores(rng, ancestor)}
    write_json_atomic(
        run_dir / "baselines.json",
        Baselines(fitness_split="validation", heldout_split="test", models=models).model_dump_json(),
    )
    evals: list[EvaluationRecord] = []
    population: list[tuple[str, list[str], str]] = [(label, [], "seed") for label in SEEDS]
    best_so_far = float("-inf")
    for gen in range(generations):
        records = []
        for i, (label, parents, operator) in enumerate(population):
            repeat = evals[8] if (gen, i) == (2, 7) else None
            genome_hash = (
                repeat.genome_hash if repeat else hashlib.sha256(f"{gen}/{i}".encode()).hexdigest()[:12]
            )
            cid = f"g{gen:03d}-c{i}-{genome_hash[:8]}"
            recipe = Path("candidates") / f"gen_{gen}" / f"{cid}.yaml"
            (run_dir / recipe).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / recipe).write_text(f"# {label}\nmerge_method: linear\n")
            failed = (gen, i) == (1, 4)
            s = repeat.scores if repeat else None if failed else scores(rng, LEVELS[gen] + 0.02 * i)
            rec = EvaluationRecord(
                id=cid,
                generation=gen,
                split="validation",
                genome_hash=genome_hash,
                label=label,
                operator=operator,
                parents=parents,
                recipe=str(recipe),
                fitness=0.0 if failed else s.fitness,
                scores=s,
                error="merge failed: tensor shapes differ\nTraceback ..." if failed else None,
                cached=repeat is not None,
                eval_s=1.5,
            )
            append_record(run_dir / "evaluations.jsonl", rec)
            records.append(rec)
        evals += records
        ok = [r for r in records if r.scores is not None]
        best = max(records, key=lambda r: r.fitness)
        heldout = model_dir = None
        if best.fitness > best_so_far:
            best_so_far = best.fitness
            heldout = scores(rng, best.fitness - 0.03)
            held_rec = best.model_copy(
                update={"split": "test", "fitness": heldout.fitness, "scores": heldout}
            )
            append_record(run_dir / "evaluations.jsonl", held_rec)
            model_dir = run_dir / f"gen_{gen}_best_model"
            model_dir.mkdir()
            (model_dir / "README.md").write_text(f"# {best.id}\n")
            (model_dir / "config.json").write_text("{}")
        append_record(
            run_dir / "generations.jsonl",
            GenerationRecord(
                generation=gen,
                best_id=best.id,
                best_hash=best.genome_hash,
                best_fitness=best.fitness,
                avg_fitness=sum(r.fitness for r in records) / len(records),
                population_size=len(records),
                domain_avg={d: sum(r.scores.domains[d] for r in ok) / len(ok) for d in DOMAINS},
                domain_best={d: max(r.scores.domains[d] for r in ok) for d in DOMAINS},
                best_heldout=heldout,
                best_model=model_dir.name if model_dir else None,
                wall_s=12.0,
            ),
        )
        ranked = sorted(records, key=lambda r: r.fitness, reverse=True)
        bottom = ranked[2:]
        rng.shuffle(bottom)
        population = [(r.label, [r.genome_hash], "mutation") for r in ranked[:2] for _ in range(3)]
        population += [
            (bottom[0].label, [r.genome_hash for r in bottom[k : k + 3]], "recombination") for k in (0, 3)
        ]
    return evals
