"""Two models scored on the same items, compared per domain with paired bootstrap intervals.

What `evoforge compare A B` runs. A model is a folder, a cached Hugging Face id, or a candidate YAML (a run's
`candidates/gen_N/<id>.yaml`, a best model's `evoforge_recipe.yaml` or any mergekit recipe), merged through
mergekit into a scratch folder first, as `evoforge merge` does, with the DARE seed of the recipe's header.
Each model gets its own Scorer (their tokenizers may differ); the second is loaded once the first is freed.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from evoforge.config import EvaluationConfig
from evoforge.errors import ConfigError
from evoforge.evaluate.scorer import Dtype, EvalResult, Metric, Scorer
from evoforge.evaluate.stats import Comparison, compare
from evoforge.models import Device

RECIPE_SUFFIXES = (".yaml", ".yml")


def is_recipe(source: str) -> bool:
    return Path(source).suffix in RECIPE_SUFFIXES and Path(source).is_file()


def model_folder(source: str, scratch: Path, device: Device | str) -> str:
    """A model folder or HF id as given; a recipe merged (disk path) into a folder under `scratch`."""
    if not is_recipe(source):
        return source
    from evoforge.merge.disk import merge_recipe
    from evoforge.recipe import random_seed

    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read ({exc.strerror or exc})") from None
    out = Path(tempfile.mkdtemp(prefix="model-", dir=scratch))
    return str(merge_recipe(text, out, device=str(device), random_seed=random_seed(text), source=source))


@dataclass(frozen=True)
class ModelComparison:
    """A and B on one split: their results and the paired comparison of B − A."""

    a: str
    b: str
    result_a: EvalResult
    result_b: EvalResult
    comparison: Comparison


def compare_models(
    a: str,
    b: str,
    split: str = "test",
    *,
    limit: int | None = None,
    metric: Metric | None = None,
    device: Device | str = "auto",
    dtype: Dtype = "float32",
    evaluation: EvaluationConfig | None = None,
    weights: Mapping[str, float] | None = None,
    tasks_dir: str | Path | None = None,
    status: Callable[[str], object] = lambda message: None,
) -> ModelComparison:
    """Score A then B on `split` (first `limit` items of each task; `metric` as for `Scorer.score`) and
    compare them item by item. `status` hears what is being done (the CLI shows it)."""
    results: list[EvalResult] = []
    with tempfile.TemporaryDirectory(prefix="evoforge-compare-") as tmp:
        for source in (a, b):
            if is_recipe(source):
                status(f"merging {source}")
            folder = model_folder(source, Path(tmp), device)
            status(f"loading {source}")
            scorer = Scorer.from_pretrained(
                folder,
                device=device,
                dtype=dtype,
                evaluation=evaluation,
                weights=weights,
                tasks_dir=tasks_dir,
            )
            status(f"scoring {source} on {split}")
            results.append(scorer.score(split, limit=limit, metric=metric))
            del scorer
            gc.collect()
    first, second = results
    items_a, items_b = first.item_scores(), second.item_scores()
    if items_a is None or items_b is None:
        name = next(n for r in results for n, t in r.tasks.items() if t.items is None)
        raise ConfigError(f"{first.tasks[name].metric} of task {name}: no per-item scores to pair")
    cmp = compare(items_a, items_b, first.task_domains(), first.weights)
    return ModelComparison(a=a, b=b, result_a=first, result_b=second, comparison=cmp)
