"""The disk merge path: evoforge-shaped recipes give loadable models, equal to stock `mergekit-multi`'s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import evoforge.merge.disk
from evoforge.errors import ConfigError
from evoforge.merge import merge_options, merge_recipe

Family = dict[str, Path]
SCALE = 0.8


def recipe(
    f: Family, interp: str, crossover: str, structure: str, crossover_base: str = "evoforge_interp"
) -> str:
    """A recipe shaped like evoforge's: interp stage, crossover stage, final passthrough."""
    a, b, g, anc = f["alpha"], f["beta"], f["gamma"], f["ancestor"]
    if interp == "slerp":
        first = f"merge_method: slerp\nbase_model: {a}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
        first += "parameters: {t: 0.3}"
    else:
        weights = f"models:\n  - {{model: {a}, parameters: {{weight: 0.5}}}}\n" + "".join(
            f"  - {{model: {m}, parameters: {{weight: 0.25}}}}\n" for m in (b, g)
        )
        first = (
            f"merge_method: {interp}\nbase_model: {anc if interp == 'multislerp' else a}\n{weights}".rstrip()
        )
    base = anc if crossover_base == "ancestor" else crossover_base
    second = f"merge_method: {crossover}\nbase_model: {base}\nmodels:\n" + "".join(
        f"  - {{model: {m}, parameters: {{weight: {w}, density: 0.6}}}}\n"
        for m, w in ((a, 0.5), (b, 0.4), (g, 0.3))
    )
    filtered = f"{{filter: o_proj, value: {SCALE}}}, {{filter: down_proj, value: {SCALE}}}"
    scale = f"{{scale: [{filtered}, {{value: 1.0}}]}}"
    if structure == "frankenmerge":
        layers = "  - sources: [{model: evoforge_crossover, layer_range: [0, 2]}]\n"
        layers += f"  - sources: [{{model: {b}, layer_range: [2, 4]}}]\n"
        layers += "  - sources: [{model: evoforge_crossover, layer_range: [4, 6]}]\n"
    else:  # a DFS path: layers 2-3 repeat, scaled
        layers = "  - sources: [{model: evoforge_crossover, layer_range: [0, 4]}]\n"
        layers += f"  - sources: [{{model: {b}, layer_range: [2, 4], parameters: {scale}}}]\n"
        layers += f"  - sources: [{{model: evoforge_crossover, layer_range: [2, 6], parameters: {scale}}}]\n"
    return (
        f"name: evoforge_interp\n{first}\ndtype: float32\n---\n"
        f"name: evoforge_crossover\n{second}"
        "parameters: {normalize: true, lambda: 1.0}\ndtype: float32\n---\n"
        f"merge_method: passthrough\nbase_model: evoforge_crossover\nslices:\n{layers}dtype: float32\n"
    )


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(folder) / "model.safetensors")


def assert_same_tensors(left: Path, right: Path) -> None:
    a, b = tensors(left), tensors(right)
    assert a.keys() == b.keys()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


