"""The run file: one pydantic model for everything a run needs, loaded from YAML or JSON.

Every key of the seed document's JSON examples is accepted at the place the seed put it, and unknown or
misspelt keys are errors (mergekit silently ignores a misspelt merge parameter; a run file must not).
How each merge-operator key maps onto mergekit parameters is documented on `MergeOperators`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evoforge.errors import ConfigError
from evoforge.models import Device, model_ref
from evoforge.resources import run_file
from evoforge.userfile import read_data

DOMAINS = ("code", "math", "multilingual", "structured_data")

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class Strict(BaseModel):
    """Unknown keys and non-finite numbers (YAML `.inf`/`.nan`, JSON `NaN`/`Infinity`) are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BaseModelConfig(Strict):
    """One model of the run: an HF id or a local folder (relative paths resolve against the run file)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*$")]
    path: Annotated[str, Field(min_length=1)]
    weight: Positive = 1.0
    """Relative weight of this model in every stage that mixes models (normalized over the models)."""
    domain_specialty: str | None = None
    ancestry: str | None = None
    """Free text: what is known about where the model comes from (shown by `evoforge validate`)."""


class MergeOperators(Strict):
    """Seed parameters of the three genes, and how they map onto mergekit (see README, "Run file").

    - ``linear_weight`` (interp=linear, mergekit ``linear``): the first base model (the *anchor*) gets weight
      ``1 - linear_weight``; the others share ``linear_weight`` in proportion to their ``weight``
      (torch.lerp convention: 0 = anchor, 1 = the others).
    - ``slerp_t`` (interp=slerp): same split as linear_weight; two models render to mergekit ``slerp`` with
      ``t``, three or more to ``multislerp`` around the anchor (or the ancestor) with those weights.
    - ``ties_threshold`` (crossover=ties, mergekit ``ties``): fraction of each task vector's
      smallest-magnitude entries trimmed; mergekit ``density = 1 - ties_threshold``.
    - ``dare_threshold`` (crossover=dare, mergekit ``dare_ties``): drop probability;
      ``density = 1 - dare_threshold`` (survivors rescaled by 1/density, as DARE does).
    - ``dare_amplification``: mergekit ``lambda`` of the DARE stage, the factor on the merged task vector
      (Sakana's evolved weights summed to about 2). TIES seeds start at lambda 1.
    - ``frankenmerge_layers`` (structure=frankenmerge, mergekit ``passthrough``): the depth is cut into
      ``len(frankenmerge_layers)`` equal contiguous blocks; entry i names block i's source: 0 = the crossover
      output, k = the k-th base model (1-based), or a base model's name, ``crossover`` or ``interp``.
    - ``dfs_merge_ratio`` (structure=dfs, passthrough with per-layer ``scale``): the data-flow path starts as
      the crossover output's layers in order, with that fraction of steps (evenly spaced) taking the same
      layer from the base models instead, round robin (one step more where that path would be the
      frankenmerge seed's, so the two seeds differ); every step's input scale starts at 1.
    - ``layer_groups``: 1 = global continuous parameters; G > 1 = G-point mergekit gradients over depth.
    """

    linear_weight: Fraction = 0.5
    slerp_t: Fraction = 0.5
    ties_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    dare_threshold: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    dare_amplification: Positive = 2.0
    frankenmerge_layers: Annotated[list[int | str], Field(min_length=1)] = [0, 1, 2]
    dfs_merge_ratio: Fraction = 0.3
    layer_groups: Annotated[int, Field(ge=1, le=64)] = 1


class EvaluationConfig(Strict):
    """Which lm-eval tasks score a candidate, on which splits, how."""

    tasks_dir: str = "tasks"
    """Folder of lm-eval task YAMLs (relative to the run file; `tasks` falls back to evoforge's own)."""
    tasks: dict[str, list[str]] | None = None
    """Domain → task names; None = every task found under tasks_dir, by its metadata domain."""
    fitness_split: str = "validation"
    heldout_split: str = "test"
    fitness_metric: Literal["accuracy", "likelihood"] = "accuracy"
    """What fitness climbs on the fitness split: `accuracy` (each task's primary metric on greedy generations)
    or `likelihood` (exp of the mean per-token log-probability of each item's gold answer, teacher-forced, no
    decoding). The held-out split is always scored by accuracy: it is the quality claim."""
    limit: Annotated[int, Field(ge=1)] | None = None
    batch_size: Annotated[int, Field(ge=1)] = 32
    max_new_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    compile_generation: bool = False
    """GPU only: decode with a static KV cache that transformers compiles into CUDA graphs. Each new batch
    shape or model depth compiles once (tens of seconds), so it pays over many candidates of one depth."""
    confirm_top: Annotated[int, Field(ge=0, le=64)] = 3
    """With `fitness_metric: likelihood`: at the end of the run, the `confirm_top` fittest distinct candidates
    and the best seed are scored on the fitness split by accuracy, and the most accurate is the run's best
    (`evolve.confirm`). Likelihood ranks candidates well overall but not among the top, where a search climbs
    it (recipes/demo/SEARCH.md). 0: the fittest is the best. Ignored with accuracy fitness."""
    heldout_each_best: bool = True
    """Score each new best on the held-out split as it is found (its model card, the report's held-out
    column, W&B). False: only the run's final best is, when the run ends, and its model is written again with
    those scores (`confirmed_best_model/`): on the demo the new bests' held-out passes took 22-41 % of a run's
    round time (recipes/demo/SEARCH.md), and no held-out score is seen before the search has ended."""


class SearchConfig(Strict):
    """How candidates are proposed (`evoforge.evolve.strategies`): `ga` (default), `ga-async`, `cmaes`,
    `cmaes-async` or `random`.

    A round (one of `max_generations`) evaluates `population_size` new genomes with every strategy, after a
    round 0 of the 8 seeds: ga's 2 elites ride along cached (ga-async: bred one round late, for several
    workers); cmaes, cmaes-async (sampled one round late) and random sample the continuous genes of the best
    seed."""

    strategy: str = "ga"
    sigma0: Annotated[float, Field(gt=0.0, le=1.0)] = 0.2
    """cmaes and cmaes-async: initial step size, as a fraction of each parameter's range."""

    @field_validator("strategy")
    @classmethod
    def _registered(cls, name: str) -> str:
        from evoforge.evolve.strategies import STRATEGIES

        if name not in STRATEGIES:
            raise ValueError(f"{name!r} is not one of {sorted(STRATEGIES)}")
        return name


class RayConfig(Strict):
    """The `ray` executor (`evolve/executors/ray_actors.py`): evaluator actors, each holding the base models
    and one Scorer, on the cluster `RAY_ADDRESS` names or on a local one started for the run."""

    actors: Annotated[int, Field(ge=1)] | None = None
    """How many evaluator actors; None = one per `gpus_per_actor` of the cluster's GPUs (1 without GPUs)."""
    gpus_per_actor: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    """Ray `num_gpus` of each actor; 0.5 puts two actors on one card. Not asked for with `device: cpu`."""
    cpus_per_actor: Annotated[float, Field(gt=0.0)] = 1.0
    """Ray `num_cpus` of each actor (Ray sets the actor's torch threads from it)."""
    max_restarts: Annotated[int, Field(ge=0)] = 3
    """How often Ray restarts an actor whose process died (its candidate goes to another actor)."""


class EvolutionConfig(Strict):
    """A whole run. Field names follow the seed document (flat evolution parameters, `merge_operators`,
    `evaluation_weights`), so its JSON examples load unchanged."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]*$")] = "evoforge"
    base_models: Annotated[list[BaseModelConfig], Field(min_length=2)]
    ancestor: BaseModelConfig | None = None
    max_generations: Annotated[int, Field(ge=1)] = 50
    population_size: Annotated[int, Field(ge=5)] = 8
    mutation_rate: Fraction = 0.15
    selection_pressure: Fraction = 0.7
    plateau_patience: Annotated[int, Field(ge=1)] = 5
    plateau_threshold: Annotated[float, Field(ge=0.0)] = 0.01
    seed: int = 42
    search: SearchConfig = SearchConfig()
    merge_operators: MergeOperators = MergeOperators()
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    evaluation_weights: dict[str, Annotated[float, Field(ge=0.0)]] = {d: 0.25 for d in DOMAINS}
    evaluation: EvaluationConfig = EvaluationConfig()
    device: Device = "auto"
    merge_path: Literal["memory", "disk"] = "memory"
    overlap_merges: bool | None = None
    """Merge the next candidate while this one is scored (memory path; a second model's worth of memory).
    None: where merges run on a GPU that holds the base models; false: one after another."""
    executor: Literal["local", "ray"] = "local"
    """`local`: candidates one after another in this process; `ray`: spread over Ray actors (`ray` keys)."""
    ray: RayConfig = RayConfig()
    output_dir: str | None = None
    """Run directory; default runs/<name> under the working directory."""
    wandb_project: str = "evoforge"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"

    source: Path | None = Field(default=None, exclude=True)
    """The file this config was read from (relative paths resolve against its folder)."""

    @field_validator("base_models")
    @classmethod
    def _unique_names(cls, models: list[BaseModelConfig]) -> list[BaseModelConfig]:
        names = [m.name for m in models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate base model name {dupes[0]!r}")
        reserved = {"crossover", "interp"} & set(names)
        if reserved:
            raise ValueError(f"base model name {reserved.pop()!r} is reserved for a stage")
        return models

    @field_validator("evaluation_weights")
    @classmethod
    def _weights_sum(cls, weights: dict[str, float]) -> dict[str, float]:
        if not weights or sum(weights.values()) <= 0:
            raise ValueError("at least one domain weight must be positive")
        return weights

    @model_validator(mode="after")
    def _cross_checks(self) -> EvolutionConfig:
        n = len(self.base_models)
        names = {m.name for m in self.base_models}
        for i, src in enumerate(self.merge_operators.frankenmerge_layers):
            ok = (isinstance(src, int) and 0 <= src <= n) or (
                isinstance(src, str) and src in names | {"crossover", "interp"}
            )
            if not ok:
                raise ValueError(
                    f"merge_operators.frankenmerge_layers[{i}]: {src!r} is not 0 (crossover), 1..{n} "
                    f"(a base model) or one of {sorted(names | {'crossover', 'interp'})}"
                )
        if self.ancestor is not None and self.ancestor.name in names:
            raise ValueError(f"ancestor.name {self.ancestor.name!r} is also a base model name")
        return self

    @property
    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, model: BaseModelConfig) -> str:
        """A local folder as an absolute path, or the HF id unchanged (evoforge.models.model_ref)."""
        return model_ref(model.path, self.base_dir)

    def run_dir(self) -> Path:
        """output_dir, or runs/<name>; relative to the working directory, as CLI paths are."""
        return Path(self.output_dir or Path("runs") / self.name).expanduser().resolve()

    def resolved(self) -> EvolutionConfig:
        """The same run with every path absolute, as written to run_dir/config.yaml: a resume that reads it
        back from anywhere finds the same models, tasks and run directory."""
        tasks = Path(self.evaluation.tasks_dir).expanduser()
        if not tasks.is_absolute() and (self.base_dir / tasks).is_dir():
            tasks = (self.base_dir / tasks).resolve()
        return self.model_copy(
            update={
                "base_models": [m.model_copy(update={"path": self.resolve(m)}) for m in self.base_models],
                "ancestor": self.ancestor.model_copy(update={"path": self.resolve(self.ancestor)})
                if self.ancestor
                else None,
                "evaluation": self.evaluation.model_copy(update={"tasks_dir": str(tasks)}),
                "output_dir": str(self.run_dir()),
            }
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _field_path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(source: str | Path, err: ValidationError) -> str:
    """The first pydantic error as one line: `file: field: problem`."""
    first = err.errors()[0]
    loc = tuple(
        p
        for p in first["loc"]
        if not (isinstance(p, str) and (p in ("int", "str") or p.startswith("function-")))
    )
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key (misspelt?)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    msg = msg.removeprefix("Value error, ")
    return f"{source}: {_field_path(loc)}: {msg}"


def read_mapping(path: Path) -> dict:
    """YAML or JSON file → mapping, or ConfigError naming the file (evoforge.userfile: strict UTF-8, no
    duplicate keys)."""
    data = read_data(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping of keys, got {type(data).__name__}")
    return data


def load_config(
    path: str | Path, flags: Mapping[str, str] | None = None, **overrides: object
) -> EvolutionConfig:
    """Read and validate a run file; `overrides` replace top-level keys (CLI flags). A bad override is blamed
    on its flag (`flags`: key → flag, e.g. max_generations → --gens), not on the run file."""
    path = run_file(path)
    data = read_mapping(path)
    if "source" in data:
        raise ConfigError(f"{path}: source: unknown key (misspelt?)")
    given = {k: v for k, v in overrides.items() if v is not None}
    data.update(given)
    try:
        return EvolutionConfig.model_validate({**data, "source": path.resolve()})
    except ValidationError as err:
        key = err.errors()[0]["loc"][0] if err.errors()[0]["loc"] else None
        if key in given:
            raise ConfigError(
                format_validation_error((flags or {}).get(key, f"override {key}"), err)
            ) from None
        raise ConfigError(format_validation_error(path, err)) from None
