"""Pooled generation gives lm-eval's texts: every task's requests decoded together, each row to its own stop.

The model is a tiny random Qwen2 whose logits a hook steers from each row's own history (its last token and
its length): rows end on a stop string (a newline, or a newline then "#" for the code tasks), on EOS, or at
their budget, at different steps — and only by what the row itself generated, so batching and padding must
not change any text.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_support import REAL_TASKS, needs_real_tasks
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from transformers import AutoModelForCausalLM, AutoTokenizer, StopStringCriteria

from evoforge.evaluate.generation import PooledHFLM
from evoforge.evaluate.scorer import Scorer
from evoforge.evaluate.suite import TaskSuite

pytestmark = needs_real_tasks


@pytest.fixture(scope="module")
def steered(qwen_family: dict[str, Path]) -> tuple[torch.nn.Module, object]:
    tokenizer = AutoTokenizer.from_pretrained(qwen_family["alpha"])
    model = AutoModelForCausalLM.from_pretrained(qwen_family["alpha"]).eval()
    newline, hash_ = tokenizer.convert_tokens_to_ids(["Ċ", "#"])
    eos = tokenizer.eos_token_id

    def steer(module, args, kwargs, output):
        last = kwargs["input_ids"][:, -1]
        mask = kwargs.get("attention_mask")  # absent when a batch needs no padding
        length = kwargs["cache"].get_seq_length() if mask is None else mask.sum(-1)
        clock = last + length  # the row's own length (its tokens so far), whatever the padding
        logits = output.logits[:, -1]
        logits[clock % 53 == 0, newline] += 100.0
        logits[last == newline, hash_] += 100.0
        logits[clock % 97 == 0, eos] += 100.0
        return output

    model.register_forward_hook(steer, with_kwargs=True)
    return model, tokenizer


@pytest.fixture(scope="module")
def requests() -> list[Instance]:
    out = []
    for task in TaskSuite.discover(REAL_TASKS).build("validation").values():
        for doc in list(task.validation_docs())[:8]:
            args = (task.doc_to_text(doc), dict(task.config.generation_kwargs))
            out.append(Instance("generate_until", doc, args, len(out)))
    return out


def generate(cls: type[HFLM], model, tokenizer, requests: list[Instance], batch: int) -> tuple[list, int]:
    """Texts and the number of forward passes (prefill + decoding steps) they took."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        lm = cls(pretrained=model, tokenizer=tokenizer, batch_size=batch, max_gen_toks=64)
        return lm.generate_until(requests, disable_tqdm=True), len(calls)
    finally:
        handle.remove()


@pytest.mark.parametrize("batch", [5, 64])
def test_pooled_texts_equal_lm_evals_and_take_fewer_steps(steered, requests, batch: int) -> None:
    model, tokenizer = steered
    plain, plain_steps = generate(HFLM, model, tokenizer, requests, batch)
    pooled, pooled_steps = generate(PooledHFLM, model, tokenizer, requests, batch)
    assert pooled == plain
    budgets = [r.args[1]["max_gen_toks"] for r in requests]
    lengths = [len(tokenizer(t)["input_ids"]) for t in plain]
    assert sum(n < b for n, b in zip(lengths, budgets)) >= 10, "rows ending on stop strings or EOS"
    assert sum(n == b for n, b in zip(lengths, budgets)) >= 10, "rows ending at their budget"
    assert any("\n" in r.args[1]["until"] and n < b for r, n, b in zip(requests, lengths, budgets))
    if batch == 64:  # 72 rows of 9 tasks in 2 batches vs lm-eval's 9 task groups
        assert pooled_steps < plain_steps / 2


def test_a_stop_the_text_does_not_show_is_regenerated_by_lm_eval(steered, requests, monkeypatch) -> None:
    """If the vectorised stop check fires where the decoded text has no stop string, the row's text comes
    from lm-eval's own path, not from the cut-short row."""
    model, tokenizer = steered
    plain, _ = generate(HFLM, model, tokenizer, requests, 64)
    monkeypatch.setattr(
        StopStringCriteria,
        "__call__",
        lambda self, ids, scores, **kw: torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device),
    )
    pooled, _ = generate(PooledHFLM, model, tokenizer, requests, 64)
    assert pooled == plain


def test_a_batch_that_runs_out_of_memory_is_decoded_in_halves(steered, requests, monkeypatch) -> None:
    """A card too small for `batch_size` rows of long prompts: the call goes on in halves, same texts."""
    model, tokenizer = steered
    plain, _ = generate(PooledHFLM, model, tokenizer, requests, 64)
    sizes, decode = [], PooledHFLM._generate

    def small_card(self, batch, kwargs):
        sizes.append(len(batch))
        if len(batch) > 10:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(self, batch, kwargs)

    monkeypatch.setattr(PooledHFLM, "_generate", small_card)
    pooled, _ = generate(PooledHFLM, model, tokenizer, requests, 64)
    assert pooled == plain
    assert sizes[:4] == [64, 32, 16, 8] and max(sizes[4:]) <= 8
    monkeypatch.setattr(PooledHFLM, "_generate", lambda *_: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(torch.OutOfMemoryError):  # one row that does not fit: a real shortage
        generate(PooledHFLM, model, tokenizer, requests[:1], 64)


def test_scorer_pools_on_cuda_only(steered) -> None:
    """On the CPU decoding is bound by arithmetic, and padding every row to the longest prompt costs more
    than the steps it saves: the Scorer keeps lm-eval's grouping there."""
    model, tokenizer = steered
    assert type(Scorer(model, tokenizer, tasks_dir=REAL_TASKS).lm) is HFLM
