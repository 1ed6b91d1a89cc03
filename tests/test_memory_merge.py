"""The memory merge path gives the disk path's tensors: seeds, mutants, ancestors, DFS depth changes, DARE."""

from __future__ import annotations

import random
from collections import Counter
from graphlib import TopologicalSorter
from pathlib import Path

import mergekit.merge
import pytest
import torch
import yaml
from evolution_support import NAMES, TASKS, run_config, space_of, write_mc_tasks
from mergekit.architecture import get_architecture_info
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.scripts.multimerge import load_config
from mergekit_support import plan_in_memory
from safetensors.torch import load_file
from transformers import AutoConfig

from evoforge.config import EvolutionConfig, MergeOperators
from evoforge.errors import ConfigError
from evoforge.evaluate.scorer import Scorer, load_model
from evoforge.evolve.candidates import CandidateEvaluator
from evoforge.genome import Genome, GenomeSpace, Step, StructureGene, mutate, seed_genomes
from evoforge.merge import mergekit_fixes
from evoforge.merge.disk import merge_options, merge_recipe, validate_recipe
from evoforge.merge.memory import STAGE_DIR, InMemoryLoader, MemoryMerger, NotInMemory, models_in_memory
from evoforge.merge.memory import run as memory_module
from evoforge.merge.save import save_merged
from evoforge.recipe import random_seed, render

BOOKKEEPING = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


def deep_dfs(seed: Genome) -> Genome:
    """A DARE genome whose DFS path is 9 layers deep (6 in the base models), repeats layers, mixes all
    sources and scales o_proj/down_proj."""
    path = (
        Step(source="crossover", layer=0),
        Step(source="interp", layer=1, scale=1.3),
        Step(source="alpha", layer=1, scale=0.7),
        Step(source="crossover", layer=2),
        Step(source="crossover", layer=2, scale=0.8),
        Step(source="beta", layer=3),
        Step(source="crossover", layer=4, scale=1.1),
        Step(source="gamma", layer=5),
        Step(source="crossover", layer=5, scale=0.9),
    )
    crossover = seed.crossover.model_copy(update={"method": "dare"})
    return Genome(interp=seed.interp, crossover=crossover, structure=StructureGene(method="dfs", path=path))


def candidates(space: GenomeSpace, with_seeds: bool, mutants: int) -> dict[str, Genome]:
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    rng = random.Random(11)
    out = dict(seeds) if with_seeds else {}
    for i in range(mutants):
        out[f"mutant{i}"] = mutate(rng.choice(list(seeds.values())), space, rng, 0.4)
    out["deep-dfs"] = deep_dfs(seeds["slerp-dare-dfs"])
    return out


def assert_same_model(memory: tuple[dict, object], disk: Path) -> None:
    state, config = memory
    expected = load_file(disk / "model.safetensors")
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name].cpu(), tensor, rtol=1.3e-6, atol=1e-6, msg=name)
    saved = AutoConfig.from_pretrained(disk).to_dict()
    ours = config.to_dict()
    assert {
        k for k in saved.keys() | ours.keys() if k not in BOOKKEEPING and saved.get(k) != ours.get(k)
    } == set()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "ancestor", "with_seeds", "mutants"),
    [
        ("qwen", False, True, 2),
        ("llama", True, True, 2),
        ("qwen", True, False, 3),
        ("llama", False, False, 3),
    ],
)
def test_memory_path_equals_disk_path(request, mergers, tmp_path, arch, ancestor, with_seeds, mutants):
    family = request.getfixturevalue(f"{arch}_family")
    space = space_of(family, ancestor)
    genomes = candidates(space, with_seeds, mutants)
    depths = {len(g.structure.path) for g in genomes.values()}
    assert depths - {6} and any(s.scale != 1.0 for s in genomes["deep-dfs"].structure.path)
    for label, genome in genomes.items():
        text = render(genome, space)
        seed = random_seed(text)
        disk = merge_recipe(text, tmp_path / label, device="cpu", random_seed=seed)
        assert_same_model(mergers[arch].merge(text, seed), disk)


