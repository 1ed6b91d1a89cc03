"""Genome ⇄ mergekit multi-document YAML.

A genome renders to three documents that stock `mergekit-multi` runs unchanged: `evoforge_interp`,
`evoforge_crossover` (named stages) and the final unnamed passthrough. Comments say which gene each stage
comes from; the header carries the DARE seed as the `--random-seed` to pass to mergekit. evoforge's own YAMLs
(hand-edited or not, as long as the three-stage shape stays) parse back to the genome they describe.

DFS input scales are rendered in weight space: scaling the input of path step k by w_k equals scaling
`o_proj` and `down_proj` of the output's layer k by 1 / (w_0 · … · w_k) in a pre-norm model (the final norm
is scale-invariant), so each step's slice carries that product as a filtered `scale`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import yaml

from evoforge.errors import ConfigError
from evoforge.genome.genes import (
    CrossoverGene,
    Genome,
    GenomeSpace,
    InterpGene,
    Step,
    StructureGene,
    simplex,
)

INTERP_STAGE = "evoforge_interp"
CROSSOVER_STAGE = "evoforge_crossover"
STAGE_OF_SOURCE = {"interp": INTERP_STAGE, "crossover": CROSSOVER_STAGE}
SCALED_MODULES = ("o_proj", "down_proj")
_SEED_LINE = re.compile(r"--random-seed\s+(\d+)")
_CROSSOVER_METHOD = {"ties": "ties", "dare": "dare_ties"}


class RecipeError(ConfigError):
    """A recipe that is not valid YAML, or not in evoforge's three-stage shape."""


def _s(value: str) -> str:
    """A YAML scalar for a path or name: bare when safe, JSON-quoted otherwise."""
    if re.fullmatch(r"[A-Za-z0-9_./~-]+", value) and not re.fullmatch(
        r"[-.\d]+|true|false|null|yes|no|on|off", value, re.I
    ):
        return value
    return json.dumps(value)


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else f"{float(x):.1f}"


def _param(values: Sequence[float]) -> str:
    """One value per layer group: a scalar, or a mergekit gradient list over depth."""
    return _num(values[0]) if len(values) == 1 else "[" + ", ".join(_num(v) for v in values) + "]"


def random_seed(text: str) -> int | None:
    """The `--random-seed` a recipe's header asks for (DARE masks depend on it), if any."""
    m = _SEED_LINE.search(text.split("\n---", 1)[0])
    return int(m.group(1)) if m else None


def _model_ref(source: str, space: GenomeSpace) -> str:
    return STAGE_OF_SOURCE.get(source) or space.path_of(source)


def _interp_doc(gene: InterpGene, space: GenomeSpace) -> list[str]:
    rows = list(zip(space.models, space.paths, gene.weights))
    lines = [f"# gene 1, interp = {gene.method}: continuous interpolation of the base models"]
    lines.append(f"name: {INTERP_STAGE}")
    if gene.method == "linear":
        lines += ["merge_method: linear", f"base_model: {_s(space.paths[0])}  # config and tokenizer donor"]
        lines += ["parameters: {normalize: true}"]
    elif space.ancestor:
        lines += [
            "merge_method: multislerp",
            f"base_model: {_s(space.ancestor)}  # ancestor: origin of the sphere",
        ]
    elif len(space.models) == 2:
        lines += ["merge_method: slerp", f"base_model: {_s(space.paths[0])}  # anchor: t = 0"]
        lines += [f"parameters: {{t: {_param(gene.weights[1])}}}"]
        rows = []
        lines += ["models:", f"  - model: {_s(space.paths[0])}", f"  - model: {_s(space.paths[1])}"]
    else:
        lines += [
            "merge_method: multislerp",
            f"base_model: {_s(space.paths[0])}  # anchor: weights 0 = anchor",
        ]
        lines += ["parameters: {normalize_weights: false}"]
        rows = rows[1:]
    if rows:
        lines.append("models:")
        lines += [f"  - model: {_s(p)}  # {n}\n    parameters: {{weight: {_param(w)}}}" for n, p, w in rows]
    return [*lines, f"dtype: {space.dtype}"]


