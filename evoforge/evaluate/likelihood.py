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
continuation and a `multiple_choice` task's gold choice are used as lm-eval builds them. Scoring is lm-eval's
`LM.loglikelihood` (batched, one forward pass per request, no decoding); the gold tokens are counted on the
same boundary it uses (`TemplateLM._encode_pair`: trailing prompt whitespace belongs to the continuation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM, TemplateLM
from lm_eval.api.task import Task
from lm_eval.evaluator_utils import get_sample_size

from evoforge.evaluate.suite import TaskError


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


def item_scores(
    lm: LM, tasks: Mapping[str, Task], limit: int | float | None = None
) -> dict[str, list[float]]:
    """Task name → per-item exp(mean log-prob of the gold tokens), in document order. All tasks' requests
    go to the model in one `loglikelihood` call, so lm-eval batches them together."""
    if not isinstance(lm, TemplateLM):
        raise TypeError(f"likelihood fitness needs a tokenizer-backed lm-eval model, not {type(lm).__name__}")
    requests = {name: gold_requests(task, lm, limit) for name, task in tasks.items()}
    flat = [req for reqs in requests.values() for req in reqs]
    results = iter(lm.loglikelihood(flat))
    out: dict[str, list[float]] = {}
    for name, reqs in requests.items():
        out[name] = []
        for req in reqs:
            logprob, _ = next(results)
            n_tokens = len(lm._encode_pair(*req.args)[1])
            out[name].append(math.exp(logprob / n_tokens))
    return out