@pytest.mark.slow
def test_merged_straight_into_a_scorer_equals_loading_the_disk_model(qwen_family, mergers, tmp_path):
    """`merge(into=scorer.open_weights)` writes each tensor into the resident model as it is computed
    (resizing it for a deeper path first): the model ends up as `load_weights` of the disk path's folder."""
    space = space_of(qwen_family, False)
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    tasks, weights = write_mc_tasks(tmp_path / "mc"), dict.fromkeys(TASKS.values(), 0.5)
    reference, written = (
        Scorer(*load_model(qwen_family["alpha"], "cpu"), tasks_dir=tasks, weights=weights) for _ in range(2)
    )
    for label, genome in {"deep": deep_dfs(seeds["slerp-dare-dfs"]), **seeds}.items():
        text = render(genome, space)
        seed = random_seed(text)
        reference.load_weights(merge_recipe(text, tmp_path / label, device="cpu", random_seed=seed))
        state, _ = mergers["qwen"].merge(text, seed, into=written.open_weights)
        assert state == {}
        expected, got = reference.model.state_dict(), written.model.state_dict()
        assert got.keys() == expected.keys() and written.model.config.num_hidden_layers == len(
            genome.structure.path
        )
        for name, tensor in expected.items():
            torch.testing.assert_close(got[name], tensor, rtol=1.3e-6, atol=1e-6, msg=f"{label}: {name}")


def mergekit_plan(text: str) -> dict[str | None, tuple[dict, dict[str, ExecuteMergeMethodTask]]]:
    """Each stage's output config and merge tasks as mergekit's own planner builds them for `run_merge`
    (stages loaded by mergekit-multi's `load_config`, their outputs named as it names them)."""
    options = merge_options("cpu")
    configs, dependencies = load_config(yaml.safe_dump_all(validate_recipe(text), sort_keys=False), STAGE_DIR)
    out_configs, loaders, plans = {}, {}, {}
    with mergekit_fixes.applied(), models_in_memory(out_configs, loaders):
        for name in TopologicalSorter(dependencies).static_order():
            config = configs[name]
            tasks = {r.weight_info.name: r.tensor_task for r in plan_in_memory(config, options)}
            out_config = mergekit.merge._model_out_config(config, get_architecture_info(config, options))
            out_configs[f"{STAGE_DIR}/{name}"] = out_config
            loaders[f"{STAGE_DIR}/{name}"] = InMemoryLoader(dict.fromkeys(tasks))
            plans[name] = (out_config.to_dict(), tasks)
    return plans


def task_fields(task: ExecuteMergeMethodTask) -> tuple:
    """Everything a merge task is made of (mergekit's gather task compares by identity)."""
    gather = task.gather_tensors
    return (
        *(getattr(task, f) for f in ("method_name", "model_order", "base_model", "output_weight", "dtype")),
        task.out_dtype,
        dict(task.parameters),
        {model: dict(values) for model, values in task.input_parameters.items()},
        dict(gather.weight_info.items()),
        gather.dtype,
        gather.device,
    )


