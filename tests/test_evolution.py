"""The generational loop: selection scheme, plateau, real runs end to end, resume, and SIGKILL recovery."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from evolution_support import run_config
from safetensors.torch import load_file
from test_executors import run_files
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from evoforge import BaseModelConfig, EvolutionConfig, EvoMergePipeline
from evoforge.cli import app
from evoforge.config import load_config
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.evolve.checkpoint import Member
from evoforge.evolve.loop import members, plateaued
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, read_records
from evoforge.evolve.run_dir import best_seed
from evoforge.evolve.strategies.base import seed_proposals
from evoforge.evolve.strategies.ga import next_round, parent_weights
from evoforge.genome import GenomeSpace
from evoforge.merge.disk import merge_recipe
from evoforge.recipe import random_seed

SPACE = GenomeSpace(models=("alpha", "beta", "gamma"), paths=("/m/a", "/m/b", "/m/c"), num_layers=6)


def test_next_generation_is_the_top_two_their_six_mutants_and_two_children_of_the_next_six():
    cfg = EvolutionConfig(base_models=[{"name": n, "path": f"/m/{n}"} for n in SPACE.models])
    population = seed_proposals(cfg, SPACE)
    fitness = [0.1, 0.9, 0.3, 0.8, 0.2, 0.4, 0.5, 0.0]
    ranked = sorted(zip(population, fitness), key=lambda mf: -mf[1])
    nxt = next_round(ranked, cfg, SPACE, random.Random(0), {m.genome.hash for m in population})
    assert len(nxt) == 10
    elites, mutants, children = nxt[:2], nxt[2:8], nxt[8:]
    assert [e.genome for e in elites] == [population[1].genome, population[3].genome]
    assert all(e.operator == "elite" for e in elites)
    assert all(m.operator == "mutation" for m in mutants) and all(
        c.operator == "recombination" for c in children
    )
    top = [population[1].genome.hash, population[3].genome.hash]
    assert sorted(m.parents[0] for m in mutants) == sorted(top * 3)
    bottom = {m.genome.hash for m, _ in ranked[2:]}
    used = [p for c in children for p in c.parents]
    assert len(used) == 6 and set(used) == bottom  # two disjoint triples covering the bottom six
    assert len({m.genome.hash for m in nxt}) == 10 and not {m.genome.hash for m in mutants} & set(top)
    again = next_round(ranked, cfg, SPACE, random.Random(0), {m.genome.hash for m in population})
    assert [m.genome for m in again] == [m.genome for m in nxt]


def test_selection_pressure_moves_children_towards_fitter_parents():
    assert parent_weights([0.6, 0.3, 0.1], 0.0) == pytest.approx([1 / 3] * 3)
    assert parent_weights([0.6, 0.3, 0.1], 1.0) == pytest.approx([0.6, 0.3, 0.1])
    assert parent_weights([0.6, 0.3, 0.1], 0.5) == pytest.approx(
        [0.6 / 2 + 1 / 6, 0.3 / 2 + 1 / 6, 0.1 / 2 + 1 / 6]
    )
    assert parent_weights([0.0, 0.0, 0.0], 0.7) == pytest.approx([1 / 3] * 3)


def test_plateau_needs_patience_generations_below_threshold():
    assert not plateaued([0.5, 0.5], patience=2, threshold=0.01)
    assert plateaued([0.5, 0.5, 0.502], patience=2, threshold=0.01)
    assert not plateaued([0.5, 0.5, 0.6], patience=2, threshold=0.01)


def write_run(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def fitness_trace(run_dir: Path) -> list[tuple]:
    """What must not depend on interruptions: every candidate's genome and fitness, per generation."""
    recs = read_records(run_dir / "evaluations.jsonl", EvaluationRecord)
    return sorted((r.generation, r.id, r.split, r.genome_hash, round(r.fitness, 9)) for r in recs)


