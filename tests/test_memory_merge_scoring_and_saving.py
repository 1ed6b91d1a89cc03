"""The memory path in a run: `CandidateEvaluator` scores candidates as the disk loop does, and a best model
saved from memory is the disk path's folder (what it refuses leaves nothing behind)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from evolution_support import run_config, space_of, write_mc_tasks
from memory_merge_support import candidates, deep_dfs
from safetensors.torch import load_file

from evoforge.config import EvolutionConfig, MergeOperators
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.genome import seed_genomes
from evoforge.merge.disk import merge_recipe
from evoforge.merge.memory import NotInMemory
from evoforge.merge.save import save_merged
from evoforge.recipe import random_seed, render


@pytest.mark.slow
def test_memory_loop_scores_candidates_as_the_disk_loop_does(
    qwen_family, unrelated_qwen_family, tmp_path, monkeypatch
):
    tasks = write_mc_tasks(tmp_path / "tasks", items=4)
    evaluators = {
        path: CandidateEvaluator(
            EvolutionConfig.model_validate(run_config(qwen_family, tasks, tmp_path / path, merge_path=path)),
            str(qwen_family["alpha"]),
            tmp_path / path / ".work",
        )
        for path in ("memory", "disk")
    }
    assert evaluators["disk"].memory is None
    space = space_of(qwen_family, ancestor=True)  # run_config declares the ancestor
    genomes = candidates(space, with_seeds=True, mutants=0)
    a, unrelated = qwen_family["alpha"], unrelated_qwen_family["alpha"]
    foreign = (  # not over the run's models: the memory path hands it to the disk path
        f"merge_method: linear\nbase_model: {a}\ndtype: float32\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.5}}}}\n  - {{model: {unrelated}, parameters: {{weight: 0.5}}}}\n"
    )
    with pytest.raises(NotInMemory):
        evaluators["memory"].memory.merge(foreign)
    deep, shallow = (render(genomes[k], space) for k in ("deep-dfs", "linear-ties-frankenmerge"))
    overlap = CandidateEvaluator(  # each next candidate merged while one is scored (ahead, in a thread)
        EvolutionConfig.model_validate(
            run_config(qwen_family, tasks, tmp_path / "overlap", merge_path="memory", overlap_merges=True)
        ),
        str(qwen_family["alpha"]),
        tmp_path / "overlap" / ".work",
    )
    texts, ahead = [deep, shallow, foreign, shallow], []
    for text, then in zip(texts, [*texts[1:], None], strict=True):  # 9 layers, then 6; foreign: refused ahead
        seed = random_seed(text) or 0
        memory, disk = (evaluators[p].score_recipe(text, seed, "validation") for p in ("memory", "disk"))
        assert memory[0] == disk[0] and memory[1] > 0 and memory[2] > 0
        merged = overlap._ahead
        ahead.append(merged and (merged.key[0], merged.error is None))
        following = then and (then, random_seed(then) or 0)
        assert overlap.score_recipe(text, seed, "validation", then=following)[0] == disk[0]
        if text == deep:  # the held-out pass of a new best comes between: the one merged ahead waits
            overlap.result(text, seed, "test")
    assert ahead == [None, (shallow, True), (foreign, False), None]  # after the disk path, nothing ahead
    assert not any((tmp_path / "memory" / ".work").glob("candidate-*"))
    for label, text in (("deep", deep), ("foreign", foreign)):  # best models: from memory, else from disk
        seed = random_seed(text) or 0
        saved = {
            p: read_folder(evaluators[p].merge(text, seed, tmp_path / f"{p}-{label}"))[0] for p in evaluators
        }
        assert saved["memory"].keys() == saved["disk"].keys()
        assert all(torch.equal(saved["memory"][k], t) for k, t in saved["disk"].items())
    # a candidate just scored (the loop's held-out pass of a new best) is saved from the Scorer's weights
    memory = evaluators["memory"]
    memory.score_recipe(deep, random_seed(deep) or 0, "validation")
    with monkeypatch.context() as patch:
        patch.setattr(memory.memory, "merge", lambda *a, **k: pytest.fail("merged again"))
        again = memory.merge("# best of generation 0\n" + deep, random_seed(deep) or 0, tmp_path / "again")
    (expected, _), (got, files) = read_folder(tmp_path / "disk-deep"), read_folder(again)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], t) for k, t in expected.items())
    assert files["mergekit_config.yml"].startswith(b"# best of generation 0")
    memory.score_recipe(shallow, random_seed(shallow) or 0, "validation")
    merges = Counter()
    with monkeypatch.context() as patch:
        merge = memory.memory.merge
        patch.setattr(memory.memory, "merge", lambda *a, **k: merges.update(["merge"]) or merge(*a, **k))
        memory.merge(deep, random_seed(deep) or 0, tmp_path / "again")
    assert merges["merge"] == 1


def read_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, bytes]]:
    """A model folder's tensors (every shard) and its other files' bytes."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in folder.glob("*.safetensors"):
        tensors.update(load_file(shard))
    files = {f.name: f.read_bytes() for f in folder.iterdir() if f.suffix != ".safetensors"}
    return tensors, files


def test_a_candidate_saved_from_memory_is_the_disk_paths_folder(qwen_family, mergers, tmp_path):
    """`CandidateEvaluator.merge` (the run's best models) writes from memory what `merge_recipe` writes: the
    same tensors, config.json, tokenizer and generation config, the recipe as mergekit_config.yml."""
    space = space_of(qwen_family, False)
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    for label, genome in {
        "deep": deep_dfs(seeds["slerp-dare-dfs"]),
        "ties": seeds["linear-ties-frankenmerge"],
    }.items():
        text = render(genome, space)
        seed = random_seed(text)
        disk = merge_recipe(text, tmp_path / f"disk-{label}", device="cpu", random_seed=seed)
        saved = save_merged(mergers["qwen"], text, tmp_path / f"memory-{label}", random_seed=seed)
        (expected, expected_files), (got, got_files) = read_folder(disk), read_folder(saved)
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1.3e-6, atol=1e-6, msg=f"{label}: {name}")
        del expected_files["README.md"]  # mergekit's card of the final stage; evoforge writes its own
        assert got_files == expected_files
        assert {"config.json", "tokenizer.json", "generation_config.json"} <= got_files.keys()
        assert got_files["mergekit_config.yml"] == text.encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "disk-deep",
        "disk-ties",
        "memory-deep",
        "memory-ties",
    ]  # no staging folder left


def test_saving_what_the_memory_path_refuses_leaves_nothing(qwen_family, mergers, tmp_path):
    a, b = qwen_family["alpha"], qwen_family["beta"]
    text = (
        f"merge_method: linear\nbase_model: {a}\ntokenizer_source: base\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: 0.5}}}}\n  - {{model: {b}, parameters: {{weight: 0.5}}}}\n"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    with pytest.raises(NotInMemory, match="tokenizer"):
        save_merged(mergers["qwen"], text, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.json"]  # the old folder untouched
