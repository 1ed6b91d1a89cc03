"""Train one LoRA specialist of a demo trio's ancestor and save the adapter (a few MB) for `evoforge demo
prepare`. scripts/build_adapters.sh runs it with each trio's settings.

Runs unchanged on any CUDA machine with evoforge's dependencies (on CPU too, slowly: a smoke test).

    python scripts/train_adapters.py ~/.cache/evoforge/smollm2-135m-instruct math \\
        --task <task> [--task <task> ...] [--jsonl items.jsonl] --steps 300 --replay-weight 0.5

Items come from `scripts/build_tasks.py`'s `training_items(task, n, seed)` (disjoint from the tasks'
validation and test splits) and/or JSONL files: each item is the text "Question: ...\\nAnswer: <answer>"
(a string, or in JSONL `{"text": ...}`), or a mapping with `prompt` and `answer`. The loss is on the answer
only (plus EOS), with the question as context, as the tasks' evaluation sees it.

Replay (`--replay-weight` > 0): KL divergence to the ancestor — the same model with the adapter switched
off — on general text in the chat format (the Python documentation that ships with CPython, or
`--replay-jsonl`). It keeps the delta small outside the task, so specialists interfere less when merged.

The adapter goes to `recipes/demo/adapters/<name>/` (or `--out`) with `training.json` (options, losses, time).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import typer

ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "adapters"
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ANSWER_MARK = "\nAnswer:"

cli = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def split_item(item: str | Mapping[str, Any], where: str) -> tuple[str, str]:
    """(context, completion): "Question: ...\\nAnswer:" and " <answer>"."""
    if isinstance(item, Mapping) and "prompt" in item and "answer" in item:
        prompt, answer = str(item["prompt"]), str(item["answer"]).strip()
        return prompt, answer if prompt.endswith((" ", "\n")) else f" {answer}"
    text = item.get("text") if isinstance(item, Mapping) else item
    if not isinstance(text, str) or ANSWER_MARK not in text:
        raise ValueError(
            f"{where}: an item must be 'Question: ...\\nAnswer: <answer>' text, got {item!r:.80}"
        )
    cut = text.rindex(ANSWER_MARK) + len(ANSWER_MARK)
    return text[:cut], text[cut:]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """One JSON object per non-empty line."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task_items(tasks: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """`n` training items per task from scripts/build_tasks.py (imported only when a task is asked for)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from build_tasks import training_items

    return [
        split_item(it, f"build_tasks.training_items({t!r})")
        for t in tasks
        for it in training_items(t, n, seed)
    ]


