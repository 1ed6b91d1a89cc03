"""W&B logging (`WandbTracker`): an offline run holds the history, config and best model, a resumed run
appends to the same W&B run, and mode `disabled` writes nothing."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from track_support import DOMAINS, make_run

from evoforge.evolve.records import GenerationRecord
from evoforge.evolve.run_dir import RUN_ID_FILE
from evoforge.track.wandb_log import WandbTracker


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` file: a W&B header (":W&B", magic, version) and then the LevelDB
    log format — 32 KiB blocks of chunks, each `crc32 (4) | length (2) | type (1)`, type FULL/FIRST/MIDDLE/
    LAST. wandb 0.31 ships no Python reader (its writer is in wandb-core, Go), so the test reads it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if not data:  # created, nothing flushed yet
        return
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        assert kind in (1, 2, 3, 4), f"bad chunk type {kind} at {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def read_offline_runs(run_dir: Path) -> list[dict]:
    """Each offline run folder → its id, config, history rows by step and artifacts.

    `run.finish()` returns before wandb-core (another process) has flushed the file, so wait for the run's
    `exit` record, its last."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        (wandb_file,) = folder.glob("run-*.wandb")
        deadline = time.monotonic() + 15
        while (
            not (records := list(wandb_records(wandb_file)))
            or records[-1].WhichOneof("record_type") != "exit"
        ):
            assert time.monotonic() < deadline, f"{wandb_file} never got its exit record"
            time.sleep(0.05)
        run: dict = {"config": {}, "history": {}, "artifacts": []}
        for rec in records:
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run["id"], run["project"], run["name"] = rec.run.run_id, rec.run.project, rec.run.display_name
                for item in rec.run.config.update:
                    run["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                run["history"][row["_step"]] = row
            elif kind == "artifact":
                run["artifacts"].append(rec.artifact)
        out.append(run)
    return out


def test_wandb_offline_run_holds_history_config_and_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    make_run(run_dir)
    gens = [
        GenerationRecord.model_validate_json(x)
        for x in (run_dir / "generations.jsonl").read_text().splitlines()
    ]
    config = {"population_size": 8, "mutation_rate": 0.15, "evaluation_weights": {"code": 0.25, "math": 0.75}}
    tracker = WandbTracker(run_dir, "evoforge-test", "offline", config, run_name="synthetic")
    for g in gens[:2]:
        tracker.log_generation(g)
    tracker.log_best_model(
        1, run_dir / "gen_1_best_model", {"fitness": gens[1].best_fitness, "id": gens[1].best_id}
    )
    tracker.finish()
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert run_id == tracker.run_id

    # A resumed run (a new tracker on the same folder) appends generation 2 to the same W&B run.
    with WandbTracker(run_dir, "evoforge-test", "offline", config, run_name="synthetic") as resumed:
        resumed.log_generation(gens[2])
    assert resumed.local_dir is not None and resumed.local_dir.parent == run_dir / "wandb"
    assert (resumed.local_dir / f"run-{run_id}.wandb").is_file()
    first, second = read_offline_runs(run_dir)
    assert first["id"] == second["id"] == run_id
    assert first["project"] == "evoforge-test" and first["name"] == "synthetic"
    assert first["config"]["mutation_rate"] == 0.15
    assert first["config"]["evaluation_weights"] == {"code": 0.25, "math": 0.75}

    history = first["history"] | second["history"]
    assert sorted(history) == [0, 1, 2]
    for g in gens:
        row = history[g.generation]
        assert row["generation"] == g.generation
        assert row["best_fitness"] == pytest.approx(g.best_fitness)
        assert row["avg_fitness"] == pytest.approx(g.avg_fitness)
        assert row["population_size"] == 8
        if g.best_heldout is None:
            assert "best_heldout_fitness" not in row
        else:
            assert row["best_heldout_fitness"] == pytest.approx(g.best_heldout.fitness)
        for d in DOMAINS:
            assert row[f"{d}_avg"] == pytest.approx(g.domain_avg[d])
            assert row[f"{d}_best"] == pytest.approx(g.domain_best[d])

    (artifact,) = first["artifacts"]
    assert (artifact.name, artifact.type) == ("model_gen_1", "model")
    assert json.loads(artifact.metadata) == {"fitness": gens[1].best_fitness, "id": gens[1].best_id}
    files = {c.path: c for c in artifact.manifest.contents}
    assert set(files) == {"README.md", "config.json"}
    # referenced in place, not copied to a staging area
    assert Path(files["README.md"].local_path) == run_dir / "gen_1_best_model" / "README.md"


def test_wandb_disabled_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = WandbTracker(run_dir, "p", "disabled", {"a": 1}, run_name="x")
    tracker.log_generation(
        GenerationRecord(
            generation=0,
            best_id="a",
            best_hash="h",
            best_fitness=0.1,
            avg_fitness=0.1,
            population_size=8,
            domain_avg={},
            domain_best={},
        )
    )
    tracker.log_best_model(0, run_dir, {})
    tracker.finish()
    assert tracker.run_id is None and tracker.local_dir is None
    assert list(run_dir.iterdir()) == []
