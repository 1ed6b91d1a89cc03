"""The 8 seeds as real merges: 8 different models, disk path == stock mergekit-multi, hand edits, and exact
DFS input scaling."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from evolution_support import NAMES, space_of
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from evoforge.config import MergeOperators, load_config
from evoforge.genome import Genome, GenomeSpace, Step, StructureGene, seed_genomes
from evoforge.merge.disk import merge_recipe
from evoforge.merge.memory import MemoryMerger
from evoforge.recipe import parse, random_seed, render

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """Hash of every tensor's name, dtype, shape and bytes: equal exactly when the models are."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def seed_fingerprints(
    space: GenomeSpace, ops: MergeOperators, weights: Sequence[float], merger: MemoryMerger, run_seed: int
) -> dict[str, str]:
    """label → fingerprint of the merged model, for each of the 8 seeds (memory path == disk path)."""
    out = {}
    for label, genome in seed_genomes(space, ops, weights, run_seed).items():
        text = render(genome, space)
        out[label] = fingerprint(merger.merge(text, random_seed(text))[0])
    return out


@pytest.mark.parametrize("operators", ["default", "demo"])
@pytest.mark.parametrize(
    "arch,ancestor", [("qwen", False), ("qwen", True), ("llama", False), ("llama", True)]
)
def test_the_eight_seeds_are_eight_different_models(arch, ancestor, operators, request, mergers):
    """Every gene enters the result: with an ancestor the interp output is one of the crossover's task
    vectors, and the dfs seed differs from the frankenmerge seed even where the demo's operators (all layers
    from the crossover, no DFS swaps) would make their paths equal."""
    ops = MergeOperators() if operators == "default" else load_config(DEMO).merge_operators
    space = dataclasses.replace(
        space_of(request.getfixturevalue(f"{arch}_family"), ancestor), layer_groups=ops.layer_groups
    )
    prints = seed_fingerprints(space, ops, [1.0, 1.0, 1.0], mergers[arch], run_seed=7)
    assert len(set(prints.values())) == 8, prints


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 8 merges of a 135 M trio on CPU: minutes each on 2 shared cores
def test_demo_trio_seeds_are_eight_different_models():
    """The demo run file's 8 seeds on its real models (`evoforge demo prepare`); run with -s to see them."""
    cfg = load_config(DEMO)
    paths = [cfg.resolve(m) for m in (*cfg.base_models, cfg.ancestor)]
    if not all(Path(p).is_dir() for p in paths):
        pytest.skip("the demo models are not prepared (evoforge demo prepare)")
    space = GenomeSpace.from_config(cfg)
    merger = MemoryMerger(paths, device="cpu")
    weights = [m.weight for m in cfg.base_models]
    prints = seed_fingerprints(space, cfg.merge_operators, weights, merger, cfg.seed)
    print("\n".join(f"{label:28} {fp}" for label, fp in prints.items()))
    assert len(set(prints.values())) == 8, prints