def _crossover_doc(gene: CrossoverGene, space: GenomeSpace) -> list[str]:
    base = space.ancestor or INTERP_STAGE
    what = "the declared ancestor" if space.ancestor else "the interp output"
    lines = [f"# gene 2, crossover = {gene.method}: task vectors of the base models over {what}"]
    lines += [
        f"name: {CROSSOVER_STAGE}",
        f"merge_method: {_CROSSOVER_METHOD[gene.method]}",
        f"base_model: {_s(base)}",
    ]
    lines.append("models:")
    for name, path, w, d in zip(space.models, space.paths, gene.weights, gene.density):
        lines.append(
            f"  - model: {_s(path)}  # {name}\n    parameters: {{weight: {_param(w)}, density: {_param(d)}}}"
        )
    lines.append(f"parameters: {{normalize: true, lambda: {_num(gene.lambda_)}}}")
    return [*lines, f"dtype: {space.dtype}"]


def _runs(path: Sequence[Step]) -> list[tuple[str, int, int]]:
    """Consecutive layers of one source merge into one block slice [start, end)."""
    runs: list[tuple[str, int, int]] = []
    for step in path:
        if runs and runs[-1][0] == step.source and runs[-1][2] == step.layer:
            runs[-1] = (step.source, runs[-1][1], step.layer + 1)
        else:
            runs.append((step.source, step.layer, step.layer + 1))
    return runs


def _structure_doc(gene: StructureGene, space: GenomeSpace) -> list[str]:
    lines = [f"# gene 3, structure = {gene.method}: the output's layer path ({len(gene.path)} layers)"]
    lines += ["merge_method: passthrough", f"base_model: {CROSSOVER_STAGE}", "slices:"]
    if gene.method == "frankenmerge":
        for source, start, end in _runs(gene.path):
            lines.append(
                f"  - sources: [{{model: {_s(_model_ref(source, space))}, layer_range: [{start}, {end}]}}]"
            )
    else:
        product = 1.0
        for step in gene.path:
            product *= step.scale
            s = 1.0 / product
            scale = ", ".join(f"{{filter: {m}, value: {s!r}}}" for m in SCALED_MODULES)
            lines.append(
                f"  - sources: [{{model: {_s(_model_ref(step.source, space))}, layer_range: [{step.layer}, "
                f"{step.layer + 1}], parameters: {{scale: [{scale}, {{value: 1.0}}]}}}}]  # input × {step.scale!r}"
            )
    return [*lines, f"dtype: {space.dtype}"]


def render(genome: Genome, space: GenomeSpace, title: str = "") -> str:
    """The genome as one multi-document mergekit YAML, with comments for the person reading it."""
    space.check(genome)
    header = [
        f"# evoforge candidate {genome.hash}: {genome.label}{f' ({title})' if title else ''}",
        "# A mergekit-multi recipe; edit freely. Re-merge with `evoforge merge THIS.yaml --out DIR` or:",
        f"#   mergekit-multi THIS.yaml --intermediate-dir TMP --out-path OUT --no-lazy --random-seed {genome.crossover.seed}",
    ]
    docs = [
        _interp_doc(genome.interp, space),
        _crossover_doc(genome.crossover, space),
        _structure_doc(genome.structure, space),
    ]
    return "\n".join(header) + "\n" + "\n---\n".join("\n".join(d) for d in docs) + "\n"


# ---------------------------------------------------------------------------------------------- parsing


def _fail(source: str, field: str, problem: str) -> RecipeError:
    return RecipeError(f"{source}: {field}: {problem}")