def python_docs() -> list[tuple[str, str]]:
    """General English text present wherever Python is: CPython's bundled documentation topics, as (topic, passage)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data from their Python
        raise typer.BadParameter(
            "this Python lacks CPython's pydoc_data (the default replay text): pass --replay-jsonl FILE "
            '(lines of {"text": ...}) or --replay-weight 0'
        ) from None

    passages = []
    for name, text in sorted(topics.items()):
        chunk = ""
        for paragraph in text.split("\n\n"):
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
            if len(chunk) > 600:
                passages.append((name, chunk))
                chunk = ""
        if chunk:
            passages.append((name, chunk))
    return passages


def replay_texts(tokenizer: Any, jsonl: list[Path]) -> list[str]:
    """Chat-formatted general text: JSONL `{"text": ...}` lines as they are, else the Python docs as Q&A turns."""
    if jsonl:
        return [row["text"] for path in jsonl for row in read_jsonl(path)]
    texts = []
    for topic, passage in python_docs():
        turns = [
            {"role": "user", "content": f"Explain the Python topic '{topic}'."},
            {"role": "assistant", "content": passage},
        ]
        texts.append(
            tokenizer.apply_chat_template(turns, tokenize=False) if tokenizer.chat_template else passage
        )
    return texts


def answer_batch(tokenizer: Any, items: Iterable[tuple[str, str]], max_length: int, device: str) -> dict:
    """Right-padded ids with labels on the completion and EOS only (context and padding are -100)."""
    rows = []
    for context, completion in items:
        ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
        ans = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (ctx + ans)[-max_length:]
        rows.append((ids, ([-100] * len(ctx) + ans)[-max_length:]))
    return _pad(rows, tokenizer.pad_token_id, device)


def text_batch(tokenizer: Any, texts: Iterable[str], max_length: int, device: str) -> dict:
    """Right-padded ids of whole texts (labels unused: the replay loss reads the attention mask)."""
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_length]
        rows.append((ids, ids))
    return _pad(rows, tokenizer.pad_token_id, device)


def _pad(rows: list[tuple[list[int], list[int]]], pad_id: int, device: str) -> dict:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> float | None:
    """One optimizer step on gradients clipped to `max_norm`; None, and no step, where they are not finite.

    A NaN or inf anywhere would otherwise enter AdamW's moments and make every later step NaN: the
    Qwen2.5-Coder-1.5B structured adapter went so at step 10 (H100, 2026-12-06). A finite gradient, however
    large, cannot do that (AdamW's step is bounded by a few times the learning rate), so clipping is optional.
    """
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    finite = bool(torch.isfinite(norm))
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm) if finite else None


def kl_to_ancestor(model: Any, batch: dict) -> torch.Tensor:
    """Mean per-token KL(ancestor ‖ model) over the batch's real tokens; the ancestor is the adapter switched off."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), model.disable_adapter():
        reference = F.log_softmax(model(**inputs).logits.float(), dim=-1)
    current = F.log_softmax(model(**inputs).logits.float(), dim=-1)
    per_token = (reference.exp() * (reference - current)).sum(-1)
    mask = batch["attention_mask"].float()
    return (per_token * mask).sum() / mask.sum()


@cli.command()
def main(
    ancestor: Path = typer.Argument(..., help="The ancestor's HF folder (from `evoforge demo prepare`)."),
    name: str = typer.Argument(..., help="Specialist name: the adapter's folder name."),
    task: list[str] = typer.Option([], "--task", help="build_tasks.py task to draw training items from."),
    jsonl: list[Path] = typer.Option([], "--jsonl", help="JSONL file of training items."),
    n: int = typer.Option(10_000, help="Training items per task."),
    out: Path | None = typer.Option(None, help="Adapter folder (default recipes/demo/adapters/NAME)."),
    steps: int = typer.Option(300),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(5e-4),
    r: int = typer.Option(16, help="LoRA rank."),
    alpha: float = typer.Option(32.0, help="LoRA alpha (scale = alpha / r)."),
    dropout: float = typer.Option(0.0),
    target_modules: str = typer.Option(ALL_LINEAR, help="Comma-separated module names to adapt."),
    replay_weight: float = typer.Option(0.0, help="Weight of the KL-to-ancestor replay loss (0: off)."),
    replay_batch_size: int = typer.Option(8),
    replay_jsonl: list[Path] = typer.Option(
        [], "--replay-jsonl", help='JSONL of {"text": ...} replay texts.'
    ),
    max_length: int = typer.Option(256, help="Tokens per sequence at most."),
    max_grad_norm: float = typer.Option(
        0.0, help="Clip the gradient's norm to this (0: no clipping, as the committed adapters were trained)."
    ),
    max_skipped: float = typer.Option(
        0.1, help="Stop, saving nothing, when more than this share of steps had a non-finite gradient."
    ),
    seed: int = typer.Option(0),
    log_every: int = typer.Option(25),
    device: str = typer.Option("cuda" if torch.cuda.is_available() else "cpu"),
    dtype: str = typer.Option("bfloat16", help="Base weights' dtype (float32 is much faster on CPU)."),
    attention: str = typer.Option(
        "sdpa",
        help="transformers' attn_implementation: sdpa, or eager, which avoids SDPA's CUDA kernels (suspected "
        "of the Qwen2-1.5B structured adapter's NaN gradients on an H100; cf. pytorch/pytorch#178251).",
    ),
    checkpointing: bool = typer.Option(
        True,
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute each block's activations in the backward pass: ~1/3 more compute, a fraction of "
        "the memory (a 1.5 B model's 32 x 256-token batch needs ~50 GB without it).",
    ),
) -> None:
    """Train the LoRA adapter NAME on top of ANCESTOR (bf16 base, fp32 adapter, AdamW, constant LR);
    a step whose loss or gradient is not finite is skipped, and too many such steps stop the run."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    items = task_items(task, n, seed) if task else []
    items += [split_item(row, str(path)) for path in jsonl for row in read_jsonl(path)]
    if not items:
        raise typer.BadParameter("no training items: give --task and/or --jsonl")
    set_seed(seed)
    rng = random.Random(seed)
    started = time.time()
    tokenizer = AutoTokenizer.from_pretrained(ancestor)
    base = AutoModelForCausalLM.from_pretrained(
        ancestor, dtype=getattr(torch, dtype), attn_implementation=attention
    ).to(device)
    if checkpointing:  # non-reentrant: the frozen embeddings' outputs need no grad for the LoRA grads to flow
        # transformers >= 5.25 renamed it (the old name warns); the GPU image's is older
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=[m.strip() for m in target_modules.split(",") if m.strip()],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    model.train()
    trained = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    print(
        f"{name}: base {dtype} on {device}, adapter {', '.join(sorted(trained))}, batch {batch_size}",
        flush=True,
    )
    replay = replay_texts(tokenizer, replay_jsonl) if replay_weight > 0 else []
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    log: list[dict[str, float | None]] = []
    skipped: list[int] = []
    for step in range(1, steps + 1):
        batch = answer_batch(tokenizer, rng.choices(items, k=batch_size), max_length, device)
        task_loss = model(**batch).loss
        loss = task_loss
        kl = torch.zeros(())
        if replay:
            kl = kl_to_ancestor(
                model, text_batch(tokenizer, rng.choices(replay, k=replay_batch_size), max_length, device)
            )
            loss = task_loss + replay_weight * kl
        loss.backward()
        grad_norm = update(optimizer, params, max_grad_norm)
        if grad_norm is None:
            skipped.append(step)
            print(f"step {step}: non-finite loss or gradient, update skipped", flush=True)
            if len(skipped) > max_skipped * steps:
                print(
                    f"error: {name}: {len(skipped)} of {steps} steps had a non-finite loss or gradient (steps "
                    f"{', '.join(map(str, skipped[:5]))}...): nothing saved; try --dtype float32, "
                    "--attention eager or a lower --lr",
                    file=sys.stderr,
                )
                raise typer.Exit(1)
        if step % log_every == 0 or step in (1, steps):
            entry = {"step": step, "task_loss": round(task_loss.item(), 4), "replay_kl": round(kl.item(), 4)}
            norm = None if grad_norm is None else round(grad_norm, 4)
            log.append(entry | {"grad_norm": norm, "seconds": round(time.time() - started, 1)})
            print(json.dumps(log[-1]), flush=True)
    target = out or ADAPTERS_DIR / name
    # the ancestor's cache folder name (e.g. qwen2.5-coder-1.5b-instruct), not this machine's path
    model.peft_config["default"].base_model_name_or_path = ancestor.resolve().name
    # bf16 halves the committed size; `prepare` merges in fp32 and saves bf16 anyway. No embedding check:
    # it would look the ancestor up on the hub.
    model.to(torch.bfloat16).save_pretrained(target, save_embedding_layers=False)
    (target / "README.md").unlink(missing_ok=True)  # peft's blank model card; training.json says what this is
    on_cuda = device.startswith("cuda")
    peak_gib = round(torch.cuda.max_memory_allocated() / 2**30, 1) if on_cuda else None
    info = {
        "name": name,
        "tasks": task,
        "jsonl": [str(p) for p in jsonl],
        "items": len(items),
        "replay_texts": len(replay),
        "options": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "target_modules": sorted(lora.target_modules),
            "replay_weight": replay_weight,
            "replay_batch_size": replay_batch_size,
            "max_length": max_length,
            "max_grad_norm": max_grad_norm,
            "seed": seed,
            "n": n,
            "dtype": dtype,
            "attention": attention,
            "gradient_checkpointing": checkpointing,
        },
        "device": torch.cuda.get_device_name() if on_cuda else device,
        "seconds": round(time.time() - started, 1),
        "peak_gpu_gib": peak_gib,
        "skipped_steps": skipped,
        "log": log,
    }
    (target / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"saved {target}", flush=True)


if __name__ == "__main__":
    cli()
