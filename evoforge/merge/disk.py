"""Run a mergekit recipe to a model folder on disk: the reference merge path.

A recipe is what `mergekit-multi` runs: YAML documents, those with a `name` are stages whose output later
documents use under that name, and the one unnamed document is the final merge. `merge_recipe` gives the same
tensors as `mergekit-multi --no-lazy --random-seed N` (a test holds them together), with evoforge's
workarounds for mergekit bugs (`mergekit_fixes`) and an atomic output folder.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import Any

import yaml
from mergekit import merge_methods
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from mergekit.scripts.multimerge import load_config
from pydantic import ValidationError

from evoforge.errors import ConfigError, ModelNotAvailableError
from evoforge.merge import mergekit_fixes
from evoforge.merge.compat import resolve_model
from evoforge.models import check_model_files, locate_model, read_model_config, resolve_device
from evoforge.userfile import YAML_LOADER, load_yaml_all, non_finite  # noqa: F401  (YAML_LOADER: evolve.candidates)

# Values of a model-reference key that are not models (`tokenizer_source: union`).
_NOT_MODELS = frozenset({"union", "base"})
# A stage name is a folder name under the intermediate directory: never a path (`../x`, `a/b`, `/abs`).
_STAGE_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
# Files that mark an existing output folder as a model evoforge may replace.
_MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", "mergekit_config.yml")


def _loc(parts: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in parts)


def _parse(recipe_yaml: str, source: str) -> list[dict[str, Any]]:
    documents = load_yaml_all(recipe_yaml, source)
    if not documents:
        raise ConfigError(f"{source}: the recipe is empty")
    for index, doc in enumerate(documents):
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: document {index + 1} is not a mapping of mergekit fields")
    names = [doc.get("name") for doc in documents]
    for index, name in enumerate(names):
        if name is not None and not (isinstance(name, str) and _STAGE_NAME.fullmatch(name)):
            raise ConfigError(
                f"{source}: document {index + 1}: name: {name!r} is not a plain name (letters, digits, `_`, "
                "`.`, `-`; mergekit writes the stage to a folder of that name)"
            )
        if name is not None and names.count(name) > 1:
            raise ConfigError(f"{source}: stage name {name!r} is used twice")
    if names.count(None) != 1:
        raise ConfigError(
            f"{source}: a recipe needs exactly one document without `name` (the final merge); it has "
            f"{names.count(None)}"
        )
    mergekit_fixes.check_stage_names(documents, source)
    return documents


def _unknown_key(raw: Any, parsed: Any, loc: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
    """The location of the first key in the YAML that mergekit's schema silently dropped."""
    if isinstance(raw, dict) and isinstance(parsed, dict):
        for key, value in raw.items():
            if key not in parsed:
                return (*loc, key)
            if found := _unknown_key(value, parsed[key], (*loc, key)):
                return found
    elif isinstance(raw, list) and isinstance(parsed, list):
        for index, (value, parsed_value) in enumerate(zip(raw, parsed)):
            if found := _unknown_key(value, parsed_value, (*loc, index)):
                return found
    return None


