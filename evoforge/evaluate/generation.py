"""Pooled generation: every task's `generate_until` requests decoded together, each row to its own budget.

lm-eval's HFLM groups generation requests by their generation kwargs, so each task with its own stop
sequences or `max_gen_toks` is decoded in its own batches, one after another: scoring nine tasks costs the
sum of their budgets in decoding steps (416 for evoforge's tasks/), and a model that never stops (a random
or a broken candidate) spends all of them. A decoding step of a 1.5 B model costs about the same for 40 rows
as for 360 (it is bound by weight reads and kernel launches), so `PooledHFLM` decodes all greedy requests of
a call together: rows sorted by budget then length, batches of `batch_size` rows (halved for the rest of
the call while one runs out of device memory: the KV cache of long prompts), each row stopped by its
own budget and its own stop strings (transformers' vectorised `StopStringCriteria`, one per distinct stop
list), and the batch ends when every row has. Nine tasks then cost the largest budget in steps (128).

Each row's text is what lm-eval's own path gives: the same prompt tokens (left-padded), greedy decoding,
exactly `max_gen_toks` tokens unless a stop string or EOS comes first, the same decoding and the same cut at
the first stop string. A row that stopped on a stop string its text does not contain (a tokenizer whose
pieces do not decode to what the vocabulary says) is regenerated through lm-eval's path. Sampling,
seq2seq models, thinking-token models and `batch_size="auto"` go through lm-eval's path unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria


@dataclass
class _Row:
    index: int
    context: str
    gen_kwargs: dict
    until: list[str]
    budget: int
    tokens: list[int]


class _RowStops(StoppingCriteria):
    """Per-row stopping: a row is done once it has generated its budget or one of its own stop strings,
    looked for in its generated tokens only (as lm-eval does: a stop string may not begin in the prompt).
    Keeps how many tokens each row had when it ended, and which rows a stop string ended early."""

    def __init__(
        self,
        prompt_len: int,
        budgets: torch.Tensor,
        stops: Sequence[tuple[StopStringCriteria, torch.Tensor]],
    ) -> None:
        self.prompt_len, self.budgets, self.stops = prompt_len, budgets, stops
        self.ended_at = torch.full_like(budgets, -1)
        self.by_string = torch.zeros_like(budgets, dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        generated = input_ids[:, self.prompt_len :]
        spent = self.budgets <= generated.shape[1]
        hit = torch.zeros_like(spent)
        for criterion, rows in self.stops:
            hit |= criterion(generated, scores) & rows
        open_rows = self.ended_at < 0
        self.by_string |= hit & ~spent & open_rows
        self.ended_at = torch.where(open_rows & (hit | spent), generated.shape[1], self.ended_at)
        return self.ended_at >= 0


class PooledHFLM(HFLM):
    """lm-eval's HF model wrapper; `generate_until` decodes all greedy requests of a call together.

    `static_cache`: decode with transformers' static KV cache, which transformers compiles (CUDA graphs) on
    a GPU: each new batch shape or model depth compiles again, so it pays only over many candidates."""

    def __init__(self, *args, static_cache: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_cache = static_cache
        self._stop_criteria: dict[tuple[str, ...], StopStringCriteria] = {}

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if self.backend != "causal" or self.batch_size == "auto" or self.think_end_token is not None:
            return super().generate_until(requests, disable_tqdm)
        results: list[str | None] = [None] * len(requests)
        pools: dict[tuple, tuple[dict, list[_Row]]] = {}  # decoding settings → (those settings, rows)
        plain: list[int] = []  # sampled requests: lm-eval's own path
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            budget = kwargs.pop("max_gen_toks")
            if kwargs.get("do_sample") or "max_length" in kwargs:
                plain.append(index)
                continue
            row = _Row(index, context, gen_kwargs, until, budget, self._tokens(context, budget))
            pools.setdefault(tuple(sorted((k, repr(v)) for k, v in kwargs.items())), (kwargs, []))[1].append(
                row
            )
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Pooled generation")
        for kwargs, rows in pools.values():
            rows.sort(key=lambda r: (-r.budget, -len(r.tokens), r.index))
            start, size = 0, self.batch_size
            while start < len(rows):
                batch = rows[start : start + size]
                try:
                    texts = self._generate(batch, kwargs)
                except torch.OutOfMemoryError:
                    if len(batch) == 1:
                        raise
                    texts = None  # freed once the handler has let go of the failed frames
                if texts is None:  # a small card: the rest of this call in halves
                    size = (len(batch) + 1) // 2
                    torch.cuda.empty_cache()
                    continue
                for row, text in zip(batch, texts, strict=True):
                    results[row.index] = text
                    if text is not None:
                        self.cache_hook.add_partial("generate_until", (row.context, row.gen_kwargs), text)
                pbar.update(len(batch))
                start += len(batch)
        retry = [i for i, text in enumerate(results) if text is None]  # sampled, or an unconfirmed stop
        if retry:
            for index, text in zip(
                retry, super().generate_until([requests[i] for i in retry], disable_tqdm=True), strict=True
            ):
                results[index] = text
            pbar.update(len(plain))
        pbar.close()
        return results

    def _tokens(self, context: str, budget: int) -> list[int]:
        """Prompt tokens as `tok_batch_encode` makes them, left-truncated to leave room for the budget."""
        special = {}
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        room = self.max_length - budget
        if room <= 0:
            raise ValueError(
                f"requested max tokens to generate ({budget}) must be less than the model's "
                f"maximum sequence length ({self.max_length})"
            )
        return self.tokenizer(context, **special)["input_ids"][-room:]

    def _stops(self, until: list[str]) -> StopStringCriteria:
        key = tuple(until)
        if key not in self._stop_criteria:
            self._stop_criteria[key] = StopStringCriteria(self.tokenizer, list(key))
        return self._stop_criteria[key]

    def _generate(self, batch: list[_Row], kwargs: dict) -> list[str | None]:
        """One left-padded batch; None for a row whose stop cannot be confirmed in its text."""
        width = max(len(r.tokens) for r in batch)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, row in enumerate(batch):
            ids[i, width - len(row.tokens) :] = torch.tensor(row.tokens)
            mask[i, width - len(row.tokens) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        budgets = torch.tensor([r.budget for r in batch], device=self.device)
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, row in enumerate(batch):
            groups[tuple(row.until)].append(i)
        stops = []
        for until, members in groups.items():
            rows = torch.zeros(len(batch), dtype=torch.bool, device=self.device)
            rows[members] = True
            stops.append((self._stops(list(until)), rows))
        kwargs = dict(kwargs, **({"cache_implementation": "static"} if self.static_cache else {}))
        if kwargs.get("temperature", 0.0) == 0.0:
            kwargs.pop("temperature", None)
            kwargs["do_sample"] = False
        stopping = _RowStops(width, budgets, stops)
        with torch.autocast(
            device_type=self.device.type,
            dtype=self.mixed_precision_dtype,
            enabled=self.mixed_precision_dtype is not None,
        ):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_length=width + max(r.budget for r in batch),
                stopping_criteria=StoppingCriteriaList([stopping]),
                pad_token_id=pad,
                use_cache=True,
                **kwargs,
            )
        eos = self.model.generation_config.eos_token_id
        eos = {self.eot_token_id, *([] if eos is None else [eos] if isinstance(eos, int) else eos)}
        texts: list[str | None] = []
        for row, generated, ended_at, by_string in zip(
            batch,
            out[:, width:].tolist(),
            stopping.ended_at.tolist(),
            stopping.by_string.tolist(),
            strict=True,
        ):
            tokens = generated[: ended_at if ended_at >= 0 else row.budget]  # what follows is padding
            text = self.tok_decode(tokens)
            ended_on_eos = bool(tokens) and tokens[-1] in eos
            confirmed = ended_on_eos or any(stop and stop in text for stop in row.until)
            if by_string and not confirmed:
                texts.append(None)
                continue
            texts.append(postprocess_generated_text(text, row.until, None))
        return texts
