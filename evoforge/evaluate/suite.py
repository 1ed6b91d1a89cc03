"""The task suite: every lm-eval task YAML under a folder, checked, grouped by domain.

A task is data: a YAML (plus JSONL and an optional `utils.py`) whose `metadata` says which domain(s) it
scores (`domain: math` or `domain: [math, multilingual]`), which metric is its score (`primary_metric`) and
optionally a difficulty `level`. Dropping a YAML into the folder adds a task, and a new domain name simply
becomes a new domain. lm-eval skips a YAML it cannot parse without a word, so every file is parsed here
first and a broken one is reported with its file and line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import TaskIndex
from lm_eval.tasks._yaml_loader import load_yaml

from evoforge.errors import ConfigError, EvoforgeError
from evoforge.resources import tasks_dir as shipped_tasks_dir

_DOMAIN = re.compile(r"^[A-Za-z][\w-]*$")


class _DropCustomDatasetHint(logging.Filter):
    """lm-eval warns "Custom kwargs can be passed to `--metadata`" for every task built with a
    `custom_dataset` loader (api/task.py, download) — all of ours — on every build: advice for its CLI."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetHint())


class TaskError(EvoforgeError):
    """A task YAML, or its data, that lm-eval cannot use."""


@dataclass(frozen=True)
class TaskInfo:
    """One task as its YAML declares it."""

    name: str
    path: Path
    domains: tuple[str, ...]
    primary_metric: str
    """Key of the score in lm-eval's results: `metric,filter`."""
    level: str | None = None


def resolve_tasks_dir(tasks_dir: str | Path | None = None, base_dir: Path | None = None) -> Path:
    """The tasks folder: absolute, or relative to `base_dir` (the run file's folder, else the working
    directory); the default `tasks` falls back to the one shipped with evoforge."""
    if tasks_dir is None:
        return shipped_tasks_dir()
    path = Path(tasks_dir).expanduser()
    if not path.is_absolute():
        path = (base_dir or Path.cwd()) / path
    if path.is_dir():
        return path.resolve()
    if Path(tasks_dir) == Path("tasks"):
        return shipped_tasks_dir()
    raise ConfigError(f"{tasks_dir}: tasks folder not found")


