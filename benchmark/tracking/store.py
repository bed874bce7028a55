"""The MLflow store as the harness uses it, without torch or Lightning: the experiment, the search
for a cell that already FINISHED, and the rule that ends FAILED a run whose process is gone.

Every run of a cell carries a heartbeat (host, pid, the process's start time, and the time of
its last sign of life). A RUNNING run whose process no longer exists on this host, or whose
heartbeat is older than `STALE_AFTER_S` on another host, is ended FAILED ("killed") by whoever
looks next: a relaunch deciding what to skip, a launcher, or the report. All of them call
`end_stale_runs`, so they agree.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import mlflow
import psutil
from filelock import FileLock
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from benchmark.tracking import server
from benchmark.tracking.identity import (
    CELL_KEY_TAG,
    HARNESS_TAG,
    KIND_TAG,
    RUN_FILE,
    SCHEMA_TAG,
    SCHEMA_VERSION,
    read_outcome,
    redact,
)

HOST_TAG, PID_TAG, PID_STARTED_TAG = "heartbeat.host", "heartbeat.pid", "heartbeat.pid_started"
BEAT_TAG = "heartbeat.last"
HEARTBEAT_S = 30.0  # how often a running cell says it is alive
STALE_AFTER_S = 600.0  # silence after which a run on another host counts as dead
# The MLflow UI opens an experiment of this kind on its runs (not on the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class StoreError(RuntimeError):
    """The tracking store cannot be used as given: the message names it and the fix."""


def check_sqlite(uri: str, write: bool = True) -> None:
    """A SQLite store must be MLflow's (or a new file), and writable when cells write to it;
    nothing is created or migrated in someone else's database."""
    if not uri.startswith("sqlite:///"):
        return
    file = Path(uri.removeprefix("sqlite:///"))
    if not file.exists():
        if not write:
            raise StoreError(
                f"no tracking store at {file}: check the path (--tracking-uri, "
                "MLFLOW_TRACKING_URI), or run a cell first."
            )
        folder = next((p for p in file.parents if p.exists()), Path("/"))
        if not os.access(folder, os.W_OK):
            raise StoreError(f"cannot create the tracking store {file}: {folder} is read-only.")
        return
    try:
        with closing(sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
    except sqlite3.DatabaseError as error:
        raise StoreError(
            f"{file} is not a SQLite database ({error}): point the store elsewhere."
        ) from None
    if tables and not {"experiments", "runs", "alembic_version"} <= tables:
        shown = ", ".join(sorted(tables)[:5])
        raise StoreError(
            f"{file} is another application's SQLite database (tables {shown}...), not an MLflow "
            "store: nothing was written to it; set tracking.uri to a new file."
        )
    if write and not (os.access(file, os.W_OK) and os.access(file.parent, os.W_OK)):
        raise StoreError(
            f"the tracking store {file} is read-only (file or folder): make it writable, or set "
            "tracking.uri to a store you can write."
        )


def experiment_id(uri: str, name: str) -> str:
    """Create the experiment once, with artifacts beside a local SQLite store (not in ./mlruns).

    Processes that open a fresh SQLite store at the same moment race through MLflow's schema
    migrations ("table ... already exists", alembic version errors) and to create the experiment:
    a file lock beside the store lets one of them create both while the others wait.
    """
    server.check_reachable(uri)  # a server that is down: one line at once, not minutes
    check_sqlite(uri)  # someone else's database, or a read-only file: one line, nothing written
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):  # a server or database serialises this itself
        return _get_or_create_experiment(name, None)
    store = Path(uri.removeprefix("sqlite:///"))
    store.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{store}.lock", timeout=600):
        return _get_or_create_experiment(name, (store.parent / "mlartifacts").as_uri())


def artifact_file(uri: str, run_id: str, artifact_uri: str, path: str) -> Path | None:
    """A run's artifact as a local file, or None if it has none by that name. Through MLflow;
    for a local SQLite store that was moved with its `mlartifacts/` (a clone of results/
    elsewhere: MLflow records absolute artifact paths), read beside the store instead."""
    try:
        return Path(mlflow.MlflowClient(uri).download_artifacts(run_id, path))
    except (OSError, MlflowException):
        pass
    if uri.startswith("sqlite:///") and "/mlartifacts/" in artifact_uri:
        beside = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        moved = beside / artifact_uri.split("/mlartifacts/", 1)[1] / path
        if moved.is_file():
            return moved
    return None


def _get_or_create_experiment(name: str, artifacts: str | None) -> str:
    if (experiment := mlflow.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except MlflowException as error:  # another process created it since we looked
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        created = mlflow.get_experiment_by_name(name)
        if created is None:  # created, then deleted under us: say so rather than guess
            raise
        return created.experiment_id


def finished_run(uri: str, experiment: str, key: str) -> Run | None:
    """The latest FINISHED run of the cell with this key, if any (stale runs ended first)."""
    exp_id = experiment_id(uri, experiment)
    end_stale_runs(mlflow.MlflowClient(uri), [exp_id])
    settle_abandoned_runs(exp_id, key)  # runs a failed cell could not end (server down)
    runs = mlflow.search_runs(
        [exp_id],
        f"tags.{CELL_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0] if runs else None


# ---------------------------------------------------------------- heartbeat


def heartbeat_tags() -> dict[str, str]:
    """Who runs this cell: set when its run starts."""
    process = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(process.pid),
        PID_STARTED_TAG: f"{process.create_time():.3f}",
        BEAT_TAG: f"{time.time():.0f}",
    }


def beat(client: mlflow.MlflowClient, run_id: str) -> None:
    client.set_tag(run_id, BEAT_TAG, f"{time.time():.0f}")


def gone_reason(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the process behind a RUNNING run is gone, or None while it may still be alive."""
    if PID_TAG not in tags:
        return None  # not one of ours, or from before heartbeats: left alone
    now = time.time() if now is None else now
    if tags.get(HOST_TAG) == socket.gethostname():
        pid, started = int(tags[PID_TAG]), float(tags.get(PID_STARTED_TAG, 0))
        try:
            alive = abs(psutil.Process(pid).create_time() - started) < 1.0  # not a reused pid
        except psutil.Error:
            alive = False
        return None if alive else f"{GONE_PREFIX}its process {pid} on this host is gone"
    silent = now - float(tags.get(BEAT_TAG, 0))
    if silent > STALE_AFTER_S:
        return f"{GONE_PREFIX}no heartbeat from {tags.get(HOST_TAG)} for {silent:.0f}s"
    return None


# How gone_reason's guesses begin: an onlooker's inference that a launcher which saw the
# process end (its signal, its exit code) replaces with what it saw.
GONE_PREFIX = "killed: "


def end_stale_runs(client: mlflow.MlflowClient, experiment_ids: list[str]) -> list[str]:
    """End FAILED every RUNNING run of the harness whose process is gone; their ids."""
    running = client.search_runs(
        experiment_ids,
        f"attributes.status = 'RUNNING' and tags.`{HARNESS_TAG}` = 'benchmark'",
        max_results=10_000,
    )
    ended = []
    for run in running:
        if (reason := gone_reason(run.data.tags)) is not None:
            reason = _said_error(run.data.tags) or reason
            client.set_tag(run.info.run_id, "error", redact(reason))
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            ended.append(run.info.run_id)
    return ended


def _said_error(tags: dict[str, str]) -> str | None:
    """The error a cell wrote in its outcome file before it exited without ending its run (the
    store was down), if its folder is readable here."""
    said = _outcome(Path(tags.get("hydra_output_dir", "")))
    return str(said["error"]) if said.get("status") == "failed" and "error" in said else None


def _outcome(folder: Path) -> dict[str, object]:
    """What the cell in `folder` said in its outcome file ({} if it said nothing, or if the file
    is damaged: unknown, and the stale-run rule decides)."""
    return read_outcome(folder) or {}


def settle_failed_run(run_file: Path, reason: str) -> str | None:
    """The run that a failed cell started (named in its `run_file`, identity.RUN_FILE) ends
    FAILED, with `reason` as its `error` tag unless it has one: a cell that failed because the
    server went away could neither end its run nor tag it. A tag that is only the stale-run
    rule's guess (GONE_PREFIX: another cell's relaunch check may get there before the launcher
    reads the exit status) gives way to `reason`. A FINISHED run (the server recorded the end
    before the answer was lost) is left alone. The run's id if changed, else None."""
    if not run_file.is_file():
        return None
    started = json.loads(run_file.read_text())
    client, run_id = mlflow.MlflowClient(started["tracking_uri"]), started["run_id"]
    run = client.get_run(run_id)
    running = run.info.status == RunStatus.to_string(RunStatus.RUNNING)
    failed = run.info.status == RunStatus.to_string(RunStatus.FAILED)
    guessed = run.data.tags.get("error", GONE_PREFIX).startswith(GONE_PREFIX)  # or untagged
    if not (running or (failed and guessed)):
        return None
    if guessed:
        client.set_tag(run_id, "error", redact(reason)[:5000])
    if running:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    return run_id


def settle_abandoned_runs(experiment_id: str, key: str) -> list[str]:
    """Runs of the cell `key` that a cell process left RUNNING when it failed (the server was
    down until after the sweep ended, so neither the cell nor its launcher could end them) are
    ended FAILED with the error the cell wrote in its folder. Only a run whose folder
    (`hydra_output_dir` tag) holds the cell's failed outcome and the run file naming that run
    is touched: a run still going somewhere else is not. The ids of the runs ended."""
    running = mlflow.search_runs(
        [experiment_id],
        f"tags.cell_key = '{key}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    ended = []
    for run in running:
        folder = Path(run.data.tags.get("hydra_output_dir", ""))
        said, run_file = _outcome(folder), folder / RUN_FILE
        if not (said and run_file.is_file()):
            continue
        if json.loads(run_file.read_text()).get("run_id") != run.info.run_id:
            continue
        if said.get("status") == "failed" and settle_failed_run(
            run_file, str(said.get("error") or "failed")
        ):
            ended.append(run.info.run_id)
    return ended


# ---------------------------------------------------------------- a sweep's parent run


def start_sweep_run(uri: str, experiment: str, sweep_dir: str) -> str:
    """The parent run of a sweep; its cells nest under it (tag mlflow.parentRunId)."""
    client = mlflow.MlflowClient(uri)
    run = client.create_run(
        experiment_id(uri, experiment),
        run_name=f"sweep {Path(sweep_dir).parent.name}/{Path(sweep_dir).name}",
        tags={
            HARNESS_TAG: "benchmark",
            SCHEMA_TAG: SCHEMA_VERSION,
            KIND_TAG: "sweep",
            "sweep": sweep_dir,
            **heartbeat_tags(),
        },
    )
    return run.info.run_id


def end_sweep_run(uri: str, run_id: str, outcomes: dict[str, int]) -> None:
    """FINISHED, or FAILED when a cell failed; the counts of each outcome as metrics."""
    client = mlflow.MlflowClient(uri)
    for state, count in outcomes.items():
        client.log_metric(run_id, f"cells_{state}", count)
    status = RunStatus.FAILED if outcomes.get("failed") else RunStatus.FINISHED
    client.set_terminated(run_id, RunStatus.to_string(status))
