"""The run report (`write_report`, `evoforge report`): its numbers, plots and lineage against the records,
short and failed runs, malformed run directories and the run's best after an interrupted generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from track_support import BASES, DOMAINS, make_run
from typer.testing import CliRunner

from evoforge import EvolutionConfig, EvoMergePipeline
from evoforge.cli import app
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, Scores, append_record
from evoforge.evolve.run_dir import Run
from evoforge.track.report import best_so_far, fresh_evaluations, write_report

runner = CliRunner()


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
    assert table_row(text, "1")[-2:] == ["12.0", "1"]  # the generations table: its seconds, and counts it
    lines = (run_dir / "evaluations.jsonl").read_text().splitlines()
    held = [line for line in lines if '"split":"test"' in line]
    assert held  # the fixture's new bests
    assert (  # 23 fresh candidates (one failed, one cached left out) in 3 generations of 12 s
        "- Throughput: 23 candidates merged and scored in 36 s of generations, 2300 an hour; a candidate's "
        f"merge on the critical path 0.00 s, its scoring 1.50 s (medians); {len(held)} held-out passes of new "
        f"bests, {1.5 * len(held):.0f} s\n" in text
    )
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


def test_runs_recorded_without_times_get_no_throughput_line(tmp_path: Path) -> None:
    """Records from before generation times were kept (`wall_s` 0): no candidates-an-hour figure is made up."""
    run_dir = tmp_path / "run"
    make_run(run_dir)
    gens = run_dir / "generations.jsonl"
    gens.write_text(gens.read_text().replace('"wall_s":12.0', '"wall_s":0.0'))
    assert '"wall_s":0.0' in gens.read_text()
    text = write_report(run_dir)[-1].read_text()
    assert "Throughput" not in text and "Generations: 3 (gen 0–2)" in text