def _yaml_error(path: Path, exc: BaseException) -> str:
    """One line naming the file (an included one if that is where the problem is) and the line."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"{mark.name if mark and mark.name not in (None, '<file>') else path}"
        line = f":{mark.line + 1}" if mark else ""
        return f"{where}{line}: invalid YAML: {exc.problem or exc.context}"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{path}: {text}"


def _metric_names(cfg: dict[str, Any]) -> list[str]:
    names = []
    for entry in cfg.get("metric_list") or []:
        metric = entry.get("metric") if isinstance(entry, dict) else None
        names.append(metric if isinstance(metric, str) else getattr(metric, "__name__", str(metric)))
    return names


def _task_info(path: Path, cfg: dict[str, Any]) -> TaskInfo:
    """The checks lm-eval does not do; raises TaskError naming the file and key."""
    name = cfg["task"]
    if not isinstance(name, str) or not name:
        raise TaskError(f"{path}: task: expected a task name")
    meta = cfg.get("metadata")
    if not isinstance(meta, dict):
        raise TaskError(f"{path}: metadata: missing (needs at least `domain`)")
    domains = meta.get("domain")
    domains = [domains] if isinstance(domains, str) else domains
    if not domains or not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
        raise TaskError(f"{path}: metadata.domain: expected a domain name or a list of them")
    for domain in domains:
        if not _DOMAIN.match(domain):
            raise TaskError(f"{path}: metadata.domain: {domain!r} is not a valid domain name")
    metrics = _metric_names(cfg)
    primary = meta.get("primary_metric") or (metrics[0] if metrics else None)
    if not isinstance(primary, str):
        raise TaskError(f"{path}: metadata.primary_metric: missing (and no metric_list to take it from)")
    filters = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
    metric, _, filt = primary.partition(",")
    if metrics and metric not in metrics:
        raise TaskError(f"{path}: metadata.primary_metric: {metric!r} is not in metric_list {metrics}")
    if not filt:
        if len(filters) > 1:
            raise TaskError(
                f"{path}: metadata.primary_metric: several filters {filters}; write it as `{metric},<filter>`"
            )
        filt = filters[0]
    elif filt not in filters:
        raise TaskError(f"{path}: metadata.primary_metric: filter {filt!r} is not one of {filters}")
    level = meta.get("level")
    return TaskInfo(
        name=name,
        path=path,
        domains=tuple(dict.fromkeys(domains)),
        primary_metric=f"{metric},{filt}",
        level=None if level is None else str(level),
    )


@cache
def _task_manager(root: Path, fingerprint: tuple[tuple[str, int], ...]) -> TaskManager:
    """One TaskManager per folder content per process (indexing lm-eval's 14k built-ins costs 7-9 s, so
    they are left out). The fingerprint (files, mtimes) makes a YAML dropped in later visible."""
    del fingerprint  # part of the cache key only
    return TaskManager(include_path=str(root), include_defaults=False)


@dataclass(frozen=True)
class TaskSuite:
    """The tasks of one folder: valid ones by name, broken files with their one-line error."""

    root: Path
    tasks: dict[str, TaskInfo]
    errors: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def discover(cls, tasks_dir: str | Path | None = None) -> TaskSuite:
        """Parse every YAML lm-eval would index under the folder (imports `!function` modules: tasks/ is
        trusted code, as it is for lm-eval)."""
        root = resolve_tasks_dir(tasks_dir)
        tasks: dict[str, TaskInfo] = {}
        errors: dict[Path, str] = {}
        for path in TaskIndex._iter_yaml_files(root):  # lm-eval's own walk: we check exactly what it indexes
            try:
                cfg = load_yaml(path, resolve_func=True)
            except Exception as exc:  # yaml, include and !function import errors alike
                errors[path] = _yaml_error(path, exc)
                continue
            if "group" in cfg:
                continue  # groups aggregate inside lm-eval; evoforge aggregates by domain itself
            if "task" not in cfg:
                errors[path] = f"{path}: task: missing (neither a task nor a group YAML)"
                continue
            try:
                info = _task_info(path, cfg)
                if info.name in tasks:
                    raise TaskError(
                        f"{path}: task: {info.name!r} is already defined in {tasks[info.name].path}"
                    )
            except TaskError as exc:
                errors[path] = str(exc)
                continue
            tasks[info.name] = info
        return cls(root=root, tasks=tasks, errors=errors)

    @property
    def domains(self) -> dict[str, list[TaskInfo]]:
        """Domain → its tasks; a task tagged with two domains is in both."""
        out: dict[str, list[TaskInfo]] = {}
        for info in self.tasks.values():
            for domain in info.domains:
                out.setdefault(domain, []).append(info)
        return dict(sorted(out.items()))

    def check(self) -> None:
        """Raise on the first broken file: scoring with a task silently missing would change fitness."""
        if self.errors:
            first = next(iter(self.errors.values()))
            more = f" (and {len(self.errors) - 1} more broken task files)" if len(self.errors) > 1 else ""
            raise TaskError(first + more)
        if not self.tasks:
            raise TaskError(f"{self.root}: no task YAML found")

    def select(self, by_domain: Mapping[str, list[str]] | None) -> TaskSuite:
        """Keep only the tasks a run file lists per domain (its lists decide each task's domains)."""
        if by_domain is None:
            return self
        chosen: dict[str, list[str]] = {}
        for domain, names in by_domain.items():
            for name in names:
                if name not in self.tasks:
                    raise ConfigError(
                        f"evaluation.tasks.{domain}: unknown task {name!r} in {self.root} "
                        f"(known: {', '.join(sorted(self.tasks))})"
                    )
                chosen.setdefault(name, []).append(domain)
        tasks = {n: replace(self.tasks[n], domains=tuple(d)) for n, d in chosen.items()}
        return replace(self, tasks=tasks)

    def _manager(self) -> TaskManager:
        files = tuple((p.as_posix(), p.stat().st_mtime_ns) for p in TaskIndex._iter_yaml_files(self.root))
        return _task_manager(self.root, files)

    def _load(self, name: str, split: str | None = None) -> Task:
        spec: str | dict[str, Any] = name
        if split is not None:
            spec = {"group": f"evoforge_{split}", "task": [{"task": name, "test_split": split}]}
        path = self.tasks[name].path
        try:
            return self._manager().load(spec)["tasks"][name]
        except KeyError as exc:
            if split is not None and exc.args == (split,):
                raise TaskError(f"{path}: task {name!r} has no split {split!r} in its data") from None
            raise TaskError(f"{path}: cannot build task {name!r} (KeyError: {exc})") from exc
        except Exception as exc:  # whatever lm-eval, datasets or a task's utils.py raise
            text = str(exc).splitlines()[0] if str(exc) else ""
            raise TaskError(f"{path}: cannot build task {name!r} ({type(exc).__name__}: {text})") from exc

    def build(self, split: str) -> dict[str, Task]:
        """Fresh lm-eval task objects that evaluate `split`.

        lm-eval evaluates a task's `test_split`; each object is built from its YAML with that key
        overridden (an inline group is TaskManager's public way to pass per-task overrides), so objects for
        different splits share nothing and the YAMLs stay as written."""
        self.check()
        return {name: self._load(name, split) for name in self.tasks}

    def item_counts(self) -> dict[str, dict[str, int]]:
        """Task → split → number of documents (after the task's `process_docs`)."""
        counts: dict[str, dict[str, int]] = {}
        for name in self.tasks:
            task = self._load(name)
            process = task.config.process_docs
            counts[name] = {
                split: len(process(docs) if process else docs) for split, docs in task.dataset.items()
            }
        return counts