def test_cached_plans_give_mergekits_own_tasks(qwen_family, mergers):
    """The memory path plans a recipe's structure once and resolves only parameters per candidate: for
    seeds, mutants (same structures, other values), a deep DFS path with filtered scales (also over another
    crossover method: the same final document on other inputs) and a recipe with gradients and filters,
    every stage has mergekit's output config and, tensor by tensor, its tasks."""
    space = space_of(qwen_family, ancestor=True)
    a, b, ancestor = (qwen_family[n] for n in ("alpha", "beta", "ancestor"))
    genomes = candidates(space, with_seeds=True, mutants=3)
    deep = genomes["deep-dfs"]  # the same path over a TIES crossover: one final document, other inputs
    genomes["deep-ties"] = deep.model_copy(
        update={"crossover": deep.crossover.model_copy(update={"method": "ties"})}
    )
    texts = [render(genome, space) for genome in genomes.values()]
    for density in (0.3, 0.45):  # one structure twice: the second resolves its parameters on a kept plan
        texts.append(
            f"merge_method: ties\nbase_model: {ancestor}\ndtype: float32\nparameters: {{normalize: true}}\n"
            f"models:\n  - model: {a}\n    parameters: {{weight: [0.2, 0.9], density: [{{filter: mlp, value: "
            f"[{density}, 0.8]}}, {{value: 0.6}}]}}\n  - model: {b}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
        )
    merger = mergers["qwen"]
    for text in texts:
        with mergekit_fixes.applied():
            ours = merger._stage_plans(validate_recipe(text), "recipe")
        theirs = mergekit_plan(text)
        assert ours.keys() == theirs.keys()
        for name, (out_config, tasks) in theirs.items():
            plan = ours[name]
            assert plan.skeleton.config.to_dict() == out_config
            assert list(plan.skeleton.entries) == list(tasks)
            for tensor, task in tasks.items():
                assert task_fields(plan.task(tensor)) == task_fields(task), (name, tensor)
    with_gradients = texts[-1]
    seed = random_seed(with_gradients)
    disk = merge_recipe(
        with_gradients, qwen_family["alpha"].parent / "gradients", device="cpu", random_seed=seed
    )
    assert_same_model(merger.merge(with_gradients, seed), disk)


def test_dare_masks_follow_the_seed_and_leave_the_callers_generators_alone(qwen_family, mergers):
    space = space_of(qwen_family, ancestor=False)
    text = render(
        seed_genomes(space, MergeOperators(), [1.0] * 3, run_seed=7)["linear-dare-frankenmerge"], space
    )
    merger = mergers["qwen"]
    torch.manual_seed(123)
    first, _ = merger.merge(text, random_seed=5)
    after = torch.rand(3)
    torch.manual_seed(123)
    again, _ = merger.merge(text, random_seed=5)
    assert torch.equal(torch.rand(3), after)  # merging drew nothing from the caller's stream
    other, _ = merger.merge(text, random_seed=6)
    name = "model.layers.0.mlp.up_proj.weight"  # a crossover layer
    assert torch.equal(first[name], again[name]) and not torch.equal(first[name], other[name])


def test_a_plain_dare_merge_equals_the_disk_path(llama_family, mergers, tmp_path):
    a, b, g, ancestor = (llama_family[n] for n in (*NAMES, "ancestor"))
    text = f"merge_method: dare_ties\nbase_model: {ancestor}\ndtype: float32\nmodels:\n" + "".join(
        f"  - {{model: {m}, parameters: {{weight: 0.4, density: 0.5}}}}\n" for m in (a, b, g)
    )
    disk = merge_recipe(text, tmp_path / "out", device="cpu", random_seed=3)
    assert_same_model(mergers["llama"].merge(text, random_seed=3), disk)


