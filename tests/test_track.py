"""The run report and W&B logging, on a synthetic run directory written with the real record models."""

from __future__ import annotations

import hashlib
import json
import random
import struct
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from evoforge import EvolutionConfig, EvoMergePipeline
from evoforge.cli import app
from evoforge.evolve.records import (
    Baselines,
    EvaluationRecord,
    GenerationRecord,
    Scores,
    append_record,
    write_json_atomic,
)
from evoforge.evolve.run_dir import RUN_ID_FILE, Run
from evoforge.track.report import best_so_far, fresh_evaluations, write_report
from evoforge.track.wandb_log import WandbTracker

DOMAINS = ["code", "math", "multilingual", "structured_data"]
SEEDS = [
    f"{a}-{b}-{c}" for a in ("linear", "slerp") for b in ("ties", "dare") for c in ("frankenmerge", "dfs")
]
BASES = {"alpha": 0.30, "beta": 0.42, "gamma": 0.25}  # fitness-split level of each base model
runner = CliRunner()


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


def table_row(text: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row whose first cell starts with `first_cell`."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0].startswith(first_cell):
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r}")


def check_png(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert 400 <= w <= 6000 and 250 <= h <= 6000, (path.name, im.size)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100, f"{path.name} is blank"
    return w, h


def test_report_numbers_match_the_records(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evals = make_run(run_dir)
    paths = write_report(run_dir)
    assert [p.name for p in paths] == [
        "fitness.png",
        "domains.png",
        "lineage.png",
        "search.png",
        "summary.md",
    ]
    fresh = fresh_evaluations(Run.load(run_dir))
    curve = best_so_far(fresh)
    assert len(curve) == sum(e.split == "validation" and not e.cached for e in evals)
    assert curve == sorted(curve) and curve[-1] == max(e.fitness for e in evals if e.split == "validation")
    assert all(p.parent == run_dir / "report" for p in paths)
    for png in paths[:-1]:
        check_png(png)

    text = paths[-1].read_text()
    gens = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    best = max(evals, key=lambda e: e.fitness)
    assert best.generation == 1  # the fixture's peak: the run's best is not the last generation's
    assert gens[2]["best_fitness"] < best.fitness
    base = json.loads((run_dir / "baselines.json").read_text())["models"]
    base_val = max(base.values(), key=lambda s: s["validation"]["fitness"])["validation"]["fitness"]
    base_test = max(base.values(), key=lambda s: s["test"]["fitness"])["test"]["fitness"]
    assert base_val == base["beta"]["validation"]["fitness"]

    assert "# evoforge run `synthetic`" in text
    assert f"Best candidate: `{best.id}` — {best.label}, genome `{best.genome_hash}`" in text
    assert f"- Recipe: `{best.recipe}`\n" in text
    assert f"- Model: `gen_{best.generation}_best_model/`" in text
    assert "Generations: 3 (gen 0–2); evaluations: 24 (23 distinct genomes, 1 cached, 1 failed)" in text

    row = table_row(text, "validation (fitness)")
    assert row[1:4] == ["beta", f"{base_val:.4f}", f"{best.fitness:.4f}"]
    assert row[4] == f"{best.fitness - base_val:+.4f}"
    assert row[5] == f"{100 * (best.fitness - base_val) / base_val:+.2f}%"
    held_lines = [json.loads(x) for x in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    (held,) = [r["fitness"] for r in held_lines if r["split"] == "test" and r["id"] == best.id]
    row = table_row(text, "test (held-out)")
    assert row[3:6] == [
        f"{held:.4f}",
        f"{held - base_test:+.4f}",
        f"{100 * (held - base_test) / base_test:+.2f}%",
    ]

    row = table_row(text, f"**best: {best.id}**")
    assert row[1:] == [f"{best.fitness:.4f}", *(f"{best.scores.domains[d]:.4f}" for d in DOMAINS)]
    row = table_row(text, "gamma")
    assert row[2] == f"{base['gamma']['validation']['domains']['code']:.4f}"

    failed = next(e for e in evals if e.error)
    assert f"- `{failed.id}` (gen 1, {failed.label}): permanent: merge failed: tensor shapes differ" in text
    assert table_row(text, "1")[-1] == "1"  # the generations table counts it
    for name in ("fitness.png", "domains.png", "lineage.png", "search.png"):
        assert f"]({name})" in text


def test_lineage_is_exactly_the_ancestry_of_the_best(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    evals = make_run(run_dir)
    by_hash: dict[str, EvaluationRecord] = {}
    for e in evals:
        by_hash.setdefault(e.genome_hash, e)  # a cache hit keeps the genome's first parents
    best = max(evals, key=lambda e: e.fitness)
    expected, todo = set(), [best.genome_hash]
    while todo:
        h = todo.pop()
        expected.add(h)
        todo += by_hash[h].parents
    nodes = Run.load(run_dir).ancestry()
    assert set(nodes) == expected
    assert any(by_hash[h].operator == "seed" for h in nodes)
    assert len(nodes) < len(evals)  # candidates off the best's line are not drawn


def test_report_of_a_one_generation_run_with_ancestor(tmp_path: Path) -> None:
    """A run stopped after generation 0; the declared ancestor outscores every base model but is not
    the base model the improvement is measured against."""
    run_dir = tmp_path / "run"
    evals = make_run(run_dir, generations=1, ancestor=0.9)
    paths = write_report(run_dir)
    for png in paths[:-1]:
        check_png(png)
    text = paths[-1].read_text()
    assert "Generations: 1 (gen 0–0)" in text
    assert table_row(text, "validation (fitness)")[1] == "beta"
    assert table_row(text, "root (ancestor)")[1] != "not scored"
    best = max(evals, key=lambda e: e.fitness)
    assert f"`{best.id}`" in text


def test_report_when_every_candidate_failed(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir, generations=1)
    evals = [json.loads(x) for x in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    failed = [
        dict(e, fitness=0.0, scores=None, error="CUDA out of memory")
        for e in evals
        if e["split"] == "validation"
    ]
    (run_dir / "evaluations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in failed))
    gen = json.loads((run_dir / "generations.jsonl").read_text())
    gen.update(
        best_fitness=0.0, avg_fitness=0.0, domain_avg={}, domain_best={}, best_heldout=None, best_model=None
    )
    (run_dir / "generations.jsonl").write_text(json.dumps(gen) + "\n")
    paths = write_report(run_dir)
    for png in paths[:-1]:
        check_png(png)
    text = paths[-1].read_text()
    assert f"`{gen['best_id']}`" in text and "(it failed: CUDA out of memory)" in text
    assert "8 failed" in text and "- Model: not written" in text
    assert table_row(text, "test (held-out)")[3] == "not scored"


def test_report_cli(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir, generations=2)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert str(run_dir / "report" / "lineage.png") in result.output
    assert "## Improvement over the best base model" in result.output


@pytest.mark.parametrize(
    ("damage", "fragments"),
    [
        ("nothing", ["no such run directory"]),
        ("no generations", ["generations.jsonl", "missing"]),
        ("bad line", ["evaluations.jsonl:3", "fitness"]),
        ("bad baselines", ["baselines.json", "heldout_split", "missing"]),
        ("unknown best", ["generations.jsonl", "best_id", "no 'validation' evaluation"]),
    ],
)
def test_report_cli_refuses_a_malformed_run(tmp_path: Path, damage: str, fragments: list[str]) -> None:
    run_dir = tmp_path / "run"
    if damage != "nothing":
        make_run(run_dir, generations=1)
    evals, gens = run_dir / "evaluations.jsonl", run_dir / "generations.jsonl"
    if damage == "no generations":
        gens.unlink()
    elif damage == "bad line":
        lines = evals.read_text().splitlines()
        lines[2] = lines[2].replace('"fitness":', '"fitness":"high","x":', 1)
        evals.write_text("\n".join(lines) + "\n")
    elif damage == "bad baselines":
        (run_dir / "baselines.json").write_text('{"fitness_split": "validation", "models": {}}')
    elif damage == "unknown best":
        gens.write_text(gens.read_text().replace('"best_id":"g000-', '"best_id":"gone-', 1))
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2
    message = result.output.strip()
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message


def test_the_runs_best_is_one_candidate_after_an_interrupted_generation(tmp_path: Path) -> None:
    """A finished generation 3 whose best ties the run's best (a cache hit of it), then a generation 4 that
    a kill left half-evaluated with the highest fitness yet (a resume with `--gens 4` leaves it so). The
    run's best is the earliest candidate at the highest fitness of a finished generation: what `evoforge run`
    returns (`EvoMergePipeline.best`), what the report shows and what the best-model folder holds."""
    run_dir = tmp_path / "run"
    evals = make_run(run_dir)
    peak = max(evals, key=lambda e: e.fitness)
    again = peak.model_copy(update={"id": f"g003-c0-{peak.genome_hash[:8]}", "generation": 3, "cached": True})
    other = evals[-1].model_copy(
        update={"id": "g003-c1-0badc0de", "generation": 3, "genome_hash": "0badc0de"}
    )
    for rec in (again, other):
        append_record(run_dir / "evaluations.jsonl", rec)
    append_record(
        run_dir / "generations.jsonl",
        GenerationRecord(
            generation=3,
            best_id=again.id,
            best_hash=again.genome_hash,
            best_fitness=again.fitness,
            avg_fitness=(again.fitness + other.fitness) / 2,
            population_size=2,
            domain_avg={},
            domain_best={},
        ),
    )
    perfect = Scores(fitness=1.0, domains=dict.fromkeys(DOMAINS, 1.0), tasks={})
    half = other.model_copy(
        update={"id": "g004-c0-feedface", "generation": 4, "genome_hash": "feedface", "fitness": 1.0}
    )
    append_record(run_dir / "evaluations.jsonl", half.model_copy(update={"scores": perfect}))

    cfg = EvolutionConfig(
        base_models=[{"name": m, "path": f"/models/{m}"} for m in BASES], output_dir=str(run_dir)
    )
    best = EvoMergePipeline(cfg).best()
    assert (best.id, best.generation, best.overall_fitness) == (peak.id, 1, peak.fitness)
    assert best.model_path == str(run_dir / "gen_1_best_model")
    held = Run.load(run_dir).best_heldout
    assert held is not None and best.heldout_fitness == held.fitness
    text = write_report(run_dir)[-1].read_text()
    assert f"Best candidate: `{peak.id}`" in text and "- Model: `gen_1_best_model/`" in text


def test_report_skips_a_torn_last_line(tmp_path: Path) -> None:
    """A crash mid-write leaves half a line at the end; the report uses everything before it."""
    run_dir = tmp_path / "run"
    make_run(run_dir, generations=1)
    with (run_dir / "evaluations.jsonl").open("a") as fh:
        fh.write('{"id": "g1-00", "generation": 1, "genome_ha')
    assert "evaluations: 8 " in write_report(run_dir)[-1].read_text()


# --- W&B ---------------------------------------------------------------------------------------------


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a W&B header (":W&B", magic, version) and then the LevelDB
    log format — 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1)`, type FULL/FIRST/MIDDLE/
    LAST. wandb 0.31 ships no Python reader (its writer is in wandb-core, Go), so the test reads it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if not data:  # created, nothing flushed yet
        return
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        assert kind in (1, 2, 3, 4), f"bad chunk type {kind} at {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_runs(run_dir: Path) -> list[dict]:
    """Each offline run folder → its id, config, history rows by step and artifacts.

    `run.finish()` returns before wandb-core (another process) has flushed the file, so wait for the run's
    `exit` record, its last."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (wandb_file,) = folder.glob("run-*.wandb")
        deadline = time.monotonic() + 15
        while (
            not (records := list(wandb_records(wandb_file)))
            or records[-1].WhichOneof("record_type") != "exit"
        ):
            assert time.monotonic() < deadline, f"{wandb_file} never got its exit record"
            time.sleep(0.05)
        run: dict = {"config": {}, "history": {}, "artifacts": []}
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["project"], run["name"] = rec.run.run_id, rec.run.project, rec.run.display_name
                for item in rec.run.config.update:
                    run["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                run["history"][row["_step"]] = row
            elif kind == "artifact":
                run["artifacts"].append(rec.artifact)
        out.append(run)
    return out


def test_wandb_offline_run_holds_history_config_and_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir)
    gens = [
        GenerationRecord.model_validate_json(x)
        for x in (run_dir / "generations.jsonl").read_text().splitlines()
    ]
    config = {"population_size": 8, "mutation_rate": 0.15, "evaluation_weights": {"code": 0.25, "math": 0.75}}
    tracker = WandbTracker(run_dir, "evoforge-test", "offline", config, run_name="synthetic")
    for g in gens[:2]:
        tracker.log_generation(g)
    tracker.log_best_model(
        1, run_dir / "gen_1_best_model", {"fitness": gens[1].best_fitness, "id": gens[1].best_id}
    )
    tracker.finish()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert run_id == tracker.run_id

    # A resumed run (a new tracker on the same folder) appends generation 2 to the same W&B run.
    with WandbTracker(run_dir, "evoforge-test", "offline", config, run_name="synthetic") as resumed:
        resumed.log_generation(gens[2])
    assert resumed.local_dir is not None and resumed.local_dir.parent == run_dir / "wandb"
    assert (resumed.local_dir / f"run-{run_id}.wandb").is_file()
    first, second = read_offline_runs(run_dir)
    assert first["id"] == second["id"] == run_id
    assert first["project"] == "evoforge-test" and first["name"] == "synthetic"
    assert first["config"]["mutation_rate"] == 0.15
    assert first["config"]["evaluation_weights"] == {"code": 0.25, "math": 0.75}

    history = first["history"] | second["history"]
    assert sorted(history) == [0, 1, 2]
    for g in gens:
        row = history[g.generation]
        assert row["generation"] == g.generation
        assert row["best_fitness"] == pytest.approx(g.best_fitness)
        assert row["avg_fitness"] == pytest.approx(g.avg_fitness)
        assert row["population_size"] == 8
        if g.best_heldout is None:
            assert "best_heldout_fitness" not in row
        else:
            assert row["best_heldout_fitness"] == pytest.approx(g.best_heldout.fitness)
        for d in DOMAINS:
            assert row[f"{d}_avg"] == pytest.approx(g.domain_avg[d])
            assert row[f"{d}_best"] == pytest.approx(g.domain_best[d])

    (artifact,) = first["artifacts"]
    assert (artifact.name, artifact.type) == ("model_gen_1", "model")
    assert json.loads(artifact.metadata) == {"fitness": gens[1].best_fitness, "id": gens[1].best_id}
    files = {c.path: c for c in artifact.manifest.contents}
    assert set(files) == {"README.md", "config.json"}
    # referenced in place, not copied to a staging area
    assert Path(files["README.md"].local_path) == run_dir / "gen_1_best_model" / "README.md"


def test_wandb_disabled_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = WandbTracker(run_dir, "p", "disabled", {"a": 1}, run_name="x")
    tracker.log_generation(
        GenerationRecord(
            generation=0,
            best_id="a",
            best_hash="h",
            best_fitness=0.1,
            avg_fitness=0.1,
            population_size=8,
            domain_avg={},
            domain_best={},
        )
    )
    tracker.log_best_model(0, run_dir, {})
    tracker.finish()
    assert tracker.run_id is None and tracker.local_dir is None
    assert list(run_dir.iterdir()) == []
