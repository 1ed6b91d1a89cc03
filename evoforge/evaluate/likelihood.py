"""Likelihood fitness: each item scored by how probable the model finds its gold answer, teacher-forced.

Exact-match accuracy over a few dozen items a task moves in steps of 1/n, and its noise is larger than the
differences selection acts on. The probability of the gold answer moves with every change of the weights
and costs one forward pass per item instead of up to `max_gen_toks` decoding steps. An item scores
exp(mean log-probability per gold token), in (0, 1]: the geometric mean of the gold tokens' probabilities,
length-normalised and bounded like accuracy, so the domain weights aggregate it the same way.

The prompt is exactly what the generation path sends: lm-eval's own `Task.build_all_requests`, called as
`lm_eval.evaluator.evaluate` calls it for `Scorer.score` (same documents, few-shot context, no chat
template). The gold answer is task data, joined to the prompt the way lm-eval joins a few-shot example:
`target_delimiter + doc_to_target(doc)` (" 42" after "Answer:"; a code task sets `target_delimiter: ""`
because its prompt ends inside the function and its target is the body). A `loglikelihood` task's own
continuation and a `multiple_choice` task's gold choice are used as lm-eval builds them. A score is what
lm-eval's `LM.loglikelihood` returns (one forward pass per request, no decoding); the gold tokens are counted
on the same boundary it uses (`TemplateLM._encode_pair`: trailing prompt whitespace belongs to the
continuation).

The requests and their tokens depend on the tasks and the tokenizer, not on the weights: `encode_gold` builds
them once, and every candidate only runs the forward passes. On an HF causal model the passes are
`teacher_forced`: lm-eval's `_loglikelihood_tokens` takes log-softmax over the whole vocabulary at every
position of every row (the prompts are long, the answers short): with the demo's 49 K vocabulary, 46 % of a
1-layer model's time (bench/RESULTS.md); here rows are left-padded so their answers end together, the model
computes logits only for the last positions (`logits_to_keep`), in float32. lm-eval's values (tested).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.task import Task
from lm_eval.evaluator_utils import get_sample_size
from lm_eval.models.huggingface import HFLM

from evoforge.evaluate.suite import TaskError

Gold = tuple[tuple[str, str], list[int], list[int]]
"""One item as lm-eval's `_loglikelihood_tokens` takes it: (prompt, gold answer), their tokens."""


def _where(task: Task) -> str:
    """The task's YAML (lm-eval keeps it as `metadata.config_source`), else its name."""
    metadata = task.config.metadata or {}
    return str(metadata.get("config_source") or task.config.task)


def gold_target(task: Task, doc: dict) -> str:
    """The task's gold answer for `doc`: its `doc_to_target`, the first one where it lists several, the
    gold choice's text where it is an index into `doc_to_choice`."""
    target = task.doc_to_target(doc)
    if isinstance(target, list):
        target = target[0]
    if isinstance(target, int) and task.config.doc_to_choice is not None:
        target = task.doc_to_choice(doc)[target]
    return str(target)


def gold_requests(task: Task, lm: LM, limit: int | float | None = None) -> list[Instance]:
    """One `loglikelihood` request (prompt, gold continuation) per document lm-eval would evaluate."""
    if task.OUTPUT_TYPE == "loglikelihood_rolling":
        raise TaskError(f"{_where(task)}: output_type: loglikelihood_rolling has no gold answer to score")
    task.build_all_requests(limit=get_sample_size(task, limit), rank=lm.rank, world_size=lm.world_size)
    requests = []
    for inst in task.instances:
        if inst.idx != 0:  # a multiple-choice document has one request per choice, all with its prompt
            continue
        context = inst.args[0]
        if task.OUTPUT_TYPE == "loglikelihood":
            continuation = inst.args[1]
        else:
            continuation = task.config.target_delimiter + gold_target(task, inst.doc)
        if not context or not continuation:
            empty = "prompt" if not context else "gold answer"
            raise TaskError(f"{_where(task)}: document {inst.doc_id} has an empty {empty}")
        requests.append(
            Instance(
                request_type="loglikelihood",
                doc=inst.doc,
                arguments=(context, continuation),
                idx=0,
                metadata=(inst.task_name, inst.doc_id, 1),
            )
        )
    return requests


@dataclass(frozen=True)
class ForcedBatch:
    """The rows of one forward pass, left-padded so that their answers end together (no weights in it)."""

    items: list[int]  # the items' places in the item list, in row order
    ids: torch.Tensor  # [rows, length] prompt + answer without its last token
    mask: torch.Tensor  # [rows, length] 1 on tokens, 0 on padding
    positions: torch.Tensor  # [rows, length] each token's place in its own row
    keep: int  # the batch's longest answer: logits are computed at the last `keep` positions
    wanted: torch.Tensor  # [rows, keep] True where a row's answer is
    targets: torch.Tensor  # [answer tokens] the gold tokens at `wanted`, row by row
    rows_of: torch.Tensor  # [answer tokens] the row of each