def test_a_task_too_big_for_a_small_gpu_runs_on_the_host(qwen_family, mergers, monkeypatch):
    """Streamed residents: a deterministic task that runs out of device memory is run again, by mergekit's
    same code, on host copies of its inputs (here on the CPU, where both runs give the same bits)."""
    space = space_of(qwen_family, False)
    text = render(
        seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)["linear-ties-dfs"], space
    )
    expected, _ = mergers["qwen"].merge(text)
    execute, failed = ExecuteMergeMethodTask.execute, []

    def out_of_memory_once(self, **kwargs):
        if self.method_name == "ties" and not failed:
            failed.append(self.output_weight.name)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return execute(self, **kwargs)

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", out_of_memory_once)
    with pytest.raises(torch.OutOfMemoryError):  # resident models: a real shortage, reported
        mergers["qwen"].merge(text)
    failed.clear()
    monkeypatch.setattr(mergers["qwen"], "stream", True)
    state, _ = mergers["qwen"].merge(text)
    assert failed and state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_streamed_tasks_too_big_for_the_card_run_on_the_host(qwen_family, mergers, monkeypatch):
    """The rule depends only on the card and the shapes: a 3×1.5 B embedding (four 445 MiB inputs) is merged
    on the host by TIES/DARE under an 8 GiB card, on the card under 16 GiB; slerp and linear stay on the card."""
    merger = mergers["qwen"]
    embedding, mlp = 151936 * 1536 * 2, 8960 * 1536 * 2
    monkeypatch.setattr(merger, "task_budget", int(0.75 * 8 * 2**30))
    assert merger.runs_on_host("ties", 4 * embedding) and merger.runs_on_host("dare_ties", 4 * embedding)
    assert not merger.runs_on_host("multislerp", 3 * embedding) and not merger.runs_on_host(
        "linear", 3 * embedding
    )
    assert not merger.runs_on_host("ties", 4 * mlp)
    monkeypatch.setattr(merger, "task_budget", int(0.75 * 16 * 2**30))
    assert not merger.runs_on_host("ties", 4 * embedding)
    monkeypatch.setattr(merger, "task_budget", None)  # resident models: never
    assert not merger.runs_on_host("ties", 4 * embedding)

    space = space_of(qwen_family, False)
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    texts = [render(seeds[label], space) for label in ("linear-ties-frankenmerge", "slerp-dare-dfs")]
    expected = [merger.merge(text, random_seed(text))[0] for text in texts]
    on_host = Counter()
    host = memory_module._Run._on_host

    def counted(self, task, tensors):
        on_host[task.method_name] += 1
        return host(self, task, tensors)

    monkeypatch.setattr(memory_module._Run, "_on_host", counted)
    monkeypatch.setattr(merger, "stream", True)
    monkeypatch.setattr(merger, "task_budget", 1)  # every task "too big": all merged through the host path
    for text, want in zip(texts, expected):
        state = merger.merge(text, random_seed(text))[0]
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    assert on_host.keys() == {"linear", "ties", "multislerp", "dare_ties"}  # passthrough: by reference


def test_unscaled_passthrough_is_assembled_by_reference(qwen_family, mergers):
    space = space_of(qwen_family, ancestor=False)
    seed = seed_genomes(space, MergeOperators(), [1.0] * 3, run_seed=7)["linear-ties-dfs"]
    path = (Step(source="beta", layer=0), Step(source="beta", layer=1, scale=0.5), *seed.structure.path[2:])
    genome = seed.model_copy(update={"structure": StructureGene(method="dfs", path=path)})
    state, _ = mergers["qwen"].merge(render(genome, space))
    beta = mergers["qwen"].models[str(qwen_family["beta"])].tensors
    same = "model.layers.0.mlp.down_proj.weight"
    assert state[same] is beta[same]  # layer 0: input × 1, no copy
    assert state["model.layers.1.mlp.up_proj.weight"] is beta["model.layers.1.mlp.up_proj.weight"]
    torch.testing.assert_close(
        state["model.layers.1.mlp.down_proj.weight"], 2.0 * beta["model.layers.1.mlp.down_proj.weight"]
    )


