"""evoforge.models: the one rule for where a model is (folder, local HF cache, error) and which device to use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evoforge.config import load_config
from evoforge.errors import ConfigError, ModelNotAvailableError
from evoforge.evaluate.scorer import Scorer, load_model
from evoforge.merge.compat import resolve_model
from evoforge.merge.disk import merge_options
from evoforge.models import check_model_files, check_run_models, locate_model, model_ref, resolve_device

CACHED = "evoforge-test/tiny-qwen"


def model_folder(path: Path, marker: str = "") -> Path:
    """A folder the locator accepts (config.json is what makes a folder a model) and a run's model check
    too (whole safetensors weights and a tokenizer file)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"marker": marker}))
    save_file({"w": torch.zeros(2)}, path / "model.safetensors")
    (path / "tokenizer.json").write_text("{}")
    return path


def run_file(folder: Path, *paths: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    models = [{"name": f"m{i}", "path": p} for i, p in enumerate(paths)]
    file = folder / "run.yaml"
    file.write_text(yaml.safe_dump({"base_models": models}))
    return file


def test_a_folder_is_its_absolute_path(tmp_path):
    folder = model_folder(tmp_path / "alpha")
    assert locate_model(folder) == folder.resolve()
    assert locate_model(str(folder)) == folder.resolve()
    assert model_ref(folder) == str(folder.resolve())


def test_relative_paths_resolve_against_the_run_file_not_the_working_directory(tmp_path, monkeypatch):
    model_folder(tmp_path / "runs" / "models" / "alpha", "next to the run file")
    model_folder(tmp_path / "elsewhere" / "models" / "alpha", "in the working directory")
    model_folder(tmp_path / "runs" / "beta")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = load_config(run_file(tmp_path / "runs", "./models/alpha", "beta"))

    configs = check_run_models(cfg)
    assert configs["m0"]["marker"] == "next to the run file"
    assert [cfg.resolve(m) for m in cfg.base_models] == [
        str((tmp_path / "runs" / "models" / "alpha").resolve()),
        str((tmp_path / "runs" / "beta").resolve()),
    ]
    assert cfg.resolved().base_models[1].path == str((tmp_path / "runs" / "beta").resolve())


def test_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    folder = model_folder(tmp_path / "models" / "alpha")
    assert locate_model("~/models/alpha") == folder.resolve()
    assert model_ref("~/models/alpha", base_dir=tmp_path / "runs") == str(folder.resolve())


def test_hf_ids_come_from_the_local_cache_and_stay_ids_in_recipes(qwen_family, offline_hf_cache, tmp_path):
    folder = locate_model(CACHED)
    assert "models--evoforge-test--tiny-qwen" in str(folder)
    assert (folder / "config.json").read_text() == (qwen_family["alpha"] / "config.json").read_text()
    assert locate_model(f"{CACHED}@main") == folder
    assert resolve_model(CACHED) == folder  # the merge path: same folder, weights checked too
    assert model_ref(CACHED, base_dir=tmp_path) == CACHED

    cfg = load_config(run_file(tmp_path, CACHED, str(qwen_family["beta"])))
    assert cfg.resolve(cfg.base_models[0]) == CACHED
    assert check_run_models(cfg)["m0"] == json.loads((folder / "config.json").read_text())

    scorer = Scorer.from_pretrained(CACHED, device="cpu")  # the scorer finds the same files
    assert scorer.model.config.hidden_size == json.loads((folder / "config.json").read_text())["hidden_size"]
    scorer.load_weights(qwen_family["beta"])
    scorer.load_weights(CACHED)  # a base model named by its id is scored from the cache (baselines)
    cached = load_file(folder / "model.safetensors")
    assert all(torch.equal(scorer.model.state_dict()[name], tensor) for name, tensor in cached.items())


def test_a_folder_wins_over_a_cached_id_of_the_same_name(offline_hf_cache, tmp_path):
    local = model_folder(tmp_path / CACHED, "local copy")
    assert locate_model(CACHED, base_dir=tmp_path) == local.resolve()
    assert model_ref(CACHED, base_dir=tmp_path) == str(local.resolve())


def test_missing_models_are_one_line_errors_naming_file_and_field(offline_hf_cache, tmp_path):
    model_folder(tmp_path / "alpha")
    (tmp_path / "empty").mkdir()
    cases = {
        "evoforge-test/absent": "path evoforge-test/absent: no such folder, and not in the local Hugging "
        "Face cache (not available offline: download it first, e.g. `hf download evoforge-test/absent`)",
        "./gone": f"path ./gone: no such folder ({tmp_path / 'gone'})",
        "/nowhere/model": "path /nowhere/model: no such folder",
        "not an id!": "path not an id!: no such folder",
        "empty": "path empty: not a model folder (no config.json)",
    }
    for ref, problem in cases.items():
        cfg = load_config(run_file(tmp_path, "alpha", ref))
        with pytest.raises(ModelNotAvailableError) as error:
            check_run_models(cfg)
        assert str(error.value) == f"{tmp_path / 'run.yaml'}: base_models[1] (m1): {problem}"


def test_callers_name_the_model_as_their_input_spells_it(tmp_path):
    with pytest.raises(ModelNotAvailableError, match=r"^model /nowhere/x: no such folder$"):
        resolve_model("/nowhere/x")
    with pytest.raises(ConfigError, match=r"^/nowhere/x: no such folder$"):
        load_model("/nowhere/x", "cpu")


def test_auto_device_is_cuda_when_torch_sees_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert merge_options("auto").device == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    options = merge_options("auto")
    assert options.cuda and options.device == "cuda"
    assert resolve_device("cpu") == torch.device("cpu")


def test_explicit_cuda_without_a_gpu_is_refused_the_same_way_everywhere(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = "device: 'cuda' asked for, but CUDA is not available on this machine"
    for choose in (resolve_device, merge_options):
        with pytest.raises(ConfigError, match=f"^{message}$"):
            choose("cuda")
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_model(model_folder(tmp_path / "alpha"), "cuda")


@pytest.mark.parametrize("device", ["gpu", "cuda1", "cuda:x", ""])
def test_unknown_devices_are_refused(device):
    with pytest.raises(ConfigError, match=f"^device: expected auto, cpu or cuda, got {device!r}$"):
        resolve_device(device)


def test_sharded_weights_are_checked_shard_by_shard(tmp_path):
    folder = model_folder(tmp_path / "sharded")
    (folder / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": "a", "model-00002-of-00002.safetensors": "b"}
    for name, tensor in shards.items():
        save_file({tensor: torch.ones(3, 4)}, folder / name)
    index = {"metadata": {}, "weight_map": {tensor: name for name, tensor in shards.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    check_model_files(folder, "m")
    second = folder / "model-00002-of-00002.safetensors"
    second.write_bytes(second.read_bytes() + b"\0")  # one byte too many is as wrong as one too few
    with pytest.raises(
        ConfigError, match=r"^m: model-00002-of-00002.safetensors is \d+ bytes but its header"
    ):
        check_model_files(folder, "m")
