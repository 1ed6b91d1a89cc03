"""Tiny random models with a byte-level BPE tokenizer, for tests and benchmarks without the hub.

A family is one random ancestor plus children that each add a small random delta, so the children are
related the way fine-tunes of one pretrained model are (kinship checks pass, TIES/DARE deltas mean something).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

Arch = Literal["qwen2", "llama"]

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "Question: What is 12 + 7?\nAnswer: 19",
    "Bonjour, comment allez-vous ? Hola, ¿cómo estás? Guten Tag!",
    '{"name": "Ada", "age": 36, "city": "London"}',
    "name,age,city\nAda,36,London\n",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def byte_level_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (WordLevel encodes everything to nothing under transformers 5)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None
    )


def tiny_config(arch: Arch, vocab_size: int, num_layers: int = 6, hidden: int = 64):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    return LlamaConfig(**common, tie_word_embeddings=False)


def make_family(
    root: Path,
    arch: Arch = "qwen2",
    children: tuple[str, ...] = ("alpha", "beta", "gamma"),
    delta: float = 0.02,
    num_layers: int = 6,
    hidden: int = 64,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write `ancestor` and one folder per child under root; return name → folder."""
    root = Path(root)
    tokenizer = byte_level_tokenizer()
    config = tiny_config(arch, len(tokenizer), num_layers, hidden)
    torch.manual_seed(seed)
    ancestor = AutoModelForCausalLM.from_config(config, dtype=dtype)
    paths = {"ancestor": root / "ancestor"}
    ancestor.save_pretrained(paths["ancestor"])
    tokenizer.save_pretrained(paths["ancestor"])
    base_state = {k: v.clone() for k, v in ancestor.state_dict().items()}
    for i, name in enumerate(children):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for key, param in ancestor.state_dict().items():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * delta
                param.copy_(
                    base_state[key] + noise.to(param.dtype) * base_state[key].float().std().clamp(min=1e-3)
                )
        paths[name] = root / name
        ancestor.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths
