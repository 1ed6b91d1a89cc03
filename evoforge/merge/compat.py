"""Can these models be merged? Checked from config.json and safetensors headers, before any merge runs.

Hard failures (`IncompatibleModelsError`): a different architecture, a tensor one model has and another lacks,
or a tensor shape that differs. Warnings: config.json differences (rope_theta, tied embeddings...: the merge
keeps the base model's config.json) and kinship — models that do not look fine-tuned from one ancestor, where
TIES/DARE deltas mean nothing. Only a few sampled matrices are ever read.
"""

from __future__ import annotations

import json
import math
import re
from itertools import combinations
from pathlib import Path

import torch
from mergekit.io import LazyTensorLoader, ShardedTensorIndex
from safetensors import safe_open

from evoforge.errors import IncompatibleModelsError, ModelNotAvailableError
from evoforge.models import locate_model

# Kinship thresholds, calibrated on the tiny families (tests/test_compat.py). Related: children = ancestor +
# 2 % noise give sibling cosine 0.9996 and relative delta 0.02 to the ancestor. Unrelated: families from
# different seeds give cosine within ±0.03 of 0 and relative delta 1.42 (≈ √2, independent weights of equal
# norm). Real fine-tunes (the demo's three LoRA specialists of SmolLM2-135M-Instruct, merged, on the same 6
# sampled matrices; 2026-12-05): relative delta 0.0021-0.0042, pairwise cosine 0.99995, their task vectors
# nearly orthogonal (cosine 0.05-0.07): deeper in the related cluster than the tiny children. At the seed's
# scale (Qwen2.5-Coder-1.5B-Instruct and its three LoRA specialists, r=4, 200-300 steps; 2026-12-06):
# relative delta 0.0063-0.0101, pairwise cosine 0.99993-0.99996, task vectors nearly orthogonal (cosine
# 0.11-0.16). Independently trained real models of one shape are not available offline; the
# nearest proxy, each sampled matrix of that ancestor against the same-named matrix 14 layers away (trained,
# same shape, no shared initialisation), gives relative delta 1.31 and cosine 0.002, the unrelated cluster.
# Both thresholds sit halfway, far from either (tests/test_trios.py checks prepared 1.5 B specialists).
MIN_COSINE = 0.5
MAX_RELATIVE_DELTA = 0.5
SAMPLED_MATRICES = 6

