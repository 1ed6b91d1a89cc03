"""The memory merge path gives the disk path's tensors: seeds, mutants, ancestors, DFS depth changes, DARE;
where it computes them (card or host, by reference, only what the final path uses) and what it refuses or
fails on as the disk path does."""

from __future__ import annotations

from collections import Counter
from graphlib import TopologicalSorter
from pathlib import Path

import mergekit.merge
import pytest
import torch
import yaml
from evolution_support import NAMES, TASKS, space_of, write_mc_tasks
from memory_merge_support import candidates, deep_dfs
from mergekit.architecture import get_architecture_info
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from mergekit.scripts.multimerge import load_config
from mergekit_support import plan_in_memory
from safetensors.torch import load_file
from transformers import AutoConfig

from evoforge.config import MergeOperators
from evoforge.errors import ConfigError
from evoforge.evaluate.scorer import Scorer, load_model
from evoforge.genome import Step, StructureGene, seed_genomes
from evoforge.merge import mergekit_fixes
from evoforge.merge.disk import merge_options, merge_recipe, validate_recipe
from evoforge.merge.memory import STAGE_DIR, InMemoryLoader, MemoryMerger, NotInMemory, models_in_memory
from evoforge.recipe import random_seed, render

BOOKKEEPING = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"}


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
    before = Counter(merger.placements)
    monkeypatch.setattr(merger, "stream", True)
    monkeypatch.setattr(merger, "task_budget", 1)  # every task "too big": all merged through the host path
    for text, want in zip(texts, expected):
        state = merger.merge(text, random_seed(text))[0]
        assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    placed = merger.placements - before  # counted as the bench reports them
    assert {where for where, _ in placed} == {"host"}
    assert {method for _, method in placed} == {
        "linear",
        "ties",
        "multislerp",
        "dare_ties",
    }  # passthrough: by reference


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
