"""Batched merges (`evoforge.merge.memory.batched`) give the per-tensor path's bits: mergekit's own tasks one
by one, on recipes (seeds, mutants, per-layer parameters) and kernel by kernel on larger tensors with ties."""

from __future__ import annotations

import random

import immutables
import pytest
import torch
from evolution_support import space_of
from memory_merge_support import candidates
from mergekit import merge_methods
from mergekit.architecture import WeightInfo
from mergekit.common import ModelReference
from mergekit.merge_methods.base import ParameterScope
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from evoforge.merge import mergekit_fixes
from evoforge.merge.memory import batched
from evoforge.recipe import random_seed, render

A, B, C, BASE = (ModelReference.model_validate(f"/{n}") for n in ("a", "b", "c", "base"))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaN equals NaN, -0.0 differs from 0.0)."""
    return tensor.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def assert_same_bits(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], label: str) -> None:
    assert ours.keys() == theirs.keys(), label
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(bits(ours[name]), bits(tensor)), (label, name)


class Sizes(list):
    """The size of each batched call `batched.execute` makes (more than one task merged at once), and the
    methods that made them."""

    methods: set[str]


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> Sizes:
    sizes = Sizes()
    sizes.methods = set()
    merge = batched._merge

    def counted(method, calls, masks=None):
        if len(calls) > 1:
            sizes.append(len(calls))
            sizes.methods.add(method.spec.name)
        return merge(method, calls, masks)

    monkeypatch.setattr(batched, "_merge", counted)
    return sizes


def merged_both_ways(merger, text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    seed = random_seed(text)
    monkeypatch.setattr(batched, "ENABLED", False)
    alone, _ = merger.merge(text, seed)
    monkeypatch.setattr(batched, "ENABLED", True)
    together, _ = merger.merge(text, seed)
    return together, alone


@pytest.mark.parametrize(("arch", "ancestor"), [("qwen", False), ("llama", True)])
def test_batched_recipes_give_the_per_tensor_bits(request, mergers, monkeypatch, batches, arch, ancestor):
    """Seeds (linear/multislerp interp, TIES/DARE crossover, DFS/frankenmerge), mutants and a deep DFS
    path: batching on and off give the same tensors (DARE: the same masks), and every stage did batch."""
    family = request.getfixturevalue(f"{arch}_family")
    space = space_of(family, ancestor)
    for label, genome in candidates(space, with_seeds=True, mutants=3).items():
        together, alone = merged_both_ways(mergers[arch], render(genome, space), monkeypatch)
        assert_same_bits(together, alone, label)
    assert max(batches) >= 6 and len(batches) > 50  # same-shaped tensors of all 6 layers, at least
    assert {"linear", "multislerp", "ties", "dare_ties"} <= batches.methods, batches.methods


def test_per_layer_parameters_batch_as_resolved(qwen_family, mergers, monkeypatch, batches):
    """Gradients over depth and filters give each layer its own weights and densities (rows of one batch);
    a shared parameter that differs by filter (lambda here) splits the batch: the bits stay mergekit's."""
    a, b, c, ancestor = (qwen_family[n] for n in ("alpha", "beta", "gamma", "ancestor"))
    ties = (
        f"merge_method: ties\nbase_model: {ancestor}\ndtype: float32\n"
        f"parameters: {{normalize: true, lambda: [{{filter: mlp, value: 0.7}}, {{value: 1.0}}]}}\n"
        f"models:\n  - model: {a}\n    parameters: {{weight: [0.2, 0.9], density: [{{filter: mlp, value: "
        f"[0.3, 0.8]}}, {{filter: v_proj, value: 0.0}}, {{value: 0.6}}]}}\n"
        f"  - model: {b}\n    parameters: {{weight: 0.5, density: [1.0, 0.5]}}\n"
        f"  - model: {c}\n    parameters: {{weight: -0.3, density: 0.9}}\n"
    )
    multislerp = (
        f"merge_method: multislerp\nbase_model: {ancestor}\ndtype: float32\n"
        f"models:\n  - model: {a}\n    parameters: {{weight: [0.1, 0.6]}}\n"
        f"  - model: {b}\n    parameters: {{weight: [{{filter: self_attn, value: 0.7}}, {{value: 0.2}}]}}\n"
    )
    linear = (
        f"merge_method: linear\ndtype: float32\nparameters: {{normalize: false}}\n"
        f"models:\n  - model: {a}\n    parameters: {{weight: [0.0, 1.0]}}\n"
        f"  - model: {b}\n    parameters: {{weight: [{{filter: mlp, value: 0.3}}, {{value: 0.5}}]}}\n"
    )
    slerp = (
        f"merge_method: slerp\nbase_model: {a}\ndtype: float32\n"
        f"parameters: {{t: [{{filter: mlp, value: [0.1, 0.9]}}, {{value: 0.4}}]}}\n"
        f"models:\n  - model: {a}\n  - model: {b}\n"
    )
    for label, text in (("ties", ties), ("multislerp", multislerp), ("linear", linear), ("slerp", slerp)):
        before = len(batches)
        together, alone = merged_both_ways(mergers["qwen"], text, monkeypatch)
        assert_same_bits(together, alone, label)
        assert len(batches) > before, label