def assert_summary_names_the_best(
    stdout: str, run_dir: Path, records: list[EvaluationRecord], baselines: dict
) -> None:
    """The closing lines name the fittest candidate, its gain over the best base model, its held-out score,
    how it compares with the best seed, and where its model and recipe are: the numbers the run's records
    hold."""
    found = re.search(
        r"^best (\S+) \((\S+)\): fitness ([\d.]+) \(([+-][\d.]+)% vs (\S+)\), held-out ([\d.]+)"
        r".*\n(vs best seed (\S+) on held-out: .*|the best is the fittest seed: .*)\nmodel: (.+)\nrecipe: (.+)$",
        stdout,
        re.MULTILINE,
    )
    assert found, stdout
    best_id, label, fitness, gain, base, held, versus, seed_id, model, recipe = found.groups()
    fit = {r.id: r for r in records if r.split == "validation" and r.scores}
    seed = best_seed(records, "validation")
    assert seed_id == seed.id if versus.startswith("vs") else seed.genome_hash == fit[best_id].genome_hash
    assert fit[best_id].label == label and fit[best_id].fitness == max(r.fitness for r in fit.values())
    assert float(fitness) == pytest.approx(fit[best_id].fitness, abs=5e-5)
    base_fitness = {name: s["validation"]["fitness"] for name, s in baselines["models"].items()}
    assert base_fitness[base] == max(base_fitness.values())
    expected_gain = (fit[best_id].fitness - base_fitness[base]) / abs(base_fitness[base])
    assert float(gain) == pytest.approx(100 * expected_gain, abs=0.05)
    test = next(r for r in records if r.split == "test" and r.genome_hash == fit[best_id].genome_hash)
    assert float(held) == pytest.approx(test.fitness, abs=5e-5)
    assert (Path(model) / "config.json").is_file() and Path(model).is_relative_to(run_dir)
    assert Path(recipe) == run_dir / fit[best_id].recipe and Path(recipe).is_file()


@pytest.mark.slow
def test_evoforge_run_end_to_end(diverse_family, mc_tasks, tmp_path):
    run_dir = tmp_path / "run"
    run_file = write_run(
        tmp_path / "run.yaml", run_config(diverse_family, mc_tasks, run_dir, max_generations=3)
    )
    result = CliRunner().invoke(app, ["run", str(run_file), "--wandb", "offline", "--seed", "5"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert load_config(run_dir / "config.yaml").seed == 5
    for gen, size in enumerate((8, 10, 10)):  # the seeds, then 2 elites + 6 mutants + 2 children
        recipes = sorted((run_dir / "candidates" / f"gen_{gen}").glob("*.yaml"))
        assert len(recipes) == size and all(r.read_text().startswith("# evoforge candidate") for r in recipes)
    records = list(read_records(run_dir / "evaluations.jsonl", EvaluationRecord))
    fit = [r for r in records if r.split == "validation"]
    assert len(fit) == 28 and {r.generation for r in fit} == {0, 1, 2}
    assert {r.operator for r in fit if r.generation > 0} == {"elite", "mutation", "recombination"}
    assert all(r.cached for r in fit if r.operator == "elite")
    assert all(r.scores and set(r.scores.domains) == {"math", "multilingual"} for r in fit if not r.error)
    assert len({r.fitness for r in fit}) > 1, "candidates should differ in fitness"
    gens = list(read_records(run_dir / "generations.jsonl", GenerationRecord))
    assert [g.generation for g in gens] == [0, 1, 2]
    assert gens[-1].best_fitness == max(r.fitness for r in fit if r.generation == 2)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        f"evolution_checkpoint_gen_{n}.json" for n in range(4)
    ]
    baselines = json.loads((run_dir / "baselines.json").read_text())
    assert set(baselines["models"]) == {"alpha", "beta", "gamma", "ancestor"}
    assert_summary_names_the_best(result.stdout, run_dir, records, baselines)
    best_models = sorted(run_dir.glob("gen_*_best_model"))
    assert best_models and all(g.best_model for g in gens if g.best_heldout)
    card = (best_models[-1] / "README.md").read_text()
    assert "## Lineage" in card and "## Recipe" in card and "(held out)" in card
    AutoModelForCausalLM.from_pretrained(best_models[-1])
    text = (best_models[-1] / "mergekit_config.yml").read_text()  # what its YAML makes with mergekit
    again = merge_recipe(text, tmp_path / "again", device="cpu", random_seed=random_seed(text))
    saved, expected = (load_file(folder / "model.safetensors") for folder in (best_models[-1], again))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], t) for k, t in expected.items())
    assert list((run_dir / "wandb").glob("offline-run-*"))

    report = CliRunner().invoke(app, ["report", str(run_dir)])
    assert report.exit_code == 0, report.output
    assert {"fitness.png", "domains.png", "lineage.png", "summary.md"} <= {
        p.name for p in (run_dir / "report").iterdir()
    }


