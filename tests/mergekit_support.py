"""Support for tests (and bench/merge_bench.py) that run mergekit's own in-memory planner as a reference.

evoforge itself never plans with mergekit's `plan_in_memory` (the memory path records the planner's calls and
resolves parameters itself), so the workaround for its bug lives here, next to its only users.
"""

from __future__ import annotations

import mergekit.merge
from mergekit.architecture import get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.tasks import ReturnTensor
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

from evoforge.merge.mergekit_fixes import layer_types_follow_slices


def plan_in_memory(merge_config: MergeConfiguration, options: MergeOptions) -> list[ReturnTensor]:
    """Plan one merge whose tensors an `Executor` returns instead of writing them (what run_merge computes).

    `MergePlanner.plan_in_memory()` builds `ReturnTensor(tensor_task=...)`, which pydantic refuses
    (`Can't instantiate abstract class Task[Tensor]`, io/tasks.py ~256); `model_construct` skips that check.
    """
    config = merge_config.model_copy(deep=True)  # the planner normalises the config in place
    arch_info = get_architecture_info(config, options)
    with layer_types_follow_slices():
        out_config = mergekit.merge._model_out_config(config, arch_info, options.trust_remote_code)
    planner = MergePlanner(config, arch_info, options=options, out_model_config=out_config)
    planner._plan()
    return [
        ReturnTensor.model_construct(
            weight_info=weight, tensor_task=task, dtype=weight.force_dtype or config.out_dtype
        )
        for weight, task in planner._tensors
    ]
