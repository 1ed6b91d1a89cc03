"""Canary: the private and internal names of mergekit and lm-eval that evoforge relies on, still as it expects.

evoforge overrides, patches, duck-types or calls names that mergekit 0.1.5 and lm-eval 0.4.13 do not promise to
keep (underscore names, planner internals, the task graph, HFLM's generation internals). After a dependency
bump, a changed one would show up as a tensor difference or an AttributeError deep in a merge; here it fails
naming the private name, what evoforge expects of it and where evoforge uses it. Each entry checks the
parameter names in order (`exact` where evoforge overrides, patches or duck-types it: the whole signature;
`prefix` where it calls it: the leading parameters it passes; `accepts`: keyword arguments it passes) and, for
classes, the fields and attributes evoforge reads or constructs. Only mergekit and lm-eval are imported here,
so the canary runs even when a bump breaks importing evoforge. `test_every_private_name_has_an_entry` keeps
the list complete for module-level private names (an underscore anywhere in the dotted path). What evoforge
reads of built objects at run time: tests/test_private_api_instances.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from private_api_support import _private_names

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("evoforge", "tasks/_shared")


@dataclass(frozen=True)
class Expect:
    """What evoforge expects of one mergekit or lm-eval name."""

    name: str
    """Dotted, as evoforge imports it."""
    used_by: str
    params: tuple[str, ...] | None = None
    """Parameter names in order (methods include `self`; *args/**kwargs are not compared)."""
    match: Literal["exact", "prefix", "accepts"] = "prefix"
    fields: tuple[str, ...] = ()
    """pydantic or dataclass fields evoforge reads or sets."""
    all_fields: bool = False
    """Built with `model_construct`: a field evoforge does not know of would be left unset."""
    attrs: tuple[str, ...] = ()
    """Class attributes, properties or methods evoforge reads."""


MK = "mergekit"
EXPECTED = [
    # mergekit: output config, tokenizer and tag-along files (memory path, saving from memory)
    Expect(
        f"{MK}.merge._model_out_config",
        "memory/layout.py calls it; mergekit_fixes.layer_types_follow_slices replaces it",
        ("config", "arch_info", "trust_remote_code"),
        "exact",
    ),
    Expect(f"{MK}.merge._copy_tokenizer", "merge/save.py", ("merge_config", "out_path", "options"), "exact"),
    Expect(
        f"{MK}.merge._copy_tagalong_files",
        "merge/save.py",
        ("merge_config", "out_path", "files", "options"),
        "exact",
    ),
    # mergekit's planner: subclassed by memory/layout.py's _Planner, patched by mergekit_fixes (i)
    Expect(
        f"{MK}.plan.MergePlanner.__init__",
        "memory/layout.py, memory/plan.py",
        ("self", "config", "arch_info", "options", "out_model_config"),
    ),
    Expect(f"{MK}.plan.MergePlanner._plan", "memory/layout.py (Layouts.plan)", ("self",), "exact"),
    Expect(
        f"{MK}.plan.MergePlanner._model_arch",
        "memory/layout.py; mergekit_fixes.planners_released replaces it with its __wrapped__ cached per planner",
        ("self", "model"),
        "exact",
        attrs=("__wrapped__",),
    ),
    Expect(
        f"{MK}.plan.MergePlanner._out_module_arch",
        "memory/layout.py (_Planner.plan_layer)",
        ("self", "module"),
    ),
    Expect(
        f"{MK}.plan.MergePlanner.plan_layer",
        "memory/layout.py (_Planner overrides it)",
        ("self", "sources", "layer_offset", "t", "cfg_reader", "module_name"),
        "exact",
    ),
    Expect(
        f"{MK}.plan.MergePlanner.plan_tensor",
        "memory/layout.py (_Planner overrides it)",
        ("self", "weight", "weights_in", "models", "cfg_reader"),
        "exact",
    ),
    Expect(f"{MK}.plan.MergePlanner.normalize_config", "memory/plan.py", ("self",)),
    Expect(f"{MK}.plan.MergePlanner.plan_to_disk", "memory/layout.py (Layouts._order)", ("self", "out_path")),
    Expect(
        f"{MK}.config.ConfigReader",
        "memory/plan.py builds it with model_construct and reads base_model, with_t, parameter_sources",
        fields=("config", "t", "slice_out", "module"),
        all_fields=True,
        attrs=("base_model", "with_t", "parameter_sources"),
    ),
    Expect(f"{MK}.config.ConfigReader.with_t", "memory/layout.py", ("self", "t")),
    Expect(f"{MK}.config.ConfigReader.parameter_sources", "memory/plan.py", ("self", "model")),
    Expect(
        f"{MK}.config.ConditionalParameter",
        "memory/plan.py (_reads)",
        fields=("value", "filter"),
        all_fields=True,
    ),
    Expect(
        f"{MK}.parameter_resolver.resolve_parameters",
        "memory/plan.py (_StagePlan.task)",
        ("spec", "tensor_name", "inputs", "sources", "base_model", "t"),
    ),
    Expect(
        f"{MK}.architecture.ConfiguredModuleArchitecture",
        "memory/layout.py (cached layer weights)",
        fields=("info", "weight_prefix"),
        attrs=("layer_weights", "num_layers"),
    ),
    Expect(
        f"{MK}.architecture.ConfiguredModuleArchitecture.layer_weights", "memory/layout.py", ("self", "index")
    ),
    Expect(
        f"{MK}.architecture.ConfiguredModuleArchitecture.num_layers", "memory/layout.py", ("self",), "exact"
    ),
    Expect(
        f"{MK}.architecture.ConfiguredModelArchitecture.get_module",
        "memory/layout.py",
        ("self", "module_name"),
    ),
    Expect(f"{MK}.architecture.json_definitions.JsonModuleArchitecture", "memory/layout.py (type test)"),
    Expect(
        f"{MK}.architecture.WeightInfo",
        "memory/layout.py",
        fields=("name", "aliases", "tied_names", "optional", "force_dtype"),
    ),
    # mergekit's tasks and task graph: built with model_construct, run, scheduled by evoforge
    Expect(
        f"{MK}.merge_methods.task_adapter.ExecuteMergeMethodTask",
        "memory/plan.py builds it with model_construct; memory/run.py reads dtype, out_dtype, input_parameters",
        fields=(
            "method_name",
            "gather_tensors",
            "model_order",
            "base_model",
            "output_weight",
            "parameters",
            "input_parameters",
            "dtype",
            "out_dtype",
        ),
        all_fields=True,
    ),
    Expect(
        f"{MK}.merge_methods.task_adapter.ExecuteMergeMethodTask.execute",
        "memory/run.py calls execute(tensors=...)",
        ("self", "tensors"),
        "exact",
    ),
    Expect(
        f"{MK}.io.tasks.GatherTensors",
        "memory/layout.py builds it with model_construct",
        fields=("weight_info", "dtype", "device"),
        all_fields=True,
    ),
    Expect(
        f"{MK}.io.tasks.ReturnTensor",
        "tests/mergekit_support.py builds it with model_construct",
        fields=("weight_info", "tensor_task", "dtype"),
        all_fields=True,
    ),
    Expect(f"{MK}.graph.build_schedule", "memory/layout.py (Layouts._order)", ("targets", "cached_values")),
    Expect(f"{MK}.graph.TaskUniverse.__init__", "memory/layout.py", ("self", "tasks")),
    Expect(f"{MK}.graph.TaskUniverse.add_task", "memory/layout.py", ("self", "task")),
    Expect(f"{MK}.graph.TaskHandle.task", "memory/layout.py", ("self",)),
    Expect(
        f"{MK}.scripts.multimerge.patched_config",
        "memory/plan.py (stage names as mergekit-multi patches them)",
        ("config", "merge_names", "working_dir"),
    ),
    Expect(f"{MK}.scripts.multimerge.load_config", "merge/disk.py", ("config_source", "intermediate_dir")),
    # mergekit's merge methods: read by memory/layout.py and memory/merger.py, patched by mergekit_fixes (e)
    Expect(
        f"{MK}.merge_methods.generalized_task_arithmetic.GeneralizedTaskArithmeticMerge",
        "memory/layout.py, memory/merger.py, memory/chunked.py, memory/batched.py read sparsification_method, "
        "consensus_method",
        fields=("consensus_method", "sparsification_method", "method_name"),
    ),
    Expect(
        f"{MK}.merge_methods.generalized_task_arithmetic.GeneralizedTaskArithmeticMerge.merge_group",
        "memory/chunked.in_chunks replaces it (per instance) with a chunked equal",
        ("self", "group"),
        "exact",
    ),
    Expect(
        f"{MK}.merge_methods.base.MergeMethod._execute_resolved",
        "memory/batched.py records each task's call to it (per instance) and calls it over many groups",
        ("self", "groups", "parameters", "dtype", "out_dtype", "batch_options"),
        "exact",
    ),
    Expect(
        f"{MK}.merge_methods.slerp._CHUNK_ELEMENTS",
        "memory/batched.py reads it, and scales it by the rows while mergekit's slerp runs over a batch",
    ),
    Expect(
        f"{MK}.merge_methods.generalized_task_arithmetic.get_mask",
        "memory/chunked.py, memory/batched.py",
        ("delta", "method", "mask_dtype"),
    ),
    Expect(
        f"{MK}.sparsify.SparsificationMethod",
        "memory/layout.py, memory/chunked.py",
        attrs=("magnitude", "random", "della_magprune"),
    ),
    Expect(
        f"{MK}.merge_methods.base.TensorGroup",
        "mergekit_fixes.zero_safe_multislerp, memory/chunked.py",
        attrs=("base", "non_base"),
    ),
    Expect(
        f"{MK}.merge_methods.base.TensorEntry",
        "mergekit_fixes.zero_safe_multislerp, memory/chunked.py",
        fields=("tensor", "id"),
    ),
    # mergekit's model loading: patched by mergekit_hooks.models_in_memory, duck-typed by InMemoryLoader
    Expect(
        f"{MK}.common.ModelReference", "mergekit_hooks", fields=("model", "lora", "override_architecture")
    ),
    Expect(
        f"{MK}.common.ModelReference.config",
        "mergekit_hooks.models_in_memory replaces it",
        ("self", "trust_remote_code"),
        "exact",
    ),
    Expect(
        f"{MK}.common.ModelReference.lazy_loader", "memory/merger.py", ("self", "lazy_unpickle"), "accepts"
    ),
    Expect(
        f"{MK}.io.tasks.LoaderCache",
        "mergekit_hooks replaces get; mergekit_fixes.clear_loader_cache empties loaders",
        attrs=("loaders", "flush_all"),
    ),
    Expect(
        f"{MK}.io.tasks.LoaderCache.get",
        "mergekit_hooks.models_in_memory replaces it",
        ("self", "model"),
        "exact",
    ),
    Expect(
        f"{MK}.io.lazy_tensor_loader.LazyTensorLoader.get_tensor",
        "mergekit_hooks.InMemoryLoader duck-types it",
        ("self", "key", "device", "aliases", "raise_on_missing"),
        "exact",
    ),
    Expect(
        f"{MK}.io.lazy_tensor_loader.LazyTensorLoader.flush",
        "mergekit_hooks.InMemoryLoader",
        ("self",),
        "exact",
    ),
    Expect(
        f"{MK}.io.lazy_tensor_loader.ShardedTensorIndex",
        "mergekit_hooks, merge/compat.py",
        fields=("tensor_paths",),
    ),
    Expect(f"{MK}.io.lazy_tensor_loader.ShardedTensorIndex.from_disk", "merge/compat.py", ("base_path",)),
    Expect(
        f"{MK}.io.lazy_tensor_loader.LazyTensorLoader.from_disk",
        "merge/compat.py",
        ("base_path", "lazy_unpickle"),
    ),
    # mergekit's writer: memory/save.py writes a candidate as run_merge does
    Expect(
        f"{MK}.io.tensor_writer.TensorWriter.__init__",
        "merge/save.py",
        ("out_path", "max_shard_size", "safe_serialization"),
        "accepts",
    ),
    Expect(
        f"{MK}.io.tensor_writer.TensorWriter.save_tensor",
        "merge/save.py",
        ("self", "name", "tensor", "clone"),
    ),
    Expect(f"{MK}.io.tensor_writer.TensorWriter.finalize", "merge/save.py", ("self",)),
    Expect(
        f"{MK}.options.MergeOptions",
        "merge/disk.py, merge/save.py, memory/layout.py",
        fields=(
            "device",
            "read_to_gpu",
            "low_cpu_memory",
            "unsafe_truncate_embeddings",
            "trust_remote_code",
            "out_shard_size",
            "safe_serialization",
            "clone_tensors",
            "random_seed",
        ),
    ),
    # lm-eval: task discovery (evaluate/suite.py)
    Expect(
        "lm_eval.tasks._index.TaskIndex._iter_yaml_files",
        "evaluate/suite.py walks the tasks folder with it",
        ("root",),
        "exact",
    ),
    Expect(
        "lm_eval.tasks._yaml_loader.load_yaml",
        "evaluate/suite.py parses each task YAML with it",
        ("path", "resolve_func"),
    ),
    Expect(
        "lm_eval.api.task.TaskConfig",
        "evaluate/suite.py; tasks/_shared/tasklib.py's custom_dataset",
        fields=("process_docs", "custom_dataset", "metadata", "dataset_kwargs", "generation_kwargs"),
    ),
    Expect("lm_eval.api.task.Task.set_config", "evaluate/scorer.py", ("self", "key", "value", "update")),
    Expect("lm_eval.api.task.Task.set_fewshot_seed", "evaluate/scorer.py", ("self", "seed")),
    # lm-eval: HFLM internals that evaluate/generation.py's PooledHFLM overrides or reads
    Expect(
        "lm_eval.models.huggingface.HFLM.__init__",
        "evaluate/scorer.py builds HFLM and PooledHFLM",
        ("pretrained", "tokenizer", "batch_size"),
        "accepts",
    ),
    Expect(
        "lm_eval.models.huggingface.HFLM.generate_until",
        "evaluate/generation.py (PooledHFLM overrides it and falls back to it)",
        ("self", "requests", "disable_tqdm"),
        "exact",
    ),
    Expect(
        "lm_eval.models.huggingface.HFLM.tok_decode",
        "evaluate/generation.py",
        ("self", "tokens", "skip_special_tokens"),
    ),
    Expect("lm_eval.models.utils.handle_stop_sequences", "evaluate/generation.py", ("until", "eos")),
    Expect("lm_eval.models.utils.has_bos_prefix", "evaluate/generation.py", ("sequence", "bos_str")),
    Expect(
        "lm_eval.models.utils.normalize_gen_kwargs",
        "evaluate/generation.py",
        ("gen_kwargs", "default_max_gen_toks"),
    ),
    Expect(
        "lm_eval.models.utils.postprocess_generated_text",
        "evaluate/generation.py",
        ("generation", "stop", "think_end_token"),
    ),
    Expect("lm_eval.api.instance.Instance", "evaluate/generation.py reads request.args", attrs=("args",)),
    # likelihood fitness: gold tokens counted on the boundary lm-eval's loglikelihood encodes them with
    Expect(
        "lm_eval.api.model.TemplateLM._encode_pair",
        "evaluate/likelihood.py (encode_gold)",
        ("self", "context", "continuation"),
        "exact",
    ),
    # teacher_forced reproduces it (tested equal); item_scores calls it for other lm-eval models
    Expect(
        "lm_eval.models.huggingface.HFLM._loglikelihood_tokens",
        "evaluate/likelihood.py (item_scores; teacher_forced gives its values)",
        ("self", "requests", "disable_tqdm"),
    ),
    Expect(
        "lm_eval.models.huggingface.HFLM",
        "evaluate/likelihood.py (teacher_forced reads the model, its context length and batch size)",
        attrs=("model", "max_length", "batch_size", "backend", "device"),
    ),
]


def resolve(name: str) -> Any:
    """Import the longest importable module prefix of `name`, then follow the attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(name)


def field_names(cls: type) -> set[str]:
    if hasattr(cls, "model_fields"):
        return set(cls.model_fields)
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    return set()


@pytest.mark.parametrize("expect", EXPECTED, ids=lambda e: e.name)
def test_private_name_is_as_evoforge_expects(expect: Expect) -> None:
    where = f"(evoforge: {expect.used_by})"
    try:
        obj = resolve(expect.name)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{expect.name} is gone ({type(error).__name__}: {error}) {where}")
    if expect.params is not None:
        params = [
            p.name
            for p in inspect.signature(obj).parameters.values()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        wanted = list(expect.params)
        ok = {
            "exact": params == wanted,
            "prefix": params[: len(wanted)] == wanted,
            "accepts": set(wanted) <= set(params),
        }[expect.match]
        assert ok, (
            f"{expect.name}: evoforge expects parameters {wanted} ({expect.match}), found {params} {where}"
        )
    if expect.fields:
        found = field_names(obj)
        missing = set(expect.fields) - found
        assert not missing, (
            f"{expect.name}: evoforge reads fields {sorted(missing)}, gone (has {sorted(found)}) {where}"
        )
        if expect.all_fields:
            new = found - set(expect.fields)
            assert not new, (
                f"{expect.name}: new fields {sorted(new)} that model_construct would leave unset {where}"
            )
    missing = [attr for attr in expect.attrs if not hasattr(obj, attr)]
    assert not missing, f"{expect.name}: evoforge reads {missing}, gone {where}"


def test_every_private_name_has_an_entry() -> None:
    """A private mergekit/lm-eval name newly used in evoforge/ or tasks/_shared/ needs an entry above."""
    covered = [e.name for e in EXPECTED]
    missing = []
    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for name, line in _private_names(path).items():
                # an import of a private module is covered by entries below it; a longer chain by its prefix
                if not any(
                    c == name or c.startswith(f"{name}.") or name.startswith(f"{c}.") for c in covered
                ):
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {name}")
    assert not missing, "private mergekit/lm-eval names without a canary entry:\n" + "\n".join(missing)