@pytest.mark.slow
def test_python_api(diverse_family, mc_tasks, tmp_path):
    data = run_config(diverse_family, mc_tasks, tmp_path / "api", max_generations=1, wandb_mode="disabled")
    data["base_models"] = [BaseModelConfig(**m) for m in data["base_models"]]
    best = asyncio.run(EvoMergePipeline(EvolutionConfig(**data)).run_evolution())
    assert Path(best.model_path).is_dir() and 0.0 <= best.overall_fitness <= 1.0
    assert best.heldout_fitness is not None and best.id.startswith("g000-")


SMALL = {"population_size": 5, "mutation_rate": 0.3, "wandb_mode": "disabled"}


@pytest.fixture(scope="module")
def straight_runs(diverse_family, mc_tasks, tmp_path_factory):
    """strategy → four generations, uninterrupted: the reference for resume and SIGKILL (made on first use)."""
    runs: dict[str, Path] = {}

    def get(strategy: str) -> Path:
        if strategy not in runs:
            root = tmp_path_factory.mktemp(f"straight_{strategy}")
            data = run_config(diverse_family, mc_tasks, root / "run", max_generations=4, **SMALL)
            EvoMergePipeline(EvolutionConfig(**data, search={"strategy": strategy})).run()
            runs[strategy] = root / "run"
        return runs[strategy]

    return get


@pytest.fixture(scope="module")
def straight_run(straight_runs) -> Path:
    return straight_runs("ga")