def _parameter_blocks(value: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], dict]]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "parameters" and isinstance(item, dict):
                yield (*loc, key), item
            else:
                yield from _parameter_blocks(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _parameter_blocks(item, (*loc, index))


def _model_refs(value: Any, loc: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], dict, str]]:
    """(location, containing mapping, key) of every string that names a model."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in mergekit_fixes.MODEL_KEYS and isinstance(item, str):
                if item not in _NOT_MODELS:
                    yield (*loc, key), value, key
            else:
                yield from _model_refs(item, (*loc, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _model_refs(item, (*loc, index))


def _check_document(
    doc: dict[str, Any], stage_names: set[str], where: str, resolved: dict[str, str]
) -> MergeConfiguration:
    """Validate one document like mergekit would, plus what mergekit accepts silently; localise its models.
    `resolved`: model reference → local folder, shared by a recipe's documents (a DFS path names the same few
    models dozens of times; each resolution reads a safetensors index)."""
    if (bad := non_finite(doc)) is not None:
        raise ConfigError(f"{where}: field {_loc(bad)}: not a finite number")
    try:
        config = MergeConfiguration.model_validate(doc)
    except ValidationError as error:
        first = error.errors()[0]
        raise ConfigError(f"{where}: field {_loc(first['loc'])}: {first['msg']}") from None
    except (ValueError, RuntimeError) as error:  # mergekit's model validators raise these directly
        raise ConfigError(f"{where}: {error}") from None
    if unknown := _unknown_key(doc, config.model_dump()):
        raise ConfigError(f"{where}: field {_loc(unknown)}: unknown key (mergekit would ignore it)")
    try:
        method = merge_methods.get(config.merge_method)
    except RuntimeError:
        known = ", ".join(sorted(m.spec.name for m in merge_methods.registered_methods()))
        raise ConfigError(
            f"{where}: field merge_method: unknown method {config.merge_method!r} ({known})"
        ) from None
    allowed = {parameter.name for parameter in method.spec.parameters}
    for loc, block in _parameter_blocks(doc):
        for name in block:
            if name not in allowed:
                raise ConfigError(
                    f"{where}: field {_loc((*loc, name))}: {config.merge_method} has no parameter {name!r} "
                    f"(it takes: {', '.join(sorted(allowed)) or 'none'}; mergekit would ignore it)"
                )
    for field in ("dtype", "out_dtype"):
        if (value := doc.get(field)) is not None:
            try:
                dtype_from_name(value)
            except RuntimeError:
                raise ConfigError(f"{where}: field {field}: unknown dtype {value!r}") from None
    groups = []
    if config.models:
        inputs = [entry.model for entry in config.models]
        if config.base_model and config.base_model not in inputs:
            inputs.append(config.base_model)
        groups.append(("models", inputs, config.base_model))
    for index, out_slice in enumerate(config.slices or []):
        base = out_slice.base_model or config.base_model
        groups.append((f"slices.{index}", [source.model for source in out_slice.sources], base))
    for loc, inputs, base in groups:
        try:
            method.validate_inputs(inputs, base, group_name=loc)
        except ValueError as error:
            raise ConfigError(f"{where}: field {loc}: {config.merge_method}: {error}") from None
    for loc, mapping, key in _model_refs(doc):
        if mapping[key] in resolved:
            mapping[key] = resolved[mapping[key]]
        elif mapping[key] not in stage_names:
            try:
                check_model_files(locate_model(mapping[key]), f"model {mapping[key]}", tokenizer=False)
                mapping[key] = resolved[mapping[key]] = str(resolve_model(mapping[key]))
            except ConfigError as error:
                stages = f" (stages: {', '.join(sorted(stage_names))})" if stage_names else ""
                raise ModelNotAvailableError(f"{where}: field {_loc(loc)}: {error}{stages}") from None
    return config


def validate_recipe(recipe_yaml: str, *, source: str = "recipe") -> list[dict[str, Any]]:
    """Check a recipe without merging; return its documents with every model as a local folder.

    Beyond mergekit's own schema this refuses what mergekit accepts and then ignores or misreads: unknown
    keys, misspelt parameter names, unknown merge methods and dtypes, input counts a method cannot take,
    stage names that collide with other strings, and models that are not available locally. Every error is
    one line naming `source`, the document and the field.
    """
    documents = _parse(recipe_yaml, source)
    stage_names = {doc["name"] for doc in documents if "name" in doc}
    configs, resolved = {}, {}
    for doc in documents:
        body = {key: value for key, value in doc.items() if key != "name"}
        where = f"{source}: stage {doc['name']}" if "name" in doc else f"{source}: final document"
        configs[doc.get("name")] = (where, _check_document(body, stage_names, where, resolved))
        doc.update(body)  # the localised model paths
    graph = {
        name: {str(m.model.path) for m in cfg.referenced_models()} & stage_names
        for name, (_, cfg) in configs.items()
    }
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as error:
        raise ConfigError(f"{source}: stages depend on each other in a cycle: {error.args[1]}") from None
    _check_layer_ranges(configs)
    return documents


def _check_layer_ranges(configs: dict[str | None, tuple[str, MergeConfiguration]]) -> None:
    """Every slice's layer_range lies inside its source model (mergekit only finds out mid-merge, with a
    missing-tensor error). A stage's depth is its slices' total, else the depth of its first input."""
    depths: dict[str, int] = {}

    def depth(model: str) -> int:
        if model not in depths:
            if model in configs:
                cfg = configs[model][1]
                depths[model] = (
                    sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in cfg.slices)
                    if cfg.slices
                    else depth(str((cfg.base_model or cfg.models[0].model).model.path))
                )
            else:
                depths[model] = int(read_model_config(model)["num_hidden_layers"])
        return depths[model]

    for where, cfg in configs.values():
        for i, out_slice in enumerate(cfg.slices or []):
            for j, src in enumerate(out_slice.sources):
                start, end = src.layer_range
                n = depth(str(src.model.model.path))
                if not 0 <= start < end <= n:
                    raise ConfigError(
                        f"{where}: field slices.{i}.sources.{j}.layer_range: [{start}, {end}] is outside "
                        f"{src.model.model.path}'s {n} layers"
                    )


def merge_options(device: str = "auto", random_seed: int | None = None, quiet: bool = True) -> MergeOptions:
    """mergekit options for a device as `evoforge.models.resolve_device` picks it (auto, cpu, cuda, cuda:N).

    On CUDA, weights are read straight to the GPU and intermediates stay there (`read_to_gpu`,
    `low_cpu_memory`): the fastest single-GPU setting measured (shared/notes/mergekit.md).
    """
    target = resolve_device(device)
    if target.type == "cuda":
        return MergeOptions(
            cuda=True,
            device=str(target),
            read_to_gpu=True,
            low_cpu_memory=True,
            random_seed=random_seed,
            quiet=quiet,
        )
    return MergeOptions(device="cpu", random_seed=random_seed, quiet=quiet)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse an output path holding anything but a model: replacing it would delete the user's files."""
    if out_dir.exists() and (
        not out_dir.is_dir()
        or (any(out_dir.iterdir()) and not any((out_dir / marker).exists() for marker in _MODEL_MARKERS))
    ):
        raise ConfigError(f"{out_dir}: exists and is not a model folder; refusing to replace it")


