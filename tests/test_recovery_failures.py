"""Failure recovery (issue 14), failure kinds: out of memory retried at half the batch size, transient
failures evaluated again on resume, permanent ones scored 0 for good, a failed best-model save written
later; and "what is scored is what is saved"."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import recovery_runs_support as runs
import torch
from recovery_runs_support import (
    Killed,
    assert_resumes_to_straight,
    cli,
    error_line,
    failing,
    trace,
    write_run,
)
from recovery_support import install_synthetic

from evoforge.config import EvolutionConfig
from evoforge.evolve.records import EvaluationRecord, GenerationRecord, read_records

# The shared fixtures, bound here so that pytest finds them (module scope: one uninterrupted run here).
run_file_data, straight, synthetic = runs.run_file_data, runs.straight, runs.synthetic


# ---------------------------------------------------------------------------------------------- failure kinds


def test_out_of_memory_is_retried_once_at_half_the_batch_size(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    halved: list[int] = []
    monkeypatch.setattr(synthetic, "halve_batch_size", lambda self: halved.append(1) or True, raising=False)

    def fault(n: int, recipe: str) -> None:
        if n == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    calls = failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    result = cli("run", str(run_file))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert calls[2] == calls[3] and halved == [1]  # the same recipe again, at half the batch size
    assert trace(run_dir) == straight


def test_the_candidate_evaluator_halves_lm_evals_batch_size_down_to_1(run_file_data, tmp_path):
    from evoforge.evolve.candidates import CandidateEvaluator

    cfg = EvolutionConfig(**{**run_file_data, "merge_path": "disk"})
    evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), tmp_path / "work")
    assert evaluator.scorer.lm.batch_size == 16
    assert [evaluator.halve_batch_size() for _ in range(5)] == [True] * 4 + [False]
    assert evaluator.scorer.lm.batch_size == 1


def test_out_of_memory_first_stops_merging_ahead_then_halves_the_batch(run_file_data, tmp_path):
    from evoforge.evolve.candidates import CandidateEvaluator

    cfg = EvolutionConfig(**{**run_file_data, "overlap_merges": True})
    evaluator = CandidateEvaluator(cfg, cfg.resolve(cfg.base_models[0]), tmp_path / "work")
    assert evaluator.overlap and evaluator.halve_batch_size()
    assert not evaluator.overlap and evaluator.scorer.lm.batch_size == 16
    assert evaluator.halve_batch_size() and evaluator.scorer.lm.batch_size == 8


def test_a_transient_failure_is_recorded_and_evaluated_again_on_resume(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    """A model folder gone in generation 1: its candidates fail twice each (the retry), are recorded as
    transient and the run is killed; once the folder is back, the resume scores them (not a cached 0)."""

    def fault(n: int, recipe: str) -> None:
        if n >= 14:
            raise Killed
        if n >= 10:
            raise FileNotFoundError(
                errno.ENOENT, "No such file or directory", "/models/beta/model.safetensors"
            )

    failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with pytest.raises(Killed):
        cli("run", str(run_file))
    failed = [r for r in read_records(run_dir / "evaluations.jsonl", EvaluationRecord) if r.error]
    assert len(failed) == 2 and all(r.error_kind == "transient" and r.fitness == 0.0 for r in failed)
    assert "No such file or directory" in failed[0].error
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)


def test_a_permanent_failure_scores_0_for_good_with_its_reason_in_the_report(
    run_file_data, synthetic, monkeypatch, tmp_path
):
    bad: list[str] = []

    def fault(n: int, recipe: str) -> None:
        if n == 4 or recipe in bad:
            bad.append(recipe)
            raise ValueError("recipe: slices.0.parameters.weight: nan is not a finite number")
        if n == 7:
            raise Killed

    calls = failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    with pytest.raises(Killed):
        cli("run", str(run_file))
    assert calls.count(bad[0]) == 1  # not retried
    result = cli("run", "--resume", str(run_dir))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert calls.count(bad[0]) == 1  # nor evaluated again on resume
    failed = [r for r in read_records(run_dir / "evaluations.jsonl", EvaluationRecord) if r.error]
    assert [(r.generation, r.error_kind, r.fitness) for r in failed] == [(0, "permanent", 0.0)]
    summary = (run_dir / "report" / "summary.md").read_text()
    assert (
        f"- `{failed[0].id}` (gen 0, {failed[0].label}): permanent: ValueError: recipe: slices.0" in summary
    )


def test_every_candidate_failing_transiently_stops_the_run_for_a_resume(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    def fault(n: int, recipe: str) -> None:
        if n >= 10:
            raise OSError(errno.EIO, "Input/output error")

    failing(synthetic, monkeypatch, fault)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    error = error_line(cli("run", str(run_file)))
    assert "generation 1: every candidate failed (OSError: [Errno 5] Input/output error)" in error
    assert "--resume" in error
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)


def test_a_failed_best_model_save_is_recorded_and_written_later(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    def full(self, recipe: str, seed: int, out_dir: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "merge", full)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    result = cli("run", str(run_file))
    assert result.exit_code == 0, result.output + str(result.exception)  # the run went on
    assert (
        "model: not written (OSError: [Errno 28] No space left on device); --resume writes it"
        in result.stdout
    )
    gens = list(read_records(run_dir / "generations.jsonl", GenerationRecord))
    unsaved = [g for g in gens if g.best_heldout]
    assert unsaved and all(g.best_model is None and "No space left" in g.best_model_error for g in unsaved)
    assert (
        "not written: OSError: [Errno 28] No space left on device"
        in (run_dir / "report" / "summary.md").read_text()
    )
    monkeypatch.undo()
    install_synthetic()
    assert_resumes_to_straight(run_dir, straight)  # every new best's folder, no error left


def test_a_best_model_save_failing_once_is_retried_at_the_next_new_best(
    run_file_data, synthetic, monkeypatch, straight, tmp_path
):
    real, attempts = synthetic.merge, []

    def once_full(self, recipe: str, seed: int, out_dir: Path) -> Path:
        attempts.append(out_dir.name)
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, recipe, seed, out_dir)

    monkeypatch.setattr(synthetic, "merge", once_full)
    run_file, run_dir = write_run(tmp_path, run_file_data)
    result = cli("run", str(run_file))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert attempts[:2] == [attempts[0], attempts[0]]  # the failed one first, before (or without) the next
    assert trace(run_dir) == straight


# ------------------------------------------------------------------------------------- scored == saved


def test_the_best_model_is_built_from_the_recipe_text_that_was_scored(
    run_file_data, synthetic, monkeypatch, tmp_path
):
    """Each candidate's YAML is edited right after it is scored: the saved model and its recipe are the
    text that was scored, on both splits, not the file as it is now."""
    run_file, run_dir = write_run(tmp_path, run_file_data)
    real = synthetic.score_recipe

    def then_edit(self, recipe: str, seed: int, split: str):
        out = real(self, recipe, seed, split)
        for path in (run_dir / "candidates").rglob("*.yaml"):
            if path.read_text() == recipe:
                path.write_text(recipe + "# edited after scoring\n")
        return out

    monkeypatch.setattr(synthetic, "score_recipe", then_edit)
    assert cli("run", str(run_file)).exit_code == 0
    saved = sorted(run_dir.glob("gen_*_best_model"))
    assert saved
    for folder in saved:
        text = (folder / "evoforge_recipe.yaml").read_text()
        assert (folder / "mergekit_config.yml").read_text() == text
        assert [split for t, split in synthetic.scored if t == text] == ["validation", "test"]
        assert "edited" not in text