@pytest.mark.slow
def test_two_plus_resume_two_equals_four(straight_run, diverse_family, mc_tasks, tmp_path):
    run_dir = tmp_path / "run"
    run_file = write_run(
        tmp_path / "run.yaml", run_config(diverse_family, mc_tasks, run_dir, max_generations=2, **SMALL)
    )
    assert CliRunner().invoke(app, ["run", str(run_file)]).exit_code == 0
    checkpoint = run_dir / "checkpoints" / "evolution_checkpoint_gen_2.json"
    result = CliRunner().invoke(app, ["run", "--resume", str(checkpoint), "--gens", "4"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert fitness_trace(run_dir) == fitness_trace(straight_run)
    a = list(read_records(run_dir / "generations.jsonl", GenerationRecord))
    b = list(read_records(straight_run / "generations.jsonl", GenerationRecord))
    assert [(g.best_hash, g.best_fitness) for g in a] == [(g.best_hash, g.best_fitness) for g in b]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ga", "cmaes", "random"])
def test_sigkill_at_random_points_resumes_to_the_same_result(
    strategy, straight_runs, diverse_family, mc_tasks, tmp_path
):
    straight_run = straight_runs(strategy)
    run_dir = tmp_path / "run"
    data = run_config(diverse_family, mc_tasks, run_dir, max_generations=4, **SMALL)
    run_file = write_run(tmp_path / "run.yaml", {**data, "search": {"strategy": strategy}})
    evaluations = run_dir / "evaluations.jsonl"
    rng = random.Random(11)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "evoforge", "run", str(run_file)]
    for kill_after in sorted(rng.sample(range(2, 20), 2)):
        proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            lines = evaluations.read_text().count("\n") if evaluations.exists() else 0
            if lines >= kill_after:
                time.sleep(rng.uniform(0.0, 1.5))  # somewhere inside the next merge or evaluation
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait()
        args = [sys.executable, "-m", "evoforge", "run", "--resume", str(run_dir)]
    final = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    assert fitness_trace(run_dir) == fitness_trace(straight_run)
    fresh = [r for r in read_records(evaluations, EvaluationRecord) if not r.cached]
    keys = [(r.genome_hash, r.split) for r in fresh]
    assert len(keys) == len(set(keys)), "a finished evaluation was run again"


@pytest.mark.slow
def test_merging_the_next_candidate_while_scoring_gives_the_same_run(
    straight_run, diverse_family, mc_tasks, tmp_path, monkeypatch
):
    """`overlap_merges` on the CPU (the default turns it on for GPUs only): every record, checkpoint and the
    best model are those of merges one after another, and most candidates were merged ahead."""
    merged_ahead, written = [], []
    merge_ahead, write_ahead = CandidateEvaluator._merge_ahead, CandidateEvaluator._write_ahead
    monkeypatch.setattr(
        CandidateEvaluator, "_merge_ahead", lambda self, a: merged_ahead.append(a) or merge_ahead(self, a)
    )
    monkeypatch.setattr(
        CandidateEvaluator, "_write_ahead", lambda self, a: written.append(a) or write_ahead(self, a)
    )
    data = run_config(diverse_family, mc_tasks, tmp_path / "run", max_generations=4, **SMALL)
    EvoMergePipeline(EvolutionConfig(**data, overlap_merges=True)).run()
    assert run_files(tmp_path / "run") == run_files(straight_run)
    saved = sorted(straight_run.glob("gen_*_best_model/*.safetensors"))
    assert saved
    for expected_file in saved:
        best = load_file(tmp_path / "run" / expected_file.relative_to(straight_run))
        expected = load_file(expected_file)
        assert best.keys() == expected.keys() and all(torch.equal(best[k], t) for k, t in expected.items())
    assert len(written) >= len(merged_ahead) - 4 > 10  # only a round's last merge ahead can go unused
    assert all(a.error is None for a in merged_ahead)


@pytest.mark.slow
def test_malformed_resume_files(straight_run, diverse_family, mc_tasks, tmp_path):
    good = straight_run / "checkpoints" / "evolution_checkpoint_gen_2.json"
    text = good.read_text()
    data = json.loads(text)
    other = run_config(
        diverse_family, mc_tasks, straight_run, max_generations=4, **{**SMALL, "mutation_rate": 0.5}
    )
    cases = {
        "truncated.json": (text[: len(text) // 2], "not a complete checkpoint"),
        "version.json": (json.dumps({**data, "version": 99}), "version"),
        "garbage.json": (json.dumps({**data, "population": "x"}), "population"),
    }
    run_file = write_run(tmp_path / "other.yaml", other)
    for name, (content, fragment) in cases.items():
        bad = tmp_path / name
        bad.write_text(content)
        result = CliRunner().invoke(app, ["run", str(straight_run / "config.yaml"), "--resume", str(bad)])
        assert result.exit_code == 2 and fragment in result.stderr and result.stderr.count("\n") == 1, (
            result.stderr
        )
    result = CliRunner().invoke(app, ["run", str(run_file), "--resume", str(good)])
    assert result.exit_code == 2 and "another run configuration" in result.stderr


def test_members_round_trip_through_checkpoint_json():
    cfg = EvolutionConfig(base_models=[{"name": n, "path": f"/m/{n}"} for n in SPACE.models])
    seeds = members(0, seed_proposals(cfg, SPACE))
    assert [Member.model_validate_json(m.model_dump_json()) for m in seeds] == seeds


@pytest.mark.slow
def test_forge_evo_is_the_seed_documents_spelling(diverse_family, mc_tasks, tmp_path):
    from evoforge.cli import forge_app

    data = run_config(diverse_family, mc_tasks, tmp_path / "unused", max_generations=1, **SMALL)
    config = tmp_path / "evo.json"
    config.write_text(json.dumps(data))
    out = tmp_path / "evo_run"
    result = CliRunner().invoke(
        forge_app, ["evo", "--config", str(config), "--gens", "1", "--output-dir", str(out)]
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    assert (out / "checkpoints" / "evolution_checkpoint_gen_1.json").exists()
    checkpoint = out / "checkpoints" / "evolution_checkpoint_gen_1.json"
    resumed = CliRunner().invoke(forge_app, ["evo", "--resume", str(checkpoint), "--gens", "1"])
    assert resumed.exit_code == 0, resumed.output + str(resumed.exception)
    unknown = CliRunner().invoke(forge_app, ["evo", "--config", str(config), "--base-models", "alpha,nope"])
    assert unknown.exit_code == 2 and "'nope'" in unknown.stderr