# config.json keys whose differences say nothing about the merge.
_IGNORED_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures", "use_cache"}
)
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def resolve_model(ref: str | Path) -> Path:
    """A merge input's folder: located by `evoforge.models.locate_model` (a folder, else an HF id from the local
    cache), and holding weights mergekit can read. Raises ModelNotAvailableError."""
    path = locate_model(ref)
    try:
        ShardedTensorIndex.from_disk(str(path))
    except RuntimeError:
        raise ModelNotAvailableError(
            f"model {ref}: {path} has no model.safetensors or pytorch_model.bin"
        ) from None
    return path


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor, from safetensors headers (or meta-device unpickling of .bin files)."""
    index = ShardedTensorIndex.from_disk(str(folder))
    shapes: dict[str, tuple[int, ...]] = {}
    for shard in index.shards:
        path = Path(index.base_path) / shard.filename
        if index.is_safetensors:
            with safe_open(path, framework="pt") as reader:
                shapes.update({name: tuple(reader.get_slice(name).get_shape()) for name in reader.keys()})
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            shapes.update({name: tuple(tensor.shape) for name, tensor in state.items()})
    return shapes


def _effective_shapes(shapes: dict[str, tuple[int, ...]], config: dict) -> dict[str, tuple[int, ...]]:
    """A model with tied embeddings and no lm_head.weight behaves as if lm_head.weight were its embeddings."""
    embed = "model.embed_tokens.weight"
    if config.get("tie_word_embeddings") and "lm_head.weight" not in shapes and embed in shapes:
        return {**shapes, "lm_head.weight": shapes[embed]}
    return shapes


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in config.items():
        if key in _IGNORED_CONFIG_KEYS:
            continue
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _architecture(config: dict) -> str:
    return (config.get("architectures") or [config.get("model_type", "?")])[0]


def _sample_names(shapes: dict[str, tuple[int, ...]], count: int = SAMPLED_MATRICES) -> list[str]:
    """Weight matrices of transformer layers, spread evenly from the first layer to the last."""
    layered = sorted(
        (int(m.group(1)), name)
        for name, shape in shapes.items()
        if len(shape) == 2 and (m := _LAYER.search(name))
    )
    if len(layered) <= count:
        return [name for _, name in layered]
    return [layered[round(i * (len(layered) - 1) / (count - 1))][1] for i in range(count)]


def _read(folder: Path, names: list[str]) -> list[torch.Tensor]:
    loader = LazyTensorLoader.from_disk(str(folder), lazy_unpickle=False)
    return [loader.get_tensor(name).float().flatten() for name in names]


def relative_delta(model: list[torch.Tensor], ancestor: list[torch.Tensor]) -> float:
    """||θ − θ_anc|| / ||θ_anc|| over the sampled matrices (flattened, in the same order)."""
    base_norm = math.sqrt(sum(float(a.square().sum()) for a in ancestor))
    return (
        math.sqrt(sum(float((t - a).square().sum()) for t, a in zip(model, ancestor, strict=True)))
        / base_norm
    )


def check_compatibility(models: dict[str, str], ancestor: str | None = None) -> list[str]:
    """Check that `models` (name → folder or HF id) and the ancestor can be merged; return warnings.

    Raises IncompatibleModelsError naming two models and the first difference in architecture, tensor name or
    tensor shape. Warns about config.json differences and about models that look unrelated: with an
    ancestor, a relative delta ||θ − θ_anc|| / ||θ_anc|| above MAX_RELATIVE_DELTA; without one, a mean
    pairwise cosine similarity below MIN_COSINE (see the thresholds above for their calibration).
    """
    refs = dict(models)
    anchor = None
    if ancestor is not None:  # the kinship reference: a listed model with that reference, else "ancestor"
        anchor = next((name for name, ref in refs.items() if ref == ancestor), "ancestor")
        refs[anchor] = ancestor
    folders = {name: resolve_model(ref) for name, ref in refs.items()}
    configs = {name: json.loads((folder / "config.json").read_text()) for name, folder in folders.items()}
    shapes = {name: _effective_shapes(tensor_shapes(folders[name]), configs[name]) for name in folders}

    names = list(folders)
    first = names[0]
    warnings: list[str] = []
    for other in names[1:]:
        _check_pair(first, other, configs, shapes)
        reference, candidate = _flat(configs[first]), _flat(configs[other])
        differences = [
            f"{key} {reference.get(key)!r} vs {candidate.get(key)!r}"
            for key in sorted(reference.keys() | candidate.keys())
            if reference.get(key) != candidate.get(key)
        ]
        if differences:
            warnings.append(
                f"{first} and {other} differ in config.json ({'; '.join(differences)}): "
                "the merged model takes config.json from the recipe's base_model"
            )

    sampled = _sample_names(shapes[first])
    tensors = {name: _read(folder, sampled) for name, folder in folders.items()}
    if anchor is not None:
        for name in names:
            if name == anchor:
                continue
            delta = relative_delta(tensors[name], tensors[anchor])
            if delta > MAX_RELATIVE_DELTA:
                warnings.append(
                    f"{name} does not look fine-tuned from the ancestor "
                    f"(relative delta {delta:.2f} > {MAX_RELATIVE_DELTA} on {len(sampled)} "
                    "sampled matrices): TIES/DARE deltas against the ancestor average unrelated weights"
                )
    else:
        for a, b in combinations(names, 2):
            cosine = sum(
                float(torch.nn.functional.cosine_similarity(x, y, dim=0))
                for x, y in zip(tensors[a], tensors[b])
            ) / len(sampled)
            if cosine < MIN_COSINE:
                warnings.append(
                    f"{a} and {b} share no ancestor (cosine similarity {cosine:.2f} < {MIN_COSINE} on "
                    f"{len(sampled)} sampled matrices): TIES/DARE between them averages unrelated weights"
                )
    return warnings


def _check_pair(
    first: str, other: str, configs: dict[str, dict], shapes: dict[str, dict[str, tuple[int, ...]]]
) -> None:
    arch_a, arch_b = _architecture(configs[first]), _architecture(configs[other])
    if arch_a != arch_b:
        raise IncompatibleModelsError(
            f"{first} and {other} have different architectures: {arch_a} vs {arch_b}"
        )
    a, b = shapes[first], shapes[other]
    for tensor in sorted(a.keys() | b.keys()):
        if tensor not in b or tensor not in a:
            has, lacks = (first, other) if tensor in a else (other, first)
            raise IncompatibleModelsError(
                f"{first} and {other} differ: tensor {tensor} is in {has}, not in {lacks}"
            )
        if a[tensor] != b[tensor]:
            raise IncompatibleModelsError(
                f"{first} and {other} differ in the shape of {tensor}: {list(a[tensor])} vs {list(b[tensor])}"
            )
