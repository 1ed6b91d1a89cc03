"""Each mergekit 0.1.5 workaround: a test that the upstream bug still exists (`test_upstream_*`: when one
fails, upstream fixed the bug — drop the workaround) and a test that the workaround fixes it."""

from __future__ import annotations

import gc
import json
import random
import shutil
import weakref
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub.errors import StrictDataclassClassValidationError
from mergekit.architecture import get_architecture_info
from mergekit.common import ModelReference
from mergekit.config import MergeConfiguration
from mergekit.graph import Executor
from mergekit.merge import _model_out_config, run_merge
from mergekit.merge_methods.api import merge_tensors
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit.scripts.multimerge import load_config, make_tasks
from mergekit_support import plan_in_memory
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evoforge.errors import ConfigError
from evoforge.merge import merge_recipe
from evoforge.merge.mergekit_fixes import (
    check_stage_names,
    clear_loader_cache,
    copy_generation_config,
    global_rng_preserved,
    layer_types_follow_slices,
    planners_released,
    zero_safe_multislerp,
)

OPTIONS = MergeOptions(quiet=True, device="cpu")


def stock_merge(text: str, out: Path, seed: int | None = None) -> MergeConfiguration:
    """mergekit's run_merge, as `mergekit-yaml` calls it."""
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(config, str(out), options=OPTIONS.model_copy(update={"random_seed": seed}))
    return config


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def linear(a: Path, b: Path, weight_a: float = 0.5) -> str:
    return (
        f"merge_method: linear\nbase_model: {a}\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: {weight_a}}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: {1 - weight_a}}}}}\ndtype: float32\n"
    )


def slices(*sources: tuple[Path, int, int]) -> str:
    lines = [f"merge_method: passthrough\nbase_model: {sources[0][0]}\ndtype: float32\nslices:"]
    lines += [f"  - sources: [{{model: {m}, layer_range: [{a}, {b}]}}]" for m, a, b in sources]
    return "\n".join(lines) + "\n"


# (a) depth-changing slice merges and transformers 5's layer_types
def test_upstream_depth_change_loses_config_json(qwen_family, tmp_path):
    text = slices((qwen_family["alpha"], 0, 4), (qwen_family["beta"], 2, 6))
    with pytest.raises(
        StrictDataclassClassValidationError, match=r"`num_hidden_layers` \(8\).*`layer_types` \(6\)"
    ):
        stock_merge(text, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "config.json").exists()


