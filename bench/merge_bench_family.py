"""What bench/merge_bench.py merges: the model family (evoforge.tiny's, or random Qwen2-1.5B-shaped bf16 models)
and the recipes its sections run (seed recipes and a deep DARE DFS path). Kept apart from the sections, which
only take the family's folders and the recipes' texts."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from evoforge.config import MergeOperators
from evoforge.genome import Genome, GenomeSpace, Step, StructureGene, seed_genomes
from evoforge.recipe import render
from evoforge.tiny import byte_level_tokenizer, make_family

NAMES = ("alpha", "beta", "gamma")
TINY = {"tiny": (6, 64), "tiny-28": (28, 64), "mid-8": (8, 256)}
"""evoforge.tiny families, (layers, hidden): at hidden 64 merge cost is mergekit's per-tensor Python work, not
arithmetic; mid-8's tensors (32-131 K elements, 10 MB a model in float32) reach torch's 32 K-element grain,
above which a multi-threaded whole-tensor reduction is split over threads."""
SEED_ORDER = (0, 7, 5, 2, 1, 6, 3, 4)
"""The 8 seeds in an order whose first few cover interp, crossover and structure methods."""
QWEN2_1_5B = dict(
    hidden_size=1536,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    eos_token_id=0,
    pad_token_id=0,
    bos_token_id=0,
)


def build_family(
    root: Path, scale: str, device: torch.device, tokenizer_dir: Path | None = None
) -> dict[str, Path]:
    """Ancestor + three related children: evoforge.tiny's family, or Qwen2-1.5B-shaped random bf16 models
    built on `device` (the GPU: seconds instead of minutes) with the byte-level tokenizer or `tokenizer_dir`'s."""
    if scale in TINY:
        layers, hidden = TINY[scale]
        return make_family(root, arch="qwen2", num_layers=layers, hidden=hidden)
    paths = {name: root / name for name in ("ancestor", *NAMES)}
    if all((p / "config.json").exists() for p in paths.values()):
        return paths
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else byte_level_tokenizer()
    special = {
        key: getattr(tokenizer, key) if getattr(tokenizer, key) is not None else tokenizer.eos_token_id
        for key in ("eos_token_id", "pad_token_id", "bos_token_id")
    }
    torch.manual_seed(0)
    with torch.device(device):
        config = Qwen2Config(**{**QWEN2_1_5B, **special})
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    for i, name in enumerate(("ancestor", *NAMES)):
        if i:
            gen = torch.Generator(device).manual_seed(i)
            with torch.no_grad():
                for key, param in model.state_dict().items():
                    noise = torch.randn(param.shape, generator=gen, device=device) * 0.02
                    std = base[key].float().std().clamp(min=1e-3)
                    param.copy_(base[key] + (noise * std).to(param.dtype))
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    del model, base
    return paths


def bench_recipes(space: GenomeSpace, count: int) -> dict[str, str]:
    """`count` of the 8 seeds (spread over the method triples) and a deep DARE DFS path: 1.5× the depth,
    repeated layers, every source, scaled steps."""
    seeds = seed_genomes(space, MergeOperators(), [1.0] * len(NAMES), run_seed=7)
    labels = [list(seeds)[i] for i in SEED_ORDER[:count]]
    out = {label: render(seeds[label], space) for label in labels}
    rng = random.Random(0)
    sources = ("crossover", "crossover", "interp", *NAMES)
    path = tuple(
        Step(source=rng.choice(sources), layer=i % space.num_layers, scale=round(rng.uniform(0.7, 1.3), 3))
        for i in range(space.max_depth)
    )
    seed = seeds["slerp-dare-dfs"]
    deep = Genome(
        interp=seed.interp, crossover=seed.crossover, structure=StructureGene(method="dfs", path=path)
    )
    out["deep-dfs (dare)"] = render(deep, space)
    return out