@pytest.mark.parametrize(
    ("arch", "interp", "crossover", "structure", "crossover_base"),
    [
        ("qwen", "linear", "ties", "frankenmerge", "evoforge_interp"),
        ("qwen", "multislerp", "dare_ties", "dfs", "ancestor"),
        ("qwen", "slerp", "ties", "dfs", "evoforge_interp"),
        ("llama", "multislerp", "ties", "frankenmerge", "ancestor"),
        ("llama", "linear", "dare_ties", "dfs", "evoforge_interp"),
    ],
)
def test_recipes_merge_into_models_that_load_and_run(
    request, tmp_path, arch, interp, crossover, structure, crossover_base
):
    family = request.getfixturevalue(f"{arch}_family")
    text = recipe(family, interp, crossover, structure, crossover_base)
    out = merge_recipe(text, tmp_path / "out", device="cpu", random_seed=3, source="seed.yaml")

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == (6 if structure == "frankenmerge" else 10)
    ids = AutoTokenizer.from_pretrained(out)("def add(a, b):", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    assert (out / "mergekit_config.yml").read_text() == text
    assert (out / "generation_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or stage folders left


def test_dfs_path_repeats_and_scales_layers(qwen_family, tmp_path):
    out = merge_recipe(recipe(qwen_family, "linear", "ties", "dfs"), tmp_path / "out", device="cpu")
    merged, beta = tensors(out), tensors(qwen_family["beta"])
    for offset, source_layer in enumerate((2, 3)):  # output layers 4, 5 come from beta's layers 2, 3
        layer = f"model.layers.{4 + offset}"
        torch.testing.assert_close(
            merged[f"{layer}.self_attn.o_proj.weight"],
            SCALE * beta[f"model.layers.{source_layer}.self_attn.o_proj.weight"],
        )
        torch.testing.assert_close(
            merged[f"{layer}.mlp.down_proj.weight"],
            SCALE * beta[f"model.layers.{source_layer}.mlp.down_proj.weight"],
        )
        assert torch.equal(
            merged[f"{layer}.self_attn.q_proj.weight"],
            beta[f"model.layers.{source_layer}.self_attn.q_proj.weight"],
        )
    # output layers 6, 7 repeat crossover layers 2, 3 (output layers 2, 3), scaled
    for repeat, original in ((6, 2), (7, 3)):
        torch.testing.assert_close(
            merged[f"model.layers.{repeat}.mlp.down_proj.weight"],
            SCALE * merged[f"model.layers.{original}.mlp.down_proj.weight"],
        )
        assert torch.equal(
            merged[f"model.layers.{repeat}.mlp.up_proj.weight"],
            merged[f"model.layers.{original}.mlp.up_proj.weight"],
        )


@pytest.mark.slow
def test_same_tensors_as_stock_mergekit_multi(qwen_family, llama_family, tmp_path):
    cases = {
        "qwen": (recipe(qwen_family, "linear", "ties", "frankenmerge"), None),
        "llama": (recipe(llama_family, "multislerp", "dare_ties", "dfs", "ancestor"), 11),
    }
    cli = Path(sys.executable).with_name("mergekit-multi")
    runs = {}
    for name, (text, seed) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        command = [
            str(cli),
            str(tmp_path / f"{name}.yaml"),
            "--intermediate-dir",
            str(tmp_path / f"{name}_stages"),
        ]
        command += ["--out-path", str(tmp_path / f"{name}_cli"), "--no-lazy", "--quiet"]
        command += ["--random-seed", str(seed)] if seed is not None else []
        runs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, (text, seed) in cases.items():
        merge_recipe(text, tmp_path / f"{name}_ours", device="cpu", random_seed=seed)
    for name, run in runs.items():
        output, _ = run.communicate(timeout=120)
        assert run.returncode == 0, output
        assert_same_tensors(tmp_path / f"{name}_cli", tmp_path / f"{name}_ours")
        cli_config = (tmp_path / f"{name}_cli" / "config.json").read_text()
        assert (tmp_path / f"{name}_ours" / "config.json").read_text() == cli_config


def test_dare_with_a_seed_is_reproducible(qwen_family, tmp_path):
    text = recipe(qwen_family, "linear", "dare_ties", "frankenmerge")
    first, again, other = (
        merge_recipe(text, tmp_path / n, device="cpu", random_seed=s)
        for n, s in (("a", 5), ("b", 5), ("c", 6))
    )
    assert_same_tensors(first, again)
    name = "model.layers.0.mlp.up_proj.weight"  # a crossover layer
    assert not torch.equal(tensors(first)[name], tensors(other)[name])


def linear(a: Path, b: Path, weight_a: float) -> str:
    return (
        f"merge_method: linear\nbase_model: {a}\nmodels:\n"
        f"  - {{model: {a}, parameters: {{weight: {weight_a}}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: {1 - weight_a}}}}}\n"
    )


def test_remerge_into_a_path_read_earlier_gives_the_new_weights(qwen_family, tmp_path):
    shared, gamma = tmp_path / "shared", tensors(qwen_family["gamma"])
    for weight in (0.9, 0.2):
        merge_recipe(linear(qwen_family["alpha"], qwen_family["beta"], weight), shared, device="cpu")
        reader = merge_recipe(
            linear(shared, qwen_family["gamma"], 0.5), tmp_path / f"reader_{weight}", device="cpu"
        )
        current, merged = tensors(shared), tensors(reader)
        for name in merged:
            torch.testing.assert_close(merged[name], 0.5 * current[name] + 0.5 * gamma[name])


def test_a_failed_merge_leaves_the_previous_output_and_no_partial_folder(qwen_family, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in qwen_family["beta"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    state = tensors(broken)
    del state["model.layers.4.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})

    out = merge_recipe(linear(qwen_family["alpha"], qwen_family["beta"], 0.5), tmp_path / "out", device="cpu")
    before = tensors(out)
    with pytest.raises(RuntimeError, match=r"model\.layers\.4\.mlp\.up_proj\.weight required"):
        merge_recipe(linear(qwen_family["alpha"], broken, 0.5), out, device="cpu")
    assert all(torch.equal(before[name], value) for name, value in tensors(out).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]


def test_ctrl_c_leaves_no_partial_output(qwen_family, tmp_path, monkeypatch):
    real_run_merge = evoforge.merge.disk.run_merge

    def interrupted(config, out_path, options):
        real_run_merge(config, out_path, options=options)
        raise KeyboardInterrupt

    monkeypatch.setattr(evoforge.merge.disk, "run_merge", interrupted)
    with pytest.raises(KeyboardInterrupt):
        merge_recipe(recipe(qwen_family, "linear", "ties", "frankenmerge"), tmp_path / "out", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_that_is_not_a_model(qwen_family, tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a model folder"):
        merge_recipe(linear(qwen_family["alpha"], qwen_family["beta"], 0.5), tmp_path, device="cpu")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            "dtype: float32\n---\nmerge_method: passthrough",
            "dtype: [float32\n---\nmerge_method: passthrough",
            r"r\.yaml: not valid YAML \(line \d+\)",
        ),
        (
            "parameters: {normalize: true",
            "parameters: {normalise: true",
            r"stage evoforge_crossover: field parameters\.normalise: ties has no parameter 'normalise'",
        ),
        (
            "density: 0.6}}\n  - {model",
            "densty: 0.6}}\n  - {model",
            r"stage evoforge_crossover: field models\.0\.parameters\.densty: ties has no parameter",
        ),
        (
            "{filter: o_proj",
            "{filtr: o_proj",
            r"final document: field slices\.1\.sources\.0\.parameters\.scale\.0\.filtr: unknown key",
        ),
        (
            "merge_method: ties",
            "merge_method: tiez",
            r"stage evoforge_crossover: field merge_method: unknown method 'tiez'",
        ),
        (
            "dtype: float32\n---\nname: evoforge_crossover",
            "dtype: float33\n---\nname: evoforge_crossover",
            r"stage evoforge_interp: field dtype: unknown dtype 'float33'",
        ),
        (
            "layer_range: [0, 4]",
            "layer_range: [0]",
            r"final document: field slices\.0\.sources\.0\.layer_range\.1: Field required",
        ),
        (
            "layer_range: [0, 4]}]",
            "layer_range: [0, 4]}, {model: evoforge_interp, layer_range: [0, 4]}]",
            r"final document: field slices\.0: passthrough: .*exactly 1 inputs",
        ),
        (
            "base_model: evoforge_crossover",
            "base_model: /nowhere/model",
            r"final document: field base_model: model /nowhere/model: no such folder",
        ),
        (
            "merge_method: passthrough",
            "name: evoforge_final\nmerge_method: passthrough",
            "exactly one document without `name`",
        ),
        ("slices:", "linear_weights: 1\nslices:", r"final document: field linear_weights: unknown key"),
        (
            "base_model: evoforge_interp",
            "base_model: evoforge_crossover",
            "stages depend on each other in a cycle",
        ),
    ],
)
def test_bad_recipes_are_one_line_errors_naming_file_and_field(qwen_family, tmp_path, old, new, message):
    text = recipe(qwen_family, "linear", "ties", "dfs")
    assert old in text
    with pytest.raises(ConfigError, match=message) as error:
        merge_recipe(text.replace(old, new, 1), tmp_path / "out", device="cpu", source="r.yaml")
    assert str(error.value).startswith("r.yaml:") and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_device_options():
    assert merge_options("cpu", random_seed=4).device == "cpu"
    with pytest.raises(ConfigError, match="device: expected auto, cpu or cuda, got 'tpu'"):
        merge_options("tpu")
    if torch.cuda.is_available():
        options = merge_options("auto")
        assert options.cuda and options.read_to_gpu and options.device == "cuda"
    else:
        assert merge_options("auto").device == "cpu"
        with pytest.raises(ConfigError, match="CUDA is not available"):
            merge_options("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_merge_matches_cpu_merge(qwen_family, tmp_path):
    text = recipe(qwen_family, "multislerp", "ties", "dfs", "ancestor")
    gpu, cpu = (
        tensors(merge_recipe(text, tmp_path / "gpu", device="cuda")),
        tensors(merge_recipe(text, tmp_path / "cpu", device="cpu")),
    )
    assert gpu.keys() == cpu.keys()
    for name in cpu:
        torch.testing.assert_close(gpu[name], cpu[name], rtol=1e-4, atol=1e-5)