def _values(value: object, groups: int, source: str, field: str) -> tuple[float, ...]:
    vals = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
        raise _fail(source, field, f"expected a number or a list of numbers, got {value!r}")
    if len(vals) == 1:
        return (float(vals[0]),) * groups
    if len(vals) != groups:
        raise _fail(source, field, f"gradient has {len(vals)} points, the run uses {groups} layer groups")
    return tuple(float(v) for v in vals)


def _model_name(ref: object, space: GenomeSpace, source: str, field: str) -> str:
    """Base model name (or stage source) for a model reference written in a recipe."""
    if isinstance(ref, dict):
        ref = ref.get("model", ref)
    ref = str(ref)
    for stage, name in ((INTERP_STAGE, "interp"), (CROSSOVER_STAGE, "crossover")):
        if ref == stage:
            return name
    for name, path in zip(space.models, space.paths):
        if ref in (path, name) or Path(ref).expanduser().resolve() == Path(path).expanduser().resolve():
            return name
    raise _fail(source, field, f"model {ref!r} is not one of the run's base models {list(space.models)}")


def _per_model(models: list, space: GenomeSpace, keys: Sequence[str], source: str, stage: str) -> dict:
    """name → {key: values per layer group} for a stage's `models:` list."""
    out: dict[str, dict[str, tuple[float, ...]]] = {}
    for i, entry in enumerate(models):
        field = f"{stage}.models[{i}]"
        if not isinstance(entry, dict) or "model" not in entry:
            raise _fail(source, field, "expected {model: ..., parameters: {...}}")
        name = _model_name(entry["model"], space, source, f"{field}.model")
        params = entry.get("parameters") or {}
        missing = [k for k in keys if k not in params]
        if missing:
            raise _fail(source, f"{field}.parameters", f"missing {missing[0]!r}")
        out[name] = {
            k: _values(params[k], space.layer_groups, source, f"{field}.parameters.{k}") for k in keys
        }
    return out


def _interp_gene(doc: dict, space: GenomeSpace, source: str) -> InterpGene:
    method = doc.get("merge_method")
    g = space.layer_groups
    if method == "linear":
        given = _per_model(doc.get("models") or [], space, ["weight"], source, INTERP_STAGE)
        weights = [given.get(n, {"weight": (0.0,) * g})["weight"] for n in space.models]
        if any(sum(w[j] for w in weights) <= 0 for j in range(g)):
            raise _fail(source, f"{INTERP_STAGE}.models", "interpolation weights sum to 0")
        return InterpGene(method="linear", weights=tuple(weights))
    if method == "slerp":
        t = _values((doc.get("parameters") or {}).get("t"), g, source, f"{INTERP_STAGE}.parameters.t")
        return InterpGene(method="slerp", weights=simplex((t, t), anchored=True))
    if method == "multislerp":
        given = _per_model(doc.get("models") or [], space, ["weight"], source, INTERP_STAGE)
        if space.ancestor:
            return InterpGene(
                method="slerp", weights=[given.get(n, {"weight": (0.0,) * g})["weight"] for n in space.models]
            )
        else:
            others = [given.get(n, {"weight": (0.0,) * g})["weight"] for n in space.models[1:]]
            rest = [sum(w[j] for w in others) for j in range(g)]
            if any(r > 1 + 1e-9 for r in rest):
                raise _fail(source, f"{INTERP_STAGE}.models", "weights around the anchor must sum to ≤ 1")
            return InterpGene(method="slerp", weights=simplex([(0.0,) * g, *others], anchored=True))
    raise _fail(source, f"{INTERP_STAGE}.merge_method", f"{method!r} is not linear, slerp or multislerp")


