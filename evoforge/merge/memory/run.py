"""Executing a candidate's stage plans: each output tensor computed by mergekit's own task
(`ExecuteMergeMethodTask.execute`: the registered merge method, its dtype handling, TIES/DARE sparsification),
fed from resident tensors instead of safetensors files.

Stage tensors are computed on demand from the final stage's needs and dropped after their last use: a stage
tensor the final path does not use costs nothing. A stage that draws random numbers (DARE) is the exception:
mergekit seeds torch at the start of each stage and draws masks in its executor's task order, so such a stage
runs its tasks in exactly that order (from mergekit's own scheduler) under its own saved generator state, up
to the last tensor used; a task nothing uses only draws (DARE's masks depend on shapes, dtypes and densities,
not values, so the stage tensors it would read are replaced by zeros). Where `batched` can draw them (DARE on
the CPU), consecutive tasks in that order are merged in one call (`_draw_batch`), their masks drawn in the
same order. An unscaled passthrough slice is assembled by reference (the output tensor *is* the input tensor).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from mergekit.common import ModelReference
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask
from transformers.trainer_utils import set_seed

from evoforge.merge.memory import batched, chunked
from evoforge.merge.memory.layout import NotInMemory, _Entry, _Input
from evoforge.merge.memory.plan import _StagePlan

if TYPE_CHECKING:
    from evoforge.merge.memory.merger import MemoryMerger


class _Run:
    """One candidate: stage tensors computed on demand, each kept until its last consumer has read it.

    A stage that draws random numbers runs its tasks in the disk executor's order, up to the last one used.
    A task of such a stage that nothing uses runs only for its draws: DARE's masks depend on shapes, dtypes,
    device and densities, not on values, so stage outputs it would read are replaced by zeros (and are not
    computed)."""

    def __init__(self, merger: MemoryMerger, stages: dict[str, _StagePlan], seed: int | None) -> None:
        self.merger, self.stages, self.seed = merger, stages, seed
        self.values: dict[tuple[str, str], torch.Tensor | None] = {}
        self.uses: Counter[tuple[str, str]] = Counter()
        self.counted: set[tuple[str, str]] = set()
        """Stage tasks that run for their output (their inputs are counted in `uses`)."""
        self.position = dict.fromkeys(stages, 0)
        self.rng: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.batching = batched.ENABLED and not merger.stream
        """Same-shaped tasks of a stage merged in one call (`batched`); not with streamed residents (a small
        card: the per-task host and chunk rules of `_run_task` apply)."""
        self.batches: dict[str | None, dict[str, list[str]]] = {}
        """Per stage: each batched output's batch (the outputs merged in the same call)."""
        self.ready: dict[tuple[str | None, str], torch.Tensor | None] = {}
        """Outputs merged in a batch before they were asked for."""
        self.shapes: dict[tuple[str, str], tuple[int, ...] | None] = {}
        self.drawn: set[tuple[str, str]] = set()
        """Unused tasks of a random stage whose masks a batch has drawn already (`_draw_batch`)."""

    def _count_inputs(self, entry: _Entry) -> None:
        for inp in entry.inputs:
            source = inp.source
            if source is not None and source[0] in self.stages:
                self.uses[source] += 1
                if source not in self.counted:
                    self.counted.add(source)
                    self._count_inputs(self.stages[source[0]].skeleton.entries[source[1]])

    def assemble(self, final: _StagePlan, write: Callable[[str, torch.Tensor], None]) -> None:
        """The final stage's tensors, each handed to `write`: in the disk executor's order if the stage
        draws random numbers itself, else in an order that takes random stages' outputs as they come (few
        are held at once)."""
        entries = final.skeleton.entries
        for entry in entries.values():
            self._count_inputs(entry)
        for path, stage in reversed(self.stages.items()):  # consumers first
            for name in stage.skeleton.order or ():
                key = (path, name)
                if key not in self.counted and name not in stage.skeleton.draws:
                    self.counted.add(key)
                    self._count_inputs(stage.skeleton.entries[name])
        position = {
            (path, name): i
            for path, stage in self.stages.items()
            for i, name in enumerate(stage.skeleton.order or ())
        }

        def first_needed(name: str) -> int:
            sources = (inp.source for inp in entries[name].inputs)
            return min((position[s] for s in sources if s in position), default=-1)

        written: set[str] = set()
        for name in final.skeleton.order or sorted(entries, key=first_needed):
            if name in written:
                continue
            tensor = self._execute(None, final, name)
            if tensor is not None:
                write(name, tensor)
            for key in [key for key in self.ready if key[0] is None]:  # merged in the same batch
                written.add(key[1])
                if (tensor := self.ready.pop(key)) is not None:
                    write(key[1], tensor)

    def _tensor(self, source: tuple[str, str]) -> torch.Tensor | None:
        """A stage output, computed if needed; forgotten after its last use. With streamed residents (a GPU
        too small for them) a tensor kept for a later use waits on the host: a random stage computed in
        its executor's order can otherwise hold most of a model on the card until the final stage reads it."""
        if source not in self.values:
            path = source[0]
            stage = self.stages[path]
            order = stage.skeleton.order
            if order is None:
                self.values[source] = self._execute(path, stage, source[1])
            while source not in self.values:
                name = order[self.position[path]]
                key = (path, name)
                if key not in self.ready and key not in self.drawn:
                    self._draw_batch(path, stage, order[self.position[path] :])
                self.position[path] += 1
                if key not in self.counted:  # unused: only its draws matter
                    if key not in self.drawn:
                        self._draw(path, stage, name)
                    self.drawn.discard(key)
                    continue
                tensor = self._execute(path, stage, name)
                if self.uses[key]:
                    self.values[key] = self._park(tensor) if key != source else tensor
        self.uses[source] -= 1
        if not self.uses[source]:
            return self.values.pop(source)
        tensor = self.values[source] = self._park(self.values[source])
        return tensor

    def _park(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """Where a stage tensor waits for its next use: on the host when residents are streamed."""
        return tensor.to("cpu") if self.merger.stream and tensor is not None else tensor

    def _load(self, inp: _Input) -> torch.Tensor | None:
        """What mergekit's LoadTensor gives: the tensor under its first available name, cast to its dtype."""
        if inp.source is None:
            return None
        path, name = inp.source
        if path in self.stages:
            tensor = self._tensor(inp.source)
            if tensor is not None:
                tensor = tensor.to(self.merger.device, non_blocking=True)
        else:
            resident = self.merger.models[path]
            tensor = resident.tensors[name]
            kept, stored = tensor.dtype, resident.stored[name]
            if kept != stored and (inp.dtype or stored) != kept:
                raise NotInMemory(f"residents are kept in {kept}; this recipe reads {inp.dtype or stored}")
            tensor = tensor.to(self.merger.device, non_blocking=True)
        if tensor is not None and inp.dtype is not None and tensor.dtype != inp.dtype:
            tensor = tensor.to(inp.dtype)
        return tensor

    def _draw(self, path: str, stage: _StagePlan, name: str) -> None:
        self._run_task(path, stage.task(name), self._draw_inputs(stage, name), random=True)

    def _draw_inputs(self, stage: _StagePlan, name: str) -> dict[ModelReference, torch.Tensor]:
        """An unused task's inputs: the residents it reads, zeros for the stage tensors (its masks depend only
        on shapes, dtypes and densities)."""
        residents, zeros = stage.skeleton.draws[name]
        tensors = {inp.ref: self._load(inp) for inp in residents}
        shape = next(iter(tensors.values())).shape
        tensors.update({ref: torch.zeros(shape, dtype=d, device=self.merger.device) for ref, d in zeros})
        return tensors

    def _draw_batch(self, path: str, stage: _StagePlan, names: Sequence[str]) -> None:
        """The next tasks of a random stage in its executor order, as many as batch together
        (`batched.draws_in_batches`, one `options`, at most `batched.MAX_BYTES` of inputs), merged in one
        `batched.execute`: every task's masks drawn in that order, the used tasks' outputs kept in `ready`,
        the unused ones marked `drawn`. Fewer than two: nothing (they run one by one)."""
        if not self.batching:
            return
        entries, device = stage.skeleton.entries, self.merger.device
        batch: list[str] = []
        shared, size = None, 0
        budget = batched.MAX_BYTES.get(device.type, 0)
        for name in names:
            task = stage.task(name)
            if not batched.draws_in_batches(task.method_name, device):
                break
            options = batched.options(task)
            shapes = [self._shape(inp) for inp in entries[name].inputs]
            size += 4 * sum(math.prod(shape) for shape in shapes if shape is not None)
            if options is None or (batch and (options != shared or size > budget)):
                break
            shared = options
            batch.append(name)
        if len(batch) < 2:
            return
        self._merge_batch(path, stage, batch, [(path, n) in self.counted for n in batch])

    def _execute(self, path: str | None, stage: _StagePlan, name: str) -> torch.Tensor | None:
        """One output tensor of a stage (`path` None: the final document), with those merged in the same
        batch (kept in `ready` until asked for)."""
        if (path, name) in self.ready:
            return self.ready.pop((path, name))
        batch = self._batch(path, stage, name)
        if batch:
            return self._execute_batch(path, stage, batch, name)
        entry, task = stage.skeleton.entries[name], stage.task(name)
        tensors = self._inputs(entry)
        if task.method_name == "passthrough" and len(tensors) == 1 and task.dtype is task.out_dtype is None:
            (ref,) = tensors
            if task.input_parameters[ref]["scale"] in (None, 1.0):  # x * 1.0 == x: keep the reference
                result = tensors[ref]
            else:
                result = task.execute(tensors=tensors)
        else:
            result = self._run_task(path, task, tensors, random=stage.skeleton.order is not None)
        dtype = entry.save_dtype
        return result.to(dtype) if result is not None and dtype is not None else result

    def _batch(self, path: str | None, stage: _StagePlan, name: str) -> list[str]:
        """The outputs merged in one call with `name` ([] : alone). A stage's batches are formed when its
        first output is asked for, from the outputs this candidate uses: same `batched.options`, save dtype
        and input shapes, at most `batched.MAX_BYTES` of inputs for the device each."""
        if not self.batching or stage.skeleton.order is not None:  # random stages: disk executor's order
            return []
        if path not in self.batches:
            entries = stage.skeleton.entries
            alike: dict[tuple, list[str]] = {}
            for n in entries if path is None else (n for n in entries if (path, n) in self.counted):
                task = stage.task(n)
                if not batched.batchable(task.method_name, self.merger.device):
                    continue
                options = batched.options(task)
                if options is not None:
                    shapes = tuple(self._shape(inp) for inp in entries[n].inputs)
                    alike.setdefault((options, entries[n].save_dtype, shapes), []).append(n)
            self.batches[path] = {}
            for (_, _, shapes), names in alike.items():
                size = 4 * sum(math.prod(shape) for shape in shapes if shape is not None)
                per_call = max(1, batched.MAX_BYTES.get(self.merger.device.type, 0) // max(size, 1))
                for start in range(0, len(names), per_call):
                    chunk = names[start : start + per_call]
                    if len(chunk) > 1:
                        self.batches[path].update(dict.fromkeys(chunk, chunk))
        return self.batches[path].get(name, [])

    def _shape(self, inp: _Input) -> tuple[int, ...] | None:
        """The shape of what `_load(inp)` gives, without computing it (a merge keeps its inputs' shape)."""
        if inp.source is None:
            return None
        path, name = inp.source
        stage = self.stages.get(path)
        if stage is None:
            return tuple(self.merger.models[path].tensors[name].shape)
        if inp.source not in self.shapes:
            inputs = stage.skeleton.entries[name].inputs
            self.shapes[inp.source] = next((s for i in inputs if (s := self._shape(i)) is not None), None)
        return self.shapes[inp.source]

    def _execute_batch(
        self, path: str | None, stage: _StagePlan, names: list[str], name: str
    ) -> torch.Tensor | None:
        """The outputs `names` of a stage merged in one call; `name`'s is returned, the others wait in `ready`."""
        for n in names:
            del self.batches[path][n]
        self._merge_batch(path, stage, names)
        return self.ready.pop((path, name))

    def _merge_batch(
        self, path: str | None, stage: _StagePlan, names: list[str], used: list[bool] | None = None
    ) -> None:
        """Outputs `names` of a stage merged in one `batched.execute`, each kept in `ready` in its save dtype.
        With `used` (a random stage, under its generators): the unused ones only draw, on `_draw_inputs`, and
        are marked `drawn`."""
        entries = stage.skeleton.entries
        use = used or [True] * len(names)
        inputs = [self._inputs(entries[n]) if u else self._draw_inputs(stage, n) for n, u in zip(names, use)]
        with self._generator(path) if used is not None else nullcontext():
            results = batched.execute([stage.task(n) for n in names], inputs, used)
        del inputs
        for n, u, result in zip(names, use, results):
            if not u:
                self.drawn.add((path, n))
                continue
            dtype = entries[n].save_dtype
            self.ready[path, n] = result.to(dtype) if result is not None and dtype is not None else result

    def _inputs(self, entry: _Entry) -> dict[ModelReference, torch.Tensor]:
        """A task's inputs as mergekit's LoadTensor gives them, those that exist."""
        return {inp.ref: t for inp in entry.inputs if (t := self._load(inp)) is not None}

    def _run_task(
        self,
        path: str | None,
        task: ExecuteMergeMethodTask,
        tensors: dict[ModelReference, torch.Tensor],
        random: bool,
    ) -> Any:
        """mergekit's task on its inputs (under its stage's generators if it draws random numbers).

        With streamed residents (a GPU too small for them) a task whose working set would not fit on the
        card (`MemoryMerger.runs_on_host`: TIES/DARE over a 233 M-element embedding need ~14× its size) is
        merged on the card in chunks (`chunked`: TIES and task arithmetic give the card's bits, DARE draws its
        masks on the card as mergekit does), or, for other methods or when even the chunks
        would not fit, by mergekit's same code on the host, as the disk path does with a CPU device. The rule
        depends only on the card and the shapes, so a recipe and seed give the same tensors on the same card
        every time; the host path does not give the bits of a larger GPU (sort order of equal magnitudes,
        summation order, host generator). A deterministic task that still runs out of device memory is
        retried on the host the same way."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            with self._generator(path) if random else nullcontext():
                method, chunks = nullcontext(), False
                if self.merger.runs_on_host(task.method_name, size):
                    if not self.merger.merges_in_chunks(task.method_name, size, len(tensors)):
                        return self._on_host(task, tensors)
                    method, chunks = chunked.in_chunks(task.method_name, self.merger.chunk), True
                try:
                    with method:
                        result = task.execute(tensors=tensors)
                    if chunks:
                        self.merger.placements["chunked", task.method_name] += 1
                    return result
                except torch.OutOfMemoryError:
                    if random or not self.merger.stream:
                        raise
                torch.cuda.empty_cache()
                return self._on_host(task, tensors)
        except torch.OutOfMemoryError as error:
            names = f"{task.output_weight.name} ({task.method_name}, inputs {size / 2**30:.2f} GiB)"
            error.add_note(f"evoforge: out of GPU memory merging {names}")
            raise

    def _on_host(self, task: ExecuteMergeMethodTask, tensors: dict[ModelReference, torch.Tensor]) -> Any:
        self.merger.placements["host", task.method_name] += 1
        host = {ref: tensor.cpu() for ref, tensor in tensors.items()}
        tensors.clear()  # the caller's references to the device copies go too
        return task.execute(tensors=host).to(self.merger.device)

    @contextmanager
    def _generator(self, path: str | None) -> Iterator[None]:
        """torch's generators as the disk path has them for this stage's task: seeded at the stage's start
        (`run_merge` calls transformers' `set_seed`), then advanced only by this stage's own tasks."""
        if self.seed is None:
            yield
            return
        cuda = self.merger.device if self.merger.device.type == "cuda" else None
        if path not in self.rng:
            set_seed(self.seed)
        else:
            torch.set_rng_state(self.rng[path][0])
            if cuda is not None:
                torch.cuda.set_rng_state(self.rng[path][1], cuda)
        yield
        self.rng[path] = (torch.get_rng_state(), torch.cuda.get_rng_state(cuda) if cuda is not None else None)
