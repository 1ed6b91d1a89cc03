"""The pre-merge compatibility check: hard failures, config warnings, kinship warnings, model resolution."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from evoforge import demo
from evoforge.errors import IncompatibleModelsError
from evoforge.merge.compat import (
    MAX_RELATIVE_DELTA,
    MIN_COSINE,
    ModelNotAvailableError,
    check_compatibility,
    resolve_model,
    tensor_shapes,
)
from evoforge.tiny import make_family


def _children(family: dict[str, Path]) -> dict[str, str]:
    return {name: str(family[name]) for name in ("alpha", "beta", "gamma")}


def _variant(source: Path, target: Path, config: dict | None = None, edit=None) -> Path:
    """A copy of a model folder with config.json keys replaced and its state dict edited by `edit`."""
    shutil.copytree(source, target)
    if config:
        data = json.loads((target / "config.json").read_text())
        data.update(config)
        (target / "config.json").write_text(json.dumps(data))
    if edit:
        state = load_file(target / "model.safetensors")
        edit(state)
        save_file(state, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_related_family_passes_without_warnings(qwen_family, llama_family):
    assert check_compatibility(_children(qwen_family)) == []
    assert check_compatibility(_children(qwen_family), ancestor=str(qwen_family["ancestor"])) == []
    assert check_compatibility(_children(llama_family), ancestor=str(llama_family["ancestor"])) == []


def test_real_lora_fine_tunes_pass_without_warnings():
    """The demo's specialists (LoRA fine-tunes of SmolLM2-135M-Instruct, as `evoforge demo prepare` builds them
    in the user's cache): real related checkpoints are not mistaken for unrelated ones."""
    cache = demo.default_cache_dir()
    folders = {name: cache / f"smollm2-{name}" for name in ("code", "math", "multilingual")}
    ancestor = cache / "smollm2-135m-instruct"
    if not all((f / "config.json").exists() for f in (*folders.values(), ancestor)):
        pytest.skip(f"the demo trio is not prepared in {cache} (evoforge demo prepare)")
    models = {name: str(folder) for name, folder in folders.items()}
    assert check_compatibility(models) == []
    assert check_compatibility(models, ancestor=str(ancestor)) == []


def test_unrelated_models_get_a_kinship_warning(qwen_family, unrelated_qwen_family):
    models = {"alpha": str(qwen_family["alpha"]), "stranger": str(unrelated_qwen_family["alpha"])}
    (warning,) = check_compatibility(models)
    assert "alpha and stranger share no ancestor" in warning
    assert "TIES/DARE" in warning
    cosine = float(warning.split("cosine similarity ")[1].split()[0])
    assert abs(cosine) < MIN_COSINE / 5  # calibration: unrelated weights are near-orthogonal

    (warning,) = check_compatibility(models, ancestor=str(qwen_family["ancestor"]))
    assert warning.startswith("stranger does not look fine-tuned from the ancestor")
    delta = float(warning.split("relative delta ")[1].split()[0])
    assert delta > 2 * MAX_RELATIVE_DELTA  # calibration: ≈ √2 for independent weights of equal norm


def test_architecture_mismatch_names_both_models(qwen_family, llama_family):
    with pytest.raises(IncompatibleModelsError, match="qwen and llama have different architectures: Qwen2"):
        check_compatibility({"qwen": str(qwen_family["alpha"]), "llama": str(llama_family["alpha"])})


def test_shape_mismatch_names_the_tensor(qwen_family, tmp_path):
    narrow = make_family(tmp_path, arch="qwen2", hidden=32, children=("alpha",))
    with pytest.raises(
        IncompatibleModelsError, match=r"alpha and narrow differ in the shape of lm_head\.weight"
    ):
        check_compatibility({"alpha": str(qwen_family["alpha"]), "narrow": str(narrow["alpha"])})


def test_missing_tensor_is_incompatible(qwen_family, tmp_path):
    pruned = _variant(
        qwen_family["beta"], tmp_path / "pruned", edit=lambda s: s.pop("model.layers.3.mlp.up_proj.weight")
    )
    with pytest.raises(
        IncompatibleModelsError, match=r"tensor model\.layers\.3\.mlp\.up_proj\.weight is in alpha"
    ):
        check_compatibility({"alpha": str(qwen_family["alpha"]), "pruned": str(pruned)})


def test_tied_and_untied_embeddings_with_other_rope_theta_only_warn(qwen_family, tmp_path):
    """The seed's Qwen2 1.5B models differ in tied embeddings and rope_theta: mergeable, with a warning."""

    def untie(state: dict[str, torch.Tensor]) -> None:
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()

    untied = _variant(
        qwen_family["beta"],
        tmp_path / "untied",
        config={"tie_word_embeddings": False, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
        edit=untie,
    )
    assert "lm_head.weight" not in tensor_shapes(qwen_family["alpha"])
    (warning,) = check_compatibility({"alpha": str(qwen_family["alpha"]), "untied": str(untied)})
    assert "rope_parameters.rope_theta 10000.0 vs 1000000.0" in warning
    assert "tie_word_embeddings True vs False" in warning
    assert "base_model" in warning


def test_pytorch_bin_checkpoints_are_read_too(qwen_family, tmp_path):
    shutil.copytree(qwen_family["gamma"], tmp_path / "bin", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(qwen_family["gamma"] / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    assert tensor_shapes(tmp_path / "bin") == tensor_shapes(qwen_family["gamma"])
    assert check_compatibility({"alpha": str(qwen_family["alpha"]), "bin": str(tmp_path / "bin")}) == []


def test_hf_ids_resolve_through_the_local_cache_only(qwen_family, offline_hf_cache):
    folder = resolve_model(offline_hf_cache)
    assert (folder / "config.json").read_text() == (qwen_family["alpha"] / "config.json").read_text()
    assert check_compatibility({"hub": offline_hf_cache, "beta": str(qwen_family["beta"])}) == []
    with pytest.raises(ModelNotAvailableError, match=r"evoforge-test/absent: .*not available offline"):
        check_compatibility({"hub": offline_hf_cache, "absent": "evoforge-test/absent"})


def test_missing_folders_and_weights_are_clear_errors(qwen_family, tmp_path):
    with pytest.raises(ModelNotAvailableError, match=f"model {tmp_path}/nope: no such folder"):
        resolve_model(tmp_path / "nope")
    shutil.copytree(qwen_family["alpha"], tmp_path / "empty", ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ModelNotAvailableError, match=r"has no model\.safetensors"):
        resolve_model(tmp_path / "empty")