def _crossover_gene(doc: dict, space: GenomeSpace, source: str, seed: int | None) -> CrossoverGene:
    inverse = {v: k for k, v in _CROSSOVER_METHOD.items()}
    method = doc.get("merge_method")
    if method not in inverse:
        raise _fail(source, f"{CROSSOVER_STAGE}.merge_method", f"{method!r} is not ties or dare_ties")
    given = _per_model(doc.get("models") or [], space, ["weight", "density"], source, CROSSOVER_STAGE)
    absent = {"weight": (0.0,) * space.layer_groups, "density": (1.0,) * space.layer_groups}
    rows = [given.get(n, absent) for n in space.models]
    lam = (doc.get("parameters") or {}).get("lambda", 1.0)
    return CrossoverGene(
        method=inverse[method],
        weights=tuple(r["weight"] for r in rows),
        density=tuple(r["density"] for r in rows),
        lambda_=_values(lam, 1, source, f"{CROSSOVER_STAGE}.parameters.lambda")[0],
        seed=seed or 0,
    )


def _structure_gene(doc: dict, space: GenomeSpace, source: str) -> StructureGene:
    if doc.get("merge_method") != "passthrough" or not isinstance(doc.get("slices"), list):
        raise _fail(source, "final stage", "expected merge_method: passthrough with slices")
    steps: list[Step] = []
    scaled = False
    previous = 1.0
    for i, sl in enumerate(doc["slices"]):
        field = f"final.slices[{i}]"
        srcs = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(srcs, list) or len(srcs) != 1 or not isinstance(srcs[0], dict):
            raise _fail(source, field, "expected exactly one source per slice")
        src = srcs[0]
        name = _model_name(src.get("model"), space, source, f"{field}.sources[0].model")
        lr = src.get("layer_range")
        if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) for x in lr)):
            raise _fail(source, f"{field}.sources[0].layer_range", f"expected [start, end], got {lr!r}")
        if not 0 <= lr[0] < lr[1] <= space.num_layers:
            raise _fail(source, f"{field}.sources[0].layer_range", f"{lr} is outside 0..{space.num_layers}")
        scale = (src.get("parameters") or {}).get("scale")
        if scale is None:
            steps += [Step(source=name, layer=layer) for layer in range(lr[0], lr[1])]
            continue
        if lr[1] - lr[0] != 1:
            raise _fail(source, field, "a scaled (dfs) slice must hold exactly one layer")
        values = {e.get("filter"): e.get("value") for e in scale} if isinstance(scale, list) else {}
        s = values.get(SCALED_MODULES[0])
        if not isinstance(s, int | float) or s <= 0 or values.get(SCALED_MODULES[1]) != s:
            raise _fail(
                source,
                f"{field}.sources[0].parameters.scale",
                "expected equal positive o_proj/down_proj scales",
            )
        scaled = True
        steps.append(Step(source=name, layer=lr[0], scale=previous / s))
        previous = s
    method = "dfs" if scaled else "frankenmerge"
    return StructureGene(method=method, path=tuple(steps))


def parse(text: str, space: GenomeSpace, source: str = "<recipe>") -> Genome:
    """The genome an evoforge-shaped recipe describes. Raises RecipeError naming file and field otherwise."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RecipeError(f"{source}: not valid YAML{f' (line {mark.line + 1})' if mark else ''}") from None
    if not all(isinstance(d, dict) for d in docs):
        raise _fail(source, "(document)", "every YAML document must be a mapping")
    by_name = {d.get("name"): d for d in docs}
    if set(by_name) != {INTERP_STAGE, CROSSOVER_STAGE, None} or len(docs) != 3:
        raise _fail(
            source, "(stages)", f"not evoforge's three-stage shape ({INTERP_STAGE}, {CROSSOVER_STAGE}, final)"
        )
    genome = Genome(
        interp=_interp_gene(by_name[INTERP_STAGE], space, source),
        crossover=_crossover_gene(by_name[CROSSOVER_STAGE], space, source, random_seed(text)),
        structure=_structure_gene(by_name[None], space, source),
    )
    try:
        space.check(genome)
    except ValueError as exc:
        raise _fail(source, "(genome)", str(exc)) from None
    return genome