def test_layer_types_follow_their_source_layers(qwen_family, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(qwen_family["alpha"], mixed)
    config = json.loads((mixed / "config.json").read_text())
    kinds = ["full_attention", "sliding_attention"] * 3
    config.update(layer_types=kinds, use_sliding_window=True, sliding_window=8)
    (mixed / "config.json").write_text(json.dumps(config))

    text = slices((mixed, 0, 2), (mixed, 1, 3), (qwen_family["beta"], 2, 4), (mixed, 3, 6))
    with layer_types_follow_slices():
        stock_merge(text, tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert merged.config.num_hidden_layers == 9
    assert merged.config.layer_types == kinds[0:2] + kinds[1:3] + ["full_attention"] * 2 + kinds[3:6]
    assert torch.isfinite(merged(torch.tensor([[1, 2, 3]])).logits).all()


# (b) LoaderCache
def _read_rewrite_read(family: dict[str, Path], tmp_path: Path, clear: bool) -> tuple[dict, dict, dict]:
    middle = tmp_path / "middle"
    stock_merge(linear(family["alpha"], family["beta"]), middle)
    stock_merge(linear(middle, family["gamma"]), tmp_path / "first")
    shutil.rmtree(middle)
    stock_merge(linear(family["ancestor"], family["beta"], weight_a=0.9), middle)
    if clear:
        clear_loader_cache()
    stock_merge(linear(middle, family["gamma"]), tmp_path / "second")
    return tensors(tmp_path / "first"), tensors(tmp_path / "second"), tensors(middle)


def test_upstream_loader_cache_serves_stale_tensors(qwen_family, tmp_path):
    clear_loader_cache()
    first, second, _ = _read_rewrite_read(qwen_family, tmp_path, clear=False)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_clear_loader_cache_reads_the_rewritten_model(qwen_family, tmp_path):
    clear_loader_cache()
    first, second, middle = _read_rewrite_read(qwen_family, tmp_path, clear=True)
    gamma = tensors(qwen_family["gamma"])
    assert not torch.equal(first["model.norm.weight"], second["model.norm.weight"])
    for name in second:
        torch.testing.assert_close(second[name], 0.5 * middle[name] + 0.5 * gamma[name])


# (c) multi-stage: lazy stage reuse, stage names that rewrite other strings
def two_stage(family: dict[str, Path], weight: float) -> str:
    stage = linear(family["alpha"], family["beta"], weight_a=weight)
    final = "merge_method: passthrough\nmodels: [{model: evoforge_interp}]\n"
    return f"name: evoforge_interp\n{stage}---\n{final}"


def test_upstream_lazy_stages_reuse_stale_outputs(qwen_family, tmp_path):
    for weight, out in ((0.9, "first"), (0.1, "second")):
        configs, dependencies = load_config(two_stage(qwen_family, weight), str(tmp_path / "stages"))
        tasks = make_tasks(
            configs, dependencies, OPTIONS, str(tmp_path / "stages"), str(tmp_path / out), lazy=True
        )
        Executor(tasks).execute()
    first, second = tensors(tmp_path / "first"), tensors(tmp_path / "second")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_each_merge_runs_its_stages_afresh(qwen_family, tmp_path):
    alpha, beta = tensors(qwen_family["alpha"]), tensors(qwen_family["beta"])
    for weight in (0.9, 0.1):
        out = merge_recipe(two_stage(qwen_family, weight), tmp_path / "out", device="cpu", work_dir=tmp_path)
        merged = tensors(out)
        for name in merged:
            torch.testing.assert_close(merged[name], weight * alpha[name] + (1 - weight) * beta[name])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no stage folders left behind


def test_upstream_stage_name_rewrites_other_strings(qwen_family, tmp_path):
    text = (
        f"name: ties\n{linear(qwen_family['alpha'], qwen_family['beta'])}---\n"
        f"merge_method: ties\nbase_model: ties\nmodels: [{{model: {qwen_family['gamma']}}}]\n"
    )
    configs, _ = load_config(text, str(tmp_path))
    assert configs[None].merge_method == str(
        tmp_path / "ties"
    )  # `merge_method: ties` became the stage's path
    with pytest.raises(
        ConfigError, match=r"recipe\.yaml: document 2: field merge_method: 'ties' is also a stage"
    ):
        check_stage_names(list(yaml.safe_load_all(text)), "recipe.yaml")


# (d) in-memory planning
def ties_config(family: dict[str, Path]) -> MergeConfiguration:
    models = "\n".join(
        f"  - {{model: {family[n]}, parameters: {{weight: 0.4, density: 0.7}}}}" for n in "abg"
    )
    return MergeConfiguration.model_validate(
        yaml.safe_load(
            f"merge_method: ties\nbase_model: {family['ancestor']}\ndtype: float32\nmodels:\n{models}"
        )
    )


@pytest.fixture
def family_abg(qwen_family: dict[str, Path]) -> dict[str, Path]:
    return {"a": qwen_family["alpha"], "b": qwen_family["beta"], "g": qwen_family["gamma"], **qwen_family}


def test_upstream_plan_in_memory_raises(family_abg):
    config = ties_config(family_abg)
    arch_info = get_architecture_info(config, OPTIONS)
    planner = MergePlanner(config, arch_info, OPTIONS, _model_out_config(config, arch_info))
    with pytest.raises(TypeError, match="Can't instantiate abstract class"):
        planner.plan_in_memory()


def test_plan_in_memory_equals_run_merge(family_abg, tmp_path):
    config = ties_config(family_abg)
    in_memory = {
        task.weight_info.name: value for task, value in Executor(plan_in_memory(config, OPTIONS)).run()
    }
    run_merge(config, str(tmp_path / "out"), options=OPTIONS)
    on_disk = tensors(tmp_path / "out")
    assert in_memory.keys() == on_disk.keys()
    assert all(torch.equal(in_memory[name], on_disk[name]) for name in on_disk)


# (e) multislerp on tensors no input changes
def multislerp(inputs: list[torch.Tensor], base_index: int | None = None) -> torch.Tensor:
    return merge_tensors(inputs, "multislerp", parameters={"weight": 1.0}, base_index=base_index)


def test_upstream_multislerp_fails_on_unchanged_tensors():
    base = torch.randn(8, 8)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        multislerp([base, base.clone(), base.clone(), base.clone()], base_index=0)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
        multislerp([torch.zeros(8)] * 3)


def test_zero_safe_multislerp_returns_the_unchanged_tensor_and_nothing_else_changes():
    base, other = torch.randn(8, 8), torch.randn(8, 8)
    varied = [base, base + 0.1 * other, base - 0.2 * other.T, base.clone()]
    expected = multislerp(varied, base_index=0)
    with zero_safe_multislerp():
        assert torch.equal(multislerp([base, base.clone(), base.clone()], base_index=0), base)
        assert torch.equal(multislerp([torch.zeros(8)] * 3), torch.zeros(8))
        assert torch.equal(multislerp(varied, base_index=0), expected)


# (f) generation_config.json with tokenizer_source
def test_upstream_tokenizer_source_drops_generation_config(qwen_family, tmp_path):
    stock_merge(
        linear(qwen_family["alpha"], qwen_family["beta"]) + "tokenizer_source: base\n", tmp_path / "out"
    )
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert not (tmp_path / "out" / "generation_config.json").exists()


def test_copy_generation_config_takes_the_donors(qwen_family, tmp_path):
    config = stock_merge(
        linear(qwen_family["alpha"], qwen_family["beta"]) + "tokenizer_source: base\n", tmp_path
    )
    copy_generation_config(config, tmp_path)
    donor = (qwen_family["alpha"] / "generation_config.json").read_text()
    assert (tmp_path / "generation_config.json").read_text() == donor


# (g) a seeded merge re-seeds the caller's random generators
def test_upstream_seeded_merge_reseeds_global_generators(qwen_family, tmp_path):
    random.seed(1234)
    stock_merge(linear(qwen_family["alpha"], qwen_family["beta"]), tmp_path / "out", seed=7)
    after_merge = (random.random(), torch.rand(1))
    random.seed(7)
    torch.manual_seed(7)
    assert after_merge == (random.random(), torch.rand(1))


def test_global_rng_preserved_keeps_the_callers_stream(qwen_family, tmp_path):
    random.seed(1234)
    torch.manual_seed(1234)
    expected = (random.Random(1234).random(), torch.rand(1, generator=torch.Generator().manual_seed(1234)))
    with global_rng_preserved():
        stock_merge(linear(qwen_family["alpha"], qwen_family["beta"]), tmp_path / "out", seed=7)
    assert (random.random(), torch.rand(1)) == expected


# (h) cached Hugging Face ids
def test_upstream_mergekit_asks_the_hub_for_a_cached_model(offline_hf_cache):
    with pytest.raises(Exception, match="offline mode is enabled"):
        ModelReference.model_validate(offline_hf_cache).local_path()


def test_merges_of_cached_hf_ids_work_offline(qwen_family, offline_hf_cache, tmp_path):
    by_id = merge_recipe(linear(offline_hf_cache, qwen_family["beta"]), tmp_path / "by_id", device="cpu")
    by_folder = merge_recipe(
        linear(qwen_family["alpha"], qwen_family["beta"]), tmp_path / "by_folder", device="cpu"
    )
    merged, expected = tensors(by_id), tensors(by_folder)
    assert all(torch.equal(merged[name], expected[name]) for name in expected)


# (i) planners kept alive by mergekit's class-level lru_cache
def _planner_outlives_its_merge(family: dict[str, Path]) -> bool:
    config = MergeConfiguration.model_validate(yaml.safe_load(linear(family["alpha"], family["beta"])))
    arch_info = get_architecture_info(config, OPTIONS)
    planner = MergePlanner(
        config, arch_info, options=OPTIONS, out_model_config=_model_out_config(config, arch_info)
    )
    planner.plan_to_disk("/nonexistent")
    alive = weakref.ref(planner)
    del planner
    gc.collect()
    return alive() is not None


def test_upstream_planner_cache_keeps_planners_alive(qwen_family):
    assert _planner_outlives_its_merge(qwen_family)


def test_planners_are_freed_after_their_merge(qwen_family):
    with planners_released():
        assert not _planner_outlives_its_merge(qwen_family)