def task(method: str, models: tuple, base, shared: dict, per_input: dict) -> ExecuteMergeMethodTask:
    """A merge task as mergekit's planner builds it (resolved parameters: every shared one set)."""
    spec = merge_methods.get(method).spec
    defaults = {p.name: p.default for p in spec.parameters if p.scope == ParameterScope.SHARED}
    return ExecuteMergeMethodTask.model_construct(
        method_name=method,
        gather_tensors=None,
        model_order=models,
        base_model=base,
        output_weight=WeightInfo(name="w"),
        parameters=immutables.Map({**defaults, **shared}),
        input_parameters=immutables.Map({m: immutables.Map(v) for m, v in per_input.items()}),
    )


def inputs(rows: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[dict]:
    """Each row: base, a, b, c near each other, in `dtype` (bfloat16: many equal magnitudes); the last row's
    inputs all equal the base (a tensor no input changes)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row in range(rows):
        base = torch.randn(shape, generator=generator)
        noise = [0.0 if row == rows - 1 else 0.05] * 3
        tensors = {m: base + s * torch.randn(shape, generator=generator) for m, s in zip((A, B, C), noise)}
        out.append({ref: t.to(dtype) for ref, t in {BASE: base, **tensors}.items()})
    return out


def kernel_cases(rows: int) -> dict[str, list[ExecuteMergeMethodTask]]:
    """Per method, one task per row with per-row weights and densities (densities 0, 1 and between)."""
    rng = random.Random(3)
    cases: dict[str, list[ExecuteMergeMethodTask]] = {}
    densities = [0.0, 1.0, *(rng.uniform(0.05, 0.95) for _ in range(rows - 2))]
    for method, shared in (
        ("ties", {}),
        ("ties", {"int8_mask": True, "lambda": 0.8, "normalize": False}),
        ("task_arithmetic", {"lambda": 1.3}),
    ):
        cases[f"{method} {shared}"] = [
            task(
                method,
                (BASE, A, B, C),
                BASE,
                shared,
                {m: {"weight": rng.uniform(-0.5, 1.0), "density": densities[i]} for m in (A, B, C)},
            )
            for i in range(rows)
        ]
    for base in (BASE, None):
        models = (BASE, A, B, C) if base else (A, B, C)
        cases[f"multislerp base={base is not None}"] = [
            task("multislerp", models, base, {}, {m: {"weight": rng.uniform(0.1, 1.0)} for m in (A, B, C)})
            for _ in range(rows)
        ]
    cases["slerp"] = [
        task("slerp", (BASE, A), BASE, {"t": rng.uniform(0.0, 1.0)}, {m: {} for m in (BASE, A)})
        for _ in range(rows)
    ]
    cases["linear"] = [
        task("linear", (BASE, A, B), None, {}, {m: {"weight": rng.uniform(0.0, 1.0)} for m in (BASE, A, B)})
        for _ in range(rows)
    ]
    return cases


@pytest.mark.parametrize(("threads", "rows"), [(1, 40), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_kernels_give_mergekits_bits(threads, rows, dtype):
    """Tensors of 49,152 elements (above torch's 32,768-element grain: with 2 threads a whole-tensor reduction
    is split over them), bfloat16 magnitudes full of ties at TIES's k-th value, densities 0 and 1, int8 masks,
    lambda, a row no input changes, 40 rows (elementwise functions vectorised over rows): batched, each row
    has the bits of mergekit's task run alone."""
    shape = (96, 512)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for label, tasks in kernel_cases(rows).items():
            tensors = inputs(rows, shape, dtype, seed=len(label))
            with mergekit_fixes.applied():
                alone = [t.execute(tensors=dict(x)) for t, x in zip(tasks, tensors)]
                together = batched.execute(tasks, tensors)
            for row, (ours, theirs) in enumerate(zip(together, alone)):
                assert ours.dtype == theirs.dtype and torch.equal(bits(ours), bits(theirs)), (label, row)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_kernels_give_mergekits_bits_on_cuda():
    """On CUDA, linear, task arithmetic and TIES batch (multislerp does not): the same bits as alone."""
    rows, shape = 5, (96, 512)
    for label, tasks in kernel_cases(rows).items():
        if not batched.batchable(tasks[0].method_name, torch.device("cuda")):
            continue
        tensors = [{r: t.cuda() for r, t in x.items()} for x in inputs(rows, shape, torch.bfloat16, 1)]
        with mergekit_fixes.applied():
            alone = [t.execute(tensors=dict(x)) for t, x in zip(tasks, tensors)]
            together = batched.execute(tasks, tensors)
        for row, (ours, theirs) in enumerate(zip(together, alone)):
            assert torch.equal(bits(ours), bits(theirs)), (label, row)


def dare_tasks(rows: int, rescale: bool) -> list[ExecuteMergeMethodTask]:
    """DARE tasks, one a row, densities 0, 1 and between per input, per-row weights."""
    rng = random.Random(5)
    return [
        task(
            "dare_ties",
            (BASE, A, B, C),
            BASE,
            {"rescale": rescale, "normalize": True, "lambda": 1.5},
            {
                m: {
                    "weight": rng.uniform(0.1, 1.0),
                    "density": rng.choice([0.0, 1.0, rng.uniform(0.05, 0.95)]),
                }
                for m in (A, B, C)
            },
        )
        for _ in range(rows)
    ]


def dare_both_ways(tasks, tensors, used) -> tuple[list, list, bool]:
    """mergekit's tasks one by one (the unused ones too: they draw) and `batched.execute`, from one seed:
    both results, and whether both left the generator in the same state."""
    with mergekit_fixes.applied():
        torch.manual_seed(11)
        alone = [t.execute(tensors=dict(x)) for t, x in zip(tasks, tensors)]
        after_alone = torch.get_rng_state()
        torch.manual_seed(11)
        together = batched.execute(tasks, tensors, used)
        same_state = torch.equal(torch.get_rng_state(), after_alone)
    return together, alone, same_state


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rescale", [True, False])
def test_batched_dare_draws_mergekits_masks(threads, dtype, rescale):
    """DARE batched: every task's masks drawn in mergekit's order (the unused tasks' too), the used rows
    merged with them, the l1 rescale summed row by row over 49,152 elements (split over 2 threads as one
    tensor's sum is): each used row has the bits of mergekit's task run alone, and the generator ends where
    mergekit's leaves it."""
    rows, shape = 6, (96, 512)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        tasks, tensors = dare_tasks(rows, rescale), inputs(rows, shape, dtype, seed=7)
        used = [True, False, True, True, False, True]
        together, alone, same_state = dare_both_ways(tasks, tensors, used)
        assert same_state
        for row, (ours, theirs) in enumerate(zip(together, alone)):
            if used[row]:
                assert ours.dtype == theirs.dtype and torch.equal(bits(ours), bits(theirs)), row
            else:
                assert ours is None, row
    finally:
        torch.set_num_threads(previous)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_dare_draws_mergekits_masks_on_cuda():
    """The same on CUDA (Philox draws, CUDA reductions): what lets `draws_in_batches` batch DARE stages on a
    GPU (passed on an H100, 2026-12-06)."""
    tasks = dare_tasks(6, rescale=True)
    tensors = [{r: t.cuda() for r, t in x.items()} for x in inputs(6, (96, 512), torch.bfloat16, 7)]
    together, alone, _ = dare_both_ways(tasks, tensors, [True] * 6)
    for row, (ours, theirs) in enumerate(zip(together, alone)):
        assert torch.equal(bits(ours), bits(theirs)), row