def test_only_stage_tensors_the_final_path_uses_are_computed(qwen_family, mergers, monkeypatch):
    space = space_of(qwen_family, ancestor=False)
    seeds = seed_genomes(space, MergeOperators(), [1.0] * 3, run_seed=7)
    ties = seeds["linear-ties-frankenmerge"]
    assert [s.source for s in ties.structure.path] == ["crossover"] * 2 + ["alpha"] * 2 + ["beta"] * 2
    last = (*(Step(source="alpha", layer=i) for i in range(5)), Step(source="crossover", layer=5))
    dare = seeds["linear-dare-frankenmerge"].model_copy(
        update={"structure": StructureGene(method="frankenmerge", path=last)}
    )
    calls: Counter[str] = Counter()
    execute = ExecuteMergeMethodTask.execute

    def counted(self, **kwargs):
        calls[self.method_name] += 1
        return execute(self, **kwargs)

    monkeypatch.setattr(ExecuteMergeMethodTask, "execute", counted)
    alpha = load_file(qwen_family["alpha"] / "model.safetensors")
    per_layer = sum(name.startswith("model.layers.0.") for name in alpha)
    mergers["qwen"].merge(render(ties, space))
    assert calls == {"ties": 2 * per_layer + 1, "linear": 2 * per_layer + 1}  # unscaled slices: no task
    calls.clear()
    mergers["qwen"].merge(render(dare, space), random_seed=1)
    # DARE draws masks in mergekit's task order (by tensor name), so it runs up to the last tensor used, the
    # final norm; tasks nothing uses only draw, on zeros in place of the interp tensors they would read
    assert calls["linear"] == per_layer + 1 and calls["dare_ties"] == len(alpha)


def test_what_the_memory_path_cannot_reproduce_is_refused(qwen_family, unrelated_qwen_family, mergers):
    a, b = qwen_family["alpha"], qwen_family["beta"]
    linear = f"merge_method: linear\nbase_model: {a}\nmodels: [{{model: {a}, parameters: {{weight: 0.5}}}}, "
    with pytest.raises(NotInMemory, match="not one of the resident models"):
        mergers["qwen"].merge(
            linear + f"{{model: {unrelated_qwen_family['beta']}, parameters: {{weight: 0.5}}}}]\n"
        )
    with pytest.raises(NotInMemory, match="tokenizer"):
        mergers["qwen"].merge(
            linear + f"{{model: {b}, parameters: {{weight: 0.5}}}}]\ntokenizer_source: base\n"
        )
    bf16 = MemoryMerger([a, b], device="cpu", dtype="bfloat16")
    assert bf16.merge(linear + f"{{model: {b}, parameters: {{weight: 0.5}}}}]\ndtype: bfloat16\n")
    with pytest.raises(NotInMemory, match=r"kept in torch\.bfloat16"):
        bf16.merge(linear + f"{{model: {b}, parameters: {{weight: 0.5}}}}]\ndtype: float32\n")


def test_bad_recipes_fail_as_on_the_disk_path(qwen_family, mergers, tmp_path):
    space = space_of(qwen_family, ancestor=False)
    text = render(seed_genomes(space, MergeOperators(), [1.0] * 3, run_seed=7)["linear-ties-dfs"], space)
    bad = text.replace("density:", "densty:", 1)
    with pytest.raises(ConfigError) as on_disk:
        merge_recipe(bad, tmp_path / "out", device="cpu", source="r.yaml")
    with pytest.raises(ConfigError) as in_memory:
        mergers["qwen"].merge(bad, source="r.yaml")
    assert str(in_memory.value) == str(on_disk.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_path_equals_gpu_disk_path_resident_or_streamed(llama_family, tmp_path):
    space = space_of(llama_family, ancestor=True)
    models = [llama_family[n] for n in (*NAMES, "ancestor")]
    resident = MemoryMerger(models, device="cuda", stream=False)
    streamed = MemoryMerger(models, device="cuda", stream=True)
    assert streamed.stream and not resident.stream
    for label, genome in candidates(space, with_seeds=True, mutants=1).items():
        text = render(genome, space)
        seed = random_seed(text)
        disk = merge_recipe(text, tmp_path / label, device="cuda", random_seed=seed)
        ours = resident.merge(text, seed)
        assert_same_model(ours, disk)
        again, _ = streamed.merge(text, seed)
        assert all(torch.equal(again[name], ours[0][name]) for name in ours[0])


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
