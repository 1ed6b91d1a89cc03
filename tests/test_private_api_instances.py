"""Canary, at run time: the attributes and object identities of real mergekit and lm-eval objects (a merge
plan, merge methods, the loader cache, the task YAML walk, a built HFLM) that evoforge reads."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def test_mergekit_planner_internals(qwen_family: dict[str, Path]) -> None:
    """The planner attributes and the ConfigReader identities memory/layout.py's _Planner relies on, on a real
    plan: `_tensors`, `_method`, `_current_module_layers`, `plan_tensor`'s reader pointing at the very module
    and slice objects of `config`, the executor order from `plan_to_disk` through the scheduler."""
    import mergekit.merge
    from mergekit.architecture import ConfiguredModuleArchitecture, get_architecture_info
    from mergekit.config import MergeConfiguration
    from mergekit.graph import TaskUniverse, build_schedule
    from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
    from mergekit.options import MergeOptions
    from mergekit.plan import MergePlanner

    a, b = qwen_family["alpha"], qwen_family["beta"]
    text = f"merge_method: dare_ties\nbase_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]"
    config = MergeConfiguration.model_validate(yaml.safe_load(text))
    options = MergeOptions(device="cpu", quiet=True)
    arch_info = get_architecture_info(config, options)
    readers = []

    class Recording(MergePlanner):
        def plan_tensor(self, weight, weights_in, models, cfg_reader):
            readers.append(cfg_reader)
            super().plan_tensor(weight, weights_in, models, cfg_reader)

    out_config = mergekit.merge._model_out_config(config, arch_info, False)
    planner = Recording(config, arch_info, options, out_config)
    planner._plan()
    assert planner._method.spec.name == "dare_ties", "MergePlanner._method: no longer the merge method"
    assert planner._tensors and all(len(t) == 2 for t in planner._tensors), (
        "MergePlanner._tensors: no longer (WeightInfo, task) pairs after _plan()"
    )
    assert planner._current_module_layers == out_config.num_hidden_layers, (
        "MergePlanner._current_module_layers: no longer the count of planned layers"
    )
    module = planner._model_arch(config.base_model).get_module(next(iter(arch_info.modules)))
    assert (
        isinstance(module, ConfiguredModuleArchitecture)
        and module.num_layers() == out_config.num_hidden_layers
    ), "MergePlanner._model_arch(model).get_module(name): not a ConfiguredModuleArchitecture"
    assert readers and all(
        any(m is r.module for m in planner.config.modules.values())
        and any(s is r.slice_out for s in r.module.slices)
        for r in readers
    ), (
        "ConfigReader.module/slice_out: no longer the planner's config objects (memory/layout.py finds them by identity)"
    )
    targets = MergePlanner(config, arch_info, options, out_config).plan_to_disk(out_path="/nonexistent")
    universe = TaskUniverse(targets)
    schedule = build_schedule([universe.add_task(t) for t in targets], {})
    merges = [h.task() for h in schedule.tasks if isinstance(h.task(), ExecuteMergeMethodTask)]
    assert len(merges) == len(planner._tensors), (
        "build_schedule(...).tasks: no longer TaskHandles of every merge task (the order DARE draws masks in)"
    )


def test_mergekit_patched_config_and_merge_methods() -> None:
    from mergekit import merge_methods
    from mergekit.config import MergeConfiguration
    from mergekit.scripts.multimerge import patched_config
    from mergekit.sparsify import SparsificationMethod

    config = MergeConfiguration.model_validate(
        {"merge_method": "linear", "models": [{"model": "stage1"}, {"model": "/base"}]}
    )
    patched, used = patched_config(config, {"stage1"}, "/stages")
    assert [str(m.model.model.path) for m in patched.models] == ["/stages/stage1", "/base"] and set(used) == {
        "stage1"
    }, "mergekit.scripts.multimerge.patched_config: no longer returns (config with stage paths, names used)"
    dare = merge_methods.get("dare_ties")
    assert dare.sparsification_method == SparsificationMethod.random and dare.consensus_method is not None, (
        "GeneralizedTaskArithmeticMerge.sparsification_method/consensus_method: memory path decides "
        "random draws and working sets from them"
    )
    assert callable(merge_methods.get("multislerp").implementation), (
        "multislerp's .implementation: mergekit_fixes.zero_safe_multislerp replaces it"
    )


def test_mergekit_loader_cache_and_lazy_loader(qwen_family: dict[str, Path]) -> None:
    from mergekit.common import ModelReference
    from mergekit.io.tasks import LoaderCache

    assert isinstance(LoaderCache().loaders, dict), (
        "LoaderCache().loaders: mergekit_fixes.clear_loader_cache empties it"
    )
    loader = ModelReference.model_validate(str(qwen_family["alpha"])).lazy_loader(lazy_unpickle=False)
    names = loader.index.tensor_paths
    assert isinstance(names, dict) and isinstance(loader.get_tensor(next(iter(names))), torch.Tensor), (
        "LazyTensorLoader.index.tensor_paths: memory/merger.py reads a model's tensors by it"
    )


def test_lm_eval_yaml_walk(tmp_path: Path) -> None:
    from lm_eval.tasks._index import TaskIndex

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "t.yaml").write_text("task: t\n")
    (tmp_path / "notes.txt").write_text("")
    assert [Path(p).name for p in TaskIndex._iter_yaml_files(tmp_path)] == ["t.yaml"], (
        "lm_eval.tasks._index.TaskIndex._iter_yaml_files: no longer yields the task YAMLs under a folder"
    )


def test_hflm_attributes_pooled_generation_reads(qwen_family: dict[str, Path]) -> None:
    """Attributes of a built HFLM that evaluate/generation.py's PooledHFLM reads."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen_family["alpha"])
    tokenizer = AutoTokenizer.from_pretrained(qwen_family["alpha"])
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    read = (
        "backend",
        "batch_size",
        "think_end_token",
        "eot_token_id",
        "max_gen_toks",
        "rank",
        "tokenizer",
        "add_bos_token",
        "max_length",
        "device",
        "mixed_precision_dtype",
        "model",
    )
    missing = [attr for attr in read if not hasattr(lm, attr)]
    assert not missing, f"HFLM: evoforge/evaluate/generation.py reads {missing}, gone"
    assert lm.backend == "causal" and lm.batch_size == 2, "HFLM.backend/batch_size: PooledHFLM's path test"
    assert callable(getattr(lm.cache_hook, "add_partial", None)), "HFLM.cache_hook.add_partial: gone"
