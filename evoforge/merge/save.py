"""A candidate merged in memory, written as a model folder: what `merge_recipe` writes, without re-merging.

Saving a run's best model through the disk path merges it again with mergekit's `run_merge` (9-12 s at
3×1.5 B on an H200, bench/RESULTS.md); the memory path already computes the same tensors (tested bit for bit
on the same device), so they are written as they come, through mergekit's own `TensorWriter`, next to the
config mergekit's planner made. mergekit-multi copies each stage's tokenizer (and generation config,
`mergekit_fixes.copy_generation_config`) from that stage's donor, so the final folder gets the files of the
first model the chain of donors reaches; that model's files are copied with mergekit's `_copy_tokenizer`.
The folder appears atomically, with the recipe as `mergekit_config.yml`, as `merge_recipe` leaves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import mergekit.merge
import torch
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.tensor_writer import TensorWriter
from mergekit.options import MergeOptions
from transformers import PretrainedConfig

from evoforge.merge import mergekit_fixes
from evoforge.merge.disk import atomic_model_folder, validate_recipe
from evoforge.merge.memory import MemoryMerger, NotInMemory


class FolderSink:
    """Writes merged tensors into a model folder through mergekit's `TensorWriter` (its shard size and format),
    each moved to the host as it comes so that a shard never collects on the GPU."""

    def __init__(self, folder: Path, config: PretrainedConfig, options: MergeOptions) -> None:
        config.save_pretrained(folder)
        self.writer = TensorWriter(
            str(folder), max_shard_size=options.out_shard_size, safe_serialization=options.safe_serialization
        )
        self.clone = options.clone_tensors

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.save_tensor(name, tensor.to("cpu"), clone=self.clone)

    def close(self) -> None:
        self.writer.finalize()


def tokenizer_donor(documents: list[dict], source: str = "recipe") -> MergeConfiguration:
    """The document whose donor (base model, else first model) is a real model, reached from the final
    document through the stages each names as donor: the files mergekit-multi copies along that chain."""
    by_name = {doc.get("name"): doc for doc in documents}
    name: str | None = None
    for _ in documents:
        body = {key: value for key, value in by_name[name].items() if key != "name"}
        config = MergeConfiguration.model_validate(body)
        if config.chat_template:
            raise NotInMemory(f"{source}: a chat template is set by mergekit's tokenizer code (disk path)")
        donor = str((config.base_model or config.referenced_models()[0]).model.path)
        if donor not in by_name:
            return config
        name = donor
    raise NotInMemory(f"{source}: the stages' donors form a cycle")  # validate_recipe refuses cycles first


def _without_stages(config: MergeConfiguration, documents: list[dict]) -> MergeConfiguration:
    """`config` less the models that are this recipe's own stages: mergekit's architecture lookup loads every
    model a document names, and a stage name is no model it can load (it would try the hub)."""
    stages = {doc.get("name") for doc in documents} - {None}
    if not config.models:
        return config
    kept = [m for m in config.models if str(m.model.model.path) not in stages]
    return config.model_copy(update={"models": kept})


def save_merged(
    merger: MemoryMerger,
    recipe_yaml: str,
    out_dir: Path,
    *,
    random_seed: int | None = None,
    source: str = "recipe",
    merged: tuple[PretrainedConfig, Iterable[tuple[str, torch.Tensor]]] | None = None,
) -> Path:
    """Merge `recipe_yaml` in memory into the model folder `out_dir` (created or replaced atomically).

    The tensors and config.json equal what `merge_recipe` writes for the same seed on the same device; the
    tokenizer files, generation_config.json and the architecture's tag-along files are the donor's, copied as
    mergekit copies them. No README: mergekit's card would name the recipe's stages as models (the caller
    writes its own). `merged`: this recipe's config and (name, tensor) pairs as `merger` gave them for this
    seed, written instead of merging again. `NotInMemory` for what only the disk path can do, before
    anything is written."""
    documents = validate_recipe(recipe_yaml, source=source)
    donor = tokenizer_donor(documents, source)
    arch_info = get_architecture_info(_without_stages(donor, documents), merger.options)
    if getattr(arch_info, "post_fill_parameters", False):
        raise NotInMemory(
            f"{source}: mergekit fills this architecture's parameters after merging (disk path)"
        )
    with atomic_model_folder(out_dir) as staging:
        final = staging / "model"
        final.mkdir()
        if merged is None:
            merger.merge(
                recipe_yaml,
                random_seed,
                source=source,
                into=lambda config: FolderSink(final, config, merger.options),
            )
        else:
            sink = FolderSink(final, merged[0], merger.options)
            for name, tensor in merged[1]:
                sink.write(name, tensor)
            sink.close()
        mergekit.merge._copy_tokenizer(donor, str(final), options=merger.options)
        mergekit_fixes.copy_generation_config(donor, final)
        mergekit.merge._copy_tagalong_files(
            donor, str(final), files=arch_info.tagalong_files or [], options=merger.options
        )
        (final / "mergekit_config.yml").write_text(recipe_yaml)
    return Path(out_dir).expanduser().resolve()
