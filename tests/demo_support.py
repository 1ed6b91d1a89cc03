"""Stand-ins for the demo trios' tests: a tiny Qwen2 GGUF with a separate output head (as llama.cpp writes
Qwen2.5's), and LoRA adapters with random weights.

The GGUF has the same layout as the real Qwen2.5-Coder-1.5B GGUF at toy size: 2 blocks, hidden 64, byte-level BPE vocabulary
with the ChatML tokens and chat template, F32 tensors (the dequantization path is the same as for Q4_K).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_tokens() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def write_tiny_qwen2_gguf(path: Path, seed: int = 0) -> Path:
    """Write the tiny GGUF at `path`: token_embd and output are different matrices of the same shape."""
    import gguf

    tokens = [*_byte_tokens(), "Ġt", "he", *SPECIAL]
    vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name("tiny qwen2 stand-in")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - len(SPECIAL)) + [3] * len(SPECIAL))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(vocab - 3)
    writer.add_eos_token_id(vocab - 1)
    writer.add_pad_token_id(vocab - 3)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    kv = HIDDEN // HEADS * KV_HEADS
    writer.add_tensor("token_embd.weight", weight(vocab, HIDDEN))
    writer.add_tensor("output.weight", weight(vocab, HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        blk = f"blk.{i}"
        for name, shape in [
            ("attn_q", (HIDDEN, HIDDEN)),
            ("attn_k", (kv, HIDDEN)),
            ("attn_v", (kv, HIDDEN)),
            ("attn_output", (HIDDEN, HIDDEN)),
            ("ffn_gate", (FFN, HIDDEN)),
            ("ffn_up", (FFN, HIDDEN)),
            ("ffn_down", (HIDDEN, FFN)),
        ]:
            writer.add_tensor(f"{blk}.{name}.weight", weight(*shape))
        for name, size in [("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)]:
            writer.add_tensor(f"{blk}.{name}.bias", weight(size))
        writer.add_tensor(f"{blk}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        writer.add_tensor(f"{blk}.ffn_norm.weight", np.ones(HIDDEN, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_lora_adapter(ancestor: Path, target: Path, r: int, alpha: float, modules: list[str]) -> None:
    """Save a LoRA adapter for the model in `ancestor` with random A and B (peft's default B=0 is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(ancestor, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(target)


def recording_console() -> tuple[Console, io.StringIO]:
    """A console for `prepare` whose output the test reads back."""
    out = io.StringIO()
    return Console(file=out, width=400), out


def mtimes(root: Path) -> dict[str, int]:
    """Modification times of every file under `root`: equal before and after = nothing rewritten."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
