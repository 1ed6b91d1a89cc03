"""The chunked generalized task arithmetic equals mergekit's method on the same inputs (CPU, small chunks)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from evolution_support import space_of
from mergekit.merge_methods.api import merge_tensors
from torch.profiler import ProfilerActivity, profile

from evoforge.config import MergeOperators
from evoforge.genome import seed_genomes
from evoforge.merge.memory import chunked
from evoforge.merge.memory import run as run_module
from evoforge.recipe import random_seed, render


def _inputs(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, ties: bool = False
) -> list[torch.Tensor]:
    """A base and three fine-tunes; with `ties`, integer task vectors: many equal magnitudes everywhere,
    the k-th largest included."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator).to(dtype)
    if ties:
        return [base] + [base + torch.randint(-3, 4, shape, generator=generator).to(dtype) for _ in range(3)]
    return [base] + [(base + 0.1 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(3)]


def _merge(method_name: str, tensors: list[torch.Tensor], chunk: int | None, **parameters) -> torch.Tensor:
    """mergekit's public entry point (`merge_tensors`), stock or in chunks of `chunk` elements."""
    params = {"weight": [0.5, 0.3, 0.9], **parameters}
    if chunk is None:
        return merge_tensors(tensors, method_name, parameters=params, base_index=0)
    with chunked.in_chunks(method_name, chunk=chunk):
        return merge_tensors(tensors, method_name, parameters=params, base_index=0)


@pytest.fixture
def stable_sort(monkeypatch):
    """mergekit's TIES with the tie order of CUDA's sort of a large tensor (a stable radix sort: equal
    magnitudes in flat order), where the chunked path runs; the CPU's `argsort` orders equal values its own
    way."""
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *args, **kwargs: argsort(*args, **kwargs, stable=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    ("method_name", "parameters"),
    [
        ("ties", {"density": [0.3, 0.5, 0.7]}),
        ("ties", {"density": [0.3, 1.0, 0.0], "int8_mask": True, "lambda": 1.5}),
        ("task_arithmetic", {}),
        ("ties", {"density": 0.4, "rescale": True}),  # l1 rescaling: within dtype rounding
    ],
)
def test_ties_in_chunks_equals_mergekit(method_name, parameters, dtype, ties, stable_sort):
    """Bit for bit without rescaling, with many equal magnitudes at the k-th value (the first in flat order
    are kept); several chunks, the last a partial one."""
    tensors = _inputs((37, 29), dtype, ties=ties)
    want = _merge(method_name, tensors, None, **parameters)
    got = _merge(method_name, tensors, 100, **parameters)
    assert got.dtype == want.dtype and got.shape == want.shape
    if parameters.get("rescale"):
        torch.testing.assert_close(got, want)
    else:
        assert torch.equal(got, want)


def test_ties_in_chunks_equals_stock_mergekit_without_equal_magnitudes():
    """Distinct magnitudes: the sort order does not matter, stock mergekit's bits."""
    tensors = _inputs((61, 53), torch.float32, seed=4)
    assert torch.equal(_merge("ties", tensors, 256, density=0.3), _merge("ties", tensors, None, density=0.3))


def test_kth_largest_is_exact_across_chunks():
    """The radix select's threshold is the k-th largest magnitude and `greater` counts those above it."""
    values = torch.randn(10_000, generator=torch.Generator().manual_seed(3)).to(torch.float32)
    values[::7] = 0.5  # a run of equal magnitudes
    for k in (1, 17, 1429, 5000, 10_000):
        bits, greater = chunked._kth_largest(
            lambda: ((s, values[s : s + 333]) for s in range(0, 10_000, 333)), k
        )
        kth = torch.sort(values.abs(), descending=True).values[k - 1]
        assert bits == int(kth.view(torch.int32)) and greater == int((values.abs() > kth).sum())


@pytest.mark.parametrize("method_name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dare_in_chunks_draws_mergekits_mask(method_name, dtype):
    """Same seed, same mask (on the CPU drawn chunk by chunk: its generator draws in flat order); rescaled:
    within dtype rounding.
    Without rescaling the outputs are equal bit for bit, so the masks are."""
    tensors = _inputs((41, 23), dtype, seed=1)
    for rescale in (True, False):
        params = {"density": [0.3, 0.6, 0.9], "rescale": rescale}
        torch.manual_seed(11)
        want = _merge(method_name, tensors, None, **params)
        torch.manual_seed(11)
        got = _merge(method_name, tensors, 64, **params)
        assert torch.equal(got, want) if not rescale else torch.allclose(got, want, rtol=1e-2, atol=1e-3)
    assert torch.get_rng_state().equal(_after_draws(tensors, 11))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's Philox draws: needs a GPU")
@pytest.mark.parametrize("method_name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_dare_in_chunks_draws_mergekits_mask_on_cuda(method_name, dtype):
    """On a card the mask is mergekit's (the whole task vector drawn at once, as mergekit draws it), so the
    output without rescaling is mergekit's bit for bit (rescaled: within dtype rounding), and the card's
    generator ends where mergekit's merge leaves it (a stage's later DARE tasks draw the same masks)."""
    tensors = [t.cuda() for t in _inputs((1031, 517), dtype, seed=3)]
    for rescale in (True, False):
        params = {"density": [0.3, 0.6, 0.9], "rescale": rescale}
        torch.cuda.manual_seed(11)
        want = _merge(method_name, tensors, None, **params)
        after = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(11)
        got = _merge(method_name, tensors, 1 << 16, **params)
        assert torch.equal(got, want) if not rescale else torch.allclose(got, want, rtol=1e-2, atol=1e-3)
        assert torch.cuda.get_rng_state().equal(after)


def _after_draws(tensors: list[torch.Tensor], seed: int) -> torch.Tensor:
    """The CPU generator's state after mergekit's own DARE merge: chunking draws exactly as many numbers."""
    torch.manual_seed(seed)
    _merge("dare_ties", tensors, None, density=[0.3, 0.6, 0.9], rescale=False)
    return torch.get_rng_state()


def test_unsupported_methods_are_not_handled():
    assert chunked.handles("ties") and chunked.handles("dare_ties") and chunked.handles("task_arithmetic")
    assert not chunked.handles("della") and not chunked.handles("breadcrumbs_ties")
    assert not chunked.handles("linear") and not chunked.handles("multislerp")


def _peak_bytes(run) -> int:
    """Peak bytes allocated by torch on the CPU while `run()` runs, from the profiler's memory events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("method_name", ["ties", "dare_ties"])
def test_peak_memory_is_the_output_plus_a_few_chunks(method_name):
    """Beyond the inputs a chunked task holds the output, DARE's bool masks and at most
    `WORKSPACE_PER_VECTOR` bytes per chunk element and task vector (`working_set`); mergekit's own merge of
    the same tensor holds many times more."""
    n, chunk = 1_000_000, 20_000
    tensors = _inputs((n,), torch.float32, seed=2)
    params = {"density": [0.3, 0.5, 0.7]}
    output = n * 4
    masks = 3 * n if method_name == "dare_ties" else 0
    got = _peak_bytes(lambda: _merge(method_name, tensors, chunk, **params))
    assert got <= output + masks + chunked.WORKSPACE_PER_VECTOR * chunk * 3
    assert chunked.working_set(method_name, 4 * output, 4, chunk) >= 4 * output + got
    assert got < 2 * output + masks  # the chunk is 1/50 of the tensor
    assert _peak_bytes(lambda: _merge(method_name, tensors, None, **params)) > 4 * output


def test_streamed_tasks_too_big_for_the_card_merge_in_chunks(qwen_family, mergers, monkeypatch, stable_sort):
    """With every task too big for the card and a budget the chunks fit: TIES and DARE are merged in chunks
    (several per tensor), linear and multislerp on the host; TIES gives the card's tensors bit for bit, DARE
    mergekit's masks (rescaled: within dtype rounding)."""
    merger = mergers["qwen"]
    space = space_of(qwen_family, False)
    seeds = seed_genomes(space, MergeOperators(), [1.0, 1.0, 1.0], run_seed=7)
    texts = [render(seeds[label], space) for label in ("linear-ties-frankenmerge", "slerp-dare-dfs")]
    expected = [merger.merge(text, random_seed(text))[0] for text in texts]
    chunks, on_host = Counter(), Counter()
    host, merge_group = run_module._Run._on_host, chunked.merge_group

    def counted_host(self, task, tensors):
        on_host[task.method_name] += 1
        return host(self, task, tensors)

    def counted_chunks(method, group, /, chunk, **parameters):
        chunks[method.method_name] += -(-group.base.tensor.numel() // chunk)
        return merge_group(method, group, chunk=chunk, **parameters)

    monkeypatch.setattr(run_module._Run, "_on_host", counted_host)
    monkeypatch.setattr(chunked, "merge_group", counted_chunks)
    monkeypatch.setattr(merger, "stream", True)
    monkeypatch.setattr(merger, "runs_on_host", lambda method_name, input_bytes: True)
    monkeypatch.setattr(merger, "task_budget", 2**40)
    monkeypatch.setattr(merger, "chunk", 1000)
    before = Counter(merger.placements)
    ties, dare = (merger.merge(text, random_seed(text))[0] for text in texts)
    assert ties.keys() == expected[0].keys() and all(torch.equal(ties[k], expected[0][k]) for k in ties)
    assert dare.keys() == expected[1].keys()
    for name, tensor in dare.items():
        torch.testing.assert_close(tensor, expected[1][name])
    assert on_host.keys() == {"linear", "multislerp"} and chunks.keys() == {"ties", "dare_ties"}
    placed = merger.placements - before  # tasks off the card, as the bench reports them
    assert {m for w, m in placed if w == "chunked"} == chunks.keys()
    assert {m for w, m in placed if w == "host"} == on_host.keys()
    assert all(placed["host", m] == n for m, n in on_host.items())
    assert chunks["ties"] > sum(name.startswith("model.layers.0.") for name in ties)  # several per tensor


def test_a_small_card_merges_the_embedding_in_chunks(mergers, monkeypatch):
    """Under an 8 GiB card the 3×1.5 B embedding's TIES/DARE (four 445 MiB inputs) no longer goes to the host:
    its chunked working set fits; DELLA (not handled) and a card too small for the inputs still go there."""
    merger = mergers["qwen"]
    embedding = 151936 * 1536 * 2
    monkeypatch.setattr(merger, "task_budget", int(0.75 * 8 * 2**30))
    for method_name in ("ties", "dare_ties"):
        assert merger.runs_on_host(method_name, 4 * embedding)
        assert merger.merges_in_chunks(method_name, 4 * embedding, 4)
    assert not merger.merges_in_chunks("della", 4 * embedding, 4)
    monkeypatch.setattr(merger, "task_budget", int(0.75 * 4 * 2**30))
    assert not merger.merges_in_chunks("ties", 4 * embedding, 4)
    monkeypatch.setattr(merger, "task_budget", None)  # resident models: never
    assert not merger.merges_in_chunks("ties", 4 * embedding, 4)