STOCK = """
import sys
from mergekit.scripts.multimerge import main
for recipe, out, seed in zip(*[iter(sys.argv[1:])] * 3):
    main([recipe, "--intermediate-dir", out + ".stages", "--out-path", out, "--no-lazy", "--random-seed", seed],
         standalone_mode=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch,ancestor", [("qwen", False), ("llama", True)])
def test_all_eight_seeds_merge_load_run_and_equal_stock_mergekit_multi(arch, ancestor, request, tmp_path):
    family = request.getfixturevalue(f"{arch}_family")
    space = space_of(family, ancestor)
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    argv = []
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    for label, genome in seeds.items():
        text = render(genome, space)
        (tmp_path / f"{label}.yaml").write_text(text)
        merged = merge_recipe(text, tmp_path / "ours" / label, device="cpu", random_seed=random_seed(text))
        model = AutoModelForCausalLM.from_pretrained(merged)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 5, model.config.vocab_size) and torch.isfinite(logits).all()
        argv += [str(tmp_path / f"{label}.yaml"), str(tmp_path / "stock" / label), str(random_seed(text))]
    subprocess.run([sys.executable, "-c", STOCK, *argv], check=True, capture_output=True, timeout=600)
    for label in seeds:
        ours, stock = tensors(tmp_path / "ours" / label), tensors(tmp_path / "stock" / label)
        assert ours.keys() == stock.keys()
        for name in ours:
            assert torch.equal(ours[name], stock[name]), (label, name)


def test_hand_edited_seed_merges_differently_and_round_trips(qwen_family, tmp_path):
    space = space_of(qwen_family, ancestor=False)
    genome = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)["linear-ties-frankenmerge"]
    text = render(genome, space)
    edited = text.replace(
        "parameters: {weight: 0.333333, density: 0.9}", "parameters: {weight: 0.8, density: 0.9}", 1
    )
    assert edited != text
    a = tensors(merge_recipe(text, tmp_path / "a", device="cpu"))
    b = tensors(merge_recipe(edited, tmp_path / "b", device="cpu"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    hand = parse(edited, space, source="edited.yaml")
    assert hand != genome and hand.crossover.weights[0] == (0.8,)
    assert parse(render(hand, space), space) == hand


def dfs_forward(models: dict[str, torch.nn.Module], path: list[Step], ids: torch.Tensor) -> torch.Tensor:
    """Sakana's data-flow path by hand: layer `step.layer` of model `step.source`, its input × step.scale."""
    first, last = models[path[0].source].model, models[path[-1].source]
    h = first.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rope = first.rotary_emb(h, positions)
    for step in path:
        layer = models[step.source].model.layers[step.layer]
        out = layer(h * step.scale, position_embeddings=rope, position_ids=positions, attention_mask=None)
        h = out[0] if isinstance(out, tuple) else out
    h = last.model.norm(h)
    head = first.embed_tokens.weight if last.config.tie_word_embeddings else last.lm_head.weight
    return h @ head.T


@pytest.mark.parametrize("arch", ["qwen", "llama"])
def test_dfs_scales_reproduce_input_scaling_exactly(arch, request, tmp_path):
    family = request.getfixturevalue(f"{arch}_family")
    space = space_of(family, ancestor=False)
    seed = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)["linear-ties-dfs"]
    path = [
        Step(source="alpha", layer=0, scale=1.0),
        Step(source="beta", layer=1, scale=1.7),
        Step(source="beta", layer=1, scale=0.6),  # a repeated layer
        Step(source="gamma", layer=3, scale=1.25),
        Step(source="alpha", layer=2, scale=0.8),
        Step(source="gamma", layer=5, scale=1.1),
        Step(source="beta", layer=4, scale=0.9),
    ]
    genome = Genome(
        interp=seed.interp, crossover=seed.crossover, structure=StructureGene(method="dfs", path=path)
    )
    merged = AutoModelForCausalLM.from_pretrained(
        merge_recipe(render(genome, space), tmp_path / "dfs", device="cpu")
    )
    assert merged.config.num_hidden_layers == len(path)
    models = {n: AutoModelForCausalLM.from_pretrained(family[n]).eval() for n in NAMES}
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        expected = dfs_forward(models, path, ids)
        got = merged.eval()(ids).logits
        unscaled = dfs_forward(models, [s.model_copy(update={"scale": 1.0}) for s in path], ids)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    assert (unscaled - expected).abs().max() > 100 * (got - expected).abs().max()  # the scales matter


def test_evoforge_merge_command_merges_a_recipe_with_its_header_seed(qwen_family, tmp_path):
    from typer.testing import CliRunner

    from evoforge.cli import app

    space = space_of(qwen_family, ancestor=True)
    genome = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)["slerp-dare-dfs"]
    recipe = tmp_path / "candidate.yaml"
    recipe.write_text(render(genome, space))
    result = CliRunner().invoke(
        app, ["merge", str(recipe), "--out", str(tmp_path / "cli"), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    direct = merge_recipe(
        recipe.read_text(), tmp_path / "direct", device="cpu", random_seed=genome.crossover.seed
    )
    cli, ref = tensors(tmp_path / "cli"), tensors(direct)
    assert all(torch.equal(cli[k], ref[k]) for k in ref)
