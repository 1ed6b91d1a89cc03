"""W&B logging for a run: offline unless the user asks for online, so a run never waits on a login.

An offline run lands in `run_dir/wandb/offline-run-<time>-<id>/`; `wandb sync run_dir/wandb/offline-run-*`
uploads it later. The run id is kept in `run_dir/wandb_run_id`, so a resumed run (a new offline folder with
the same id) appends to the same W&B run.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from evoforge.errors import EvoforgeError
from evoforge.evolve.records import GenerationRecord
from evoforge.evolve.run_dir import RunDir

Mode = Literal["offline", "online", "disabled"]


class TrackingError(EvoforgeError):
    """W&B could not start (online mode without a login, an unreachable server)."""


def generation_metrics(rec: GenerationRecord) -> dict[str, float | int]:
    """The numbers logged for one generation; keys follow the seed document (`code_avg`, `math_best`)."""
    metrics: dict[str, float | int] = {
        "generation": rec.generation,
        "best_fitness": rec.best_fitness,
        "avg_fitness": rec.avg_fitness,
        "population_size": rec.population_size,
        "generation_wall_s": rec.wall_s,
    }
    metrics.update({f"{domain}_avg": value for domain, value in rec.domain_avg.items()})
    metrics.update({f"{domain}_best": value for domain, value in rec.domain_best.items()})
    if rec.best_heldout is not None:
        metrics["best_heldout_fitness"] = rec.best_heldout.fitness
        metrics.update({f"best_heldout_{d}": v for d, v in rec.best_heldout.domains.items()})
    return metrics


class WandbTracker:
    """One W&B run per evoforge run. `disabled` imports nothing and writes nothing."""

    def __init__(
        self,
        run_dir: Path,
        project: str,
        mode: Mode,
        config: dict[str, Any],
        run_name: str,
        resume_id: str | None = None,
    ) -> None:
        self.mode = mode
        self.run_id: str | None = None
        self.local_dir: Path | None = None
        """This session's W&B folder (`wandb sync <it>` uploads an offline run); None when disabled."""
        self._run = None
        if mode == "disabled":
            return
        # Quiet by default, read when wandb sets up; `WANDB_SILENT=false` (the seed's debugging advice) wins.
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb  # here, not at the top: a disabled run never pays for the import

        id_file = RunDir(run_dir).wandb_run_id
        stored = id_file.read_text(encoding="utf-8").strip() if id_file.exists() else None
        self.run_id = resume_id or stored or secrets.token_hex(4)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n", encoding="utf-8")
        # Everything a merge run does not need is off: console capture, git and code probes, system
        # metrics, machine info, a pip freeze. The run is then history + config + artifacts.
        settings = wandb.Settings(
            mode=mode,
            console="off",
            disable_git=True,
            disable_code=True,
            save_code=False,
            x_disable_stats=True,
            x_disable_meta=True,
            x_disable_machine_info=True,
            x_save_requirements=False,
        )
        try:
            self._run = wandb.init(
                project=project,
                name=run_name,
                id=self.run_id,
                resume="allow",
                dir=run_dir,
                config=config,
                settings=settings,
                reinit="create_new",
            )
        except wandb.errors.Error as exc:
            raise TrackingError(
                f"W&B {mode} run could not start: {str(exc).splitlines()[0]} "
                "(run `wandb login`, or set wandb_mode: offline)"
            ) from None
        self.local_dir = Path(self._run.settings.sync_dir)
        # The run's summary keeps the best generation, not the last one.
        self._run.define_metric("best_fitness", summary="max")

    def log_generation(self, rec: GenerationRecord) -> None:
        """Log one finished generation at step = its number, so a resumed run continues the same axis."""
        if self._run is not None:
            self._run.log(generation_metrics(rec), step=rec.generation)

    def log_best_model(self, generation: int | None, path: Path, metadata: dict[str, Any]) -> None:
        """Log a best-model folder as artifact `model_gen_<N>` (type `model`), the confirmed best's
        (`evolve.confirm`, generation None) as `model_confirmed`.

        The files are referenced in place (policy `immutable`), not copied to a staging area: the folder is
        written once and a 3 GB copy per generation would double the run's disk use. An offline run
        therefore needs the folder to still exist when it is synced.
        """
        if self._run is None:
            return
        import wandb

        name = "model_confirmed" if generation is None else f"model_gen_{generation}"
        artifact = wandb.Artifact(name, type="model", metadata=metadata)
        artifact.add_dir(str(path), policy="immutable")
        self._run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close the run (idempotent)."""
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None

    def __enter__(self) -> WandbTracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