def forced_batches(items: Sequence[Gold], batch_size: int, max_length: int) -> list[ForcedBatch]:
    """`items` in batches of `batch_size`, longest rows first as lm-eval orders them (little padding in the
    transformer), each row the last `max_length + 1` tokens of prompt + answer as lm-eval truncates them."""
    order = sorted(range(len(items)), key=lambda i: (-len(items[i][1]) - len(items[i][2]), -len(items[i][2])))
    batches = []
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        rows = [(items[i][1] + items[i][2])[-(max_length + 1) :][:-1] for i in batch]
        answers = [items[i][2] for i in batch]
        length, keep = max(map(len, rows)), max(map(len, answers))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        targets = torch.zeros(len(rows), keep, dtype=torch.long)
        wanted = torch.zeros(len(rows), keep, dtype=torch.bool)
        for j, (row, answer) in enumerate(zip(rows, answers, strict=True)):
            ids[j, length - len(row) :] = torch.tensor(row)
            mask[j, length - len(row) :] = 1
            targets[j, keep - len(answer) :] = torch.tensor(answer)
            wanted[j, keep - len(answer) :] = True
        rows_of = torch.arange(len(rows))[:, None].expand_as(wanted)[wanted]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        batches.append(ForcedBatch(batch, ids, mask, positions, keep, wanted, targets[wanted], rows_of))
    return batches


class GoldItems:
    """A split's gold items, tokenized, and their forward-pass batches per batch size and context length:
    none of it depends on the weights, so a run builds it once and every candidate only runs the passes."""

    def __init__(self, by_task: dict[str, list[Gold]]) -> None:
        self.by_task = by_task
        self.flat = [item for items in by_task.values() for item in items]
        self._batches: dict[tuple[int, int], list[ForcedBatch]] = {}

    def batches(self, batch_size: int, max_length: int) -> list[ForcedBatch]:
        if (batch_size, max_length) not in self._batches:
            self._batches[(batch_size, max_length)] = forced_batches(self.flat, batch_size, max_length)
        return self._batches[(batch_size, max_length)]


def encode_gold(lm: LM, tasks: Mapping[str, Task], limit: int | float | None = None) -> GoldItems:
    """The tasks' gold requests, tokenized, in document order."""
    if not isinstance(lm, TemplateLM):
        raise TypeError(f"likelihood fitness needs a tokenizer-backed lm-eval model, not {type(lm).__name__}")
    by_task = {}
    for name, task in tasks.items():
        by_task[name] = [(req.args, *lm._encode_pair(*req.args)) for req in gold_requests(task, lm, limit)]
    return GoldItems(by_task)


def item_scores(lm: TemplateLM, gold: GoldItems) -> dict[str, list[float]]:
    """Task name → per-item exp(mean log-prob of the gold tokens). All tasks' items are scored together."""
    if isinstance(lm, HFLM) and lm.backend == "causal" and isinstance(lm.batch_size, int):
        sums = iter(teacher_forced(lm, gold))
    else:
        sums = iter(logprob for logprob, _ in lm._loglikelihood_tokens(gold.flat))
    return {
        name: [math.exp(next(sums) / len(cont)) for _, _, cont in items]
        for name, items in gold.by_task.items()
    }


@torch.no_grad()
def teacher_forced(lm: HFLM, gold: GoldItems) -> list[float]:
    """The summed gold-token log-probability of each item of `gold.flat`, as lm-eval's `_loglikelihood_tokens`
    defines it (the answer's tokens predicted from all before them), over `gold`'s batches for `lm`'s batch
    size and context; logits only at the answers' positions, log-softmax in float32."""
    model, device = lm.model, lm.device
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = [0.0] * len(gold.flat)
    for batch in gold.batches(lm.batch_size, lm.max_length):
        kwargs = {"logits_to_keep": batch.keep} if keeps_logits else {}
        logits = model(
            input_ids=batch.ids.to(device),
            attention_mask=batch.mask.to(device),
            position_ids=batch.positions.to(device),
            **kwargs,
        ).logits[:, -batch.keep :]
        picked = torch.log_softmax(logits[batch.wanted.to(device)].float(), dim=-1)  # [answer tokens, vocab]
        picked = picked.gather(-1, batch.targets.to(device)[:, None])[:, 0].cpu()
        # summed on the host, in token order: CUDA's index_add_ adds with atomics in no fixed order (torch's
        # reproducibility notes), the likely cause of fitness differing in the last bits between two processes
        # on an H100 (1.7e-9: bench/RESULTS.md "GPU Q")
        sums = torch.zeros(len(batch.items)).index_add_(0, batch.rows_of, picked)
        for i, total in zip(batch.items, sums.tolist(), strict=True):
            out[i] = total
    return out
