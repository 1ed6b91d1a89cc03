"""Likelihood fitness, per candidate: lm-eval's `_loglikelihood_tokens` vs evoforge's `teacher_forced`, on the
same tokenized gold items, in one process; and what building those items and their padded batches costs
(once per run since they are cached; lm-eval's path built and tokenized the requests per candidate).

    python bench/likelihood_bench.py                                  # demo ancestor, all validation items
    python bench/likelihood_bench.py --limit 10 --device cpu          # CPU: 10 items a task
    python bench/likelihood_bench.py --shrink --device cpu            # 1 layer, hidden 64: all but the model

--shrink keeps the model's vocabulary and tokenizer but makes it one layer of hidden 64 (random weights): what
remains is what does not depend on depth — the output layer over the vocabulary, log-softmax, the
per-request loop — the part the fast path changes. Prints markdown: seconds per pass (median of --reps after
one warm pass) for each path, the ratio, and the largest difference between their per-item log-probabilities.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from lm_eval.models.huggingface import HFLM
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from evoforge.config import load_config
from evoforge.evaluate import TaskSuite
from evoforge.evaluate.likelihood import encode_gold, teacher_forced
from evoforge.models import resolve_device


def timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of `reps` calls after one untimed call, and the last result."""
    result = fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run-file", type=Path, default=Path("recipes/demo.yaml"))
    parser.add_argument("--model", default=None, help="model folder (default: the run file's ancestor)")
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: bfloat16 on CUDA)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--shrink", action="store_true")
    args = parser.parse_args()

    run = load_config(args.run_file)
    source = args.model or str(run.resolve(run.ancestor or run.base_models[0]))
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    if args.shrink:
        config = AutoConfig.from_pretrained(source)
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 1, 64, 128
        config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model = model.to(device).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size)
    tasks = TaskSuite.discover(run.evaluation.tasks_dir).select(run.evaluation.tasks).build("validation")

    def build():  # what the Scorer builds once per split: requests, tokens, padded batches
        gold = encode_gold(lm, tasks, args.limit)
        gold.batches(args.batch_size, lm.max_length)
        return gold

    build_s, gold = timed(build, args.reps)
    items = gold.flat
    print(f"{len(items)} items; lm-eval path ...", file=sys.stderr)
    lm_eval_s, expected = timed(
        lambda: [lp for lp, _ in lm._loglikelihood_tokens(items, disable_tqdm=True)], args.reps
    )
    print("teacher-forced path ...", file=sys.stderr)
    fast_s, got = timed(lambda: teacher_forced(lm, gold), args.reps)
    diff = max(abs(a - b) for a, b in zip(expected, got, strict=True))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"## likelihood fitness: {Path(source).name}{' (shrunk: 1 layer, hidden 64)' if args.shrink else ''}"
    )
    print(
        f"\n{name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}, batch {args.batch_size}, {len(items)} items, median of {args.reps}\n"
    )
    print("| step | s per candidate |\n|---|---|")
    print(f"| build, tokenize and batch the gold requests (once per run now) | {build_s:.3f} |")
    print(f"| lm-eval `_loglikelihood_tokens` | {lm_eval_s:.3f} |")
    print(f"| evoforge `teacher_forced` | {fast_s:.3f} |")
    print(
        f"\nteacher-forced vs lm-eval (with the request building lm-eval's path paid per candidate): "
        f"{lm_eval_s / fast_s:.2f}× ({(lm_eval_s + build_s) / fast_s:.2f}×); largest per-item "
        f"log-probability difference {diff:.2e}"
    )


if __name__ == "__main__":
    main()