@contextmanager
def atomic_model_folder(out_dir: Path) -> Iterator[Path]:
    """A staging folder next to `out_dir`; its `model` subfolder replaces `out_dir` when the block completes.

    The staging folder is hidden and deleted afterwards, so an error or Ctrl-C leaves no partial `out_dir` (and
    an existing one untouched). Refuses an `out_dir` that holds anything but a model."""
    out_dir = Path(out_dir).expanduser().resolve()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            os.replace(out_dir, staging / "previous")  # deleted with the staging folder
        os.replace(staging / "model", out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def merge_recipe(
    recipe_yaml: str,
    out_dir: Path,
    *,
    device: str = "auto",
    random_seed: int | None = None,
    work_dir: Path | None = None,
    quiet: bool = True,
    source: str = "recipe",
) -> Path:
    """Merge a recipe into `out_dir` (created or replaced atomically) and return its resolved path.

    Stages run in dependency order, each with mergekit's `run_merge`, non-lazily, into a fresh temporary
    folder (under `work_dir` if given) that is deleted afterwards. The final model is written into a hidden
    sibling of `out_dir` and renamed into place only when complete: an error or Ctrl-C leaves no partial
    `out_dir`. `random_seed` seeds DARE's random masks, so the same recipe and seed give the same weights.
    The recipe text is saved as `out_dir/mergekit_config.yml`: `mergekit-multi` reproduces the model from it.
    """
    documents = validate_recipe(recipe_yaml, source=source)
    options = merge_options(device, random_seed, quiet)
    with atomic_model_folder(out_dir) as staging:
        final = staging / "model"
        with mergekit_fixes.stage_dir(work_dir or staging) as stages, mergekit_fixes.applied():
            configs, dependencies = load_config(yaml.safe_dump_all(documents, sort_keys=False), str(stages))
            for name in TopologicalSorter(dependencies).static_order():
                path = final if name is None else stages / name
                run_merge(configs[name], str(path), options=options)
                mergekit_fixes.copy_generation_config(configs[name], path)
        (final / "mergekit_config.yml").write_text(recipe_yaml)
    return Path(out_dir).expanduser().resolve()
