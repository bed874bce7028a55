"""The MLflow store as the harness uses it, without torch or Lightning: the experiment, the search
for a cell that already FINISHED, and the rule that ends FAILED a run whose process is gone.

Every run of a cell carries a heartbeat (host, pid, the process's start time, and the time of
its last sign of life). A RUNNING run whose process no longer exists on this host, or whose
heartbeat is older than `STALE_AFTER_S` on another host, is ended FAILED ("killed") by whoever
looks next: a relaunch deciding what to skip, a launcher, or the report. All of them call
`end_stale_runs`, so they agree. A heartbeat further in the future than CLOCK_SKEW_S (a host
whose clock is wrong) is no sign of life: such a run is stale too. A sweep's parent run beats as
long as its sweep runs (`start_sweep_run`).

A SQLite store locked by another process (a sweep writing, a `sqlite3` shell, a backup) is
waited on for up to `server.SQLITE_BUSY_S` by every statement, in place of MLflow's 20 s.

The folder where the experiment's runs keep their artifacts (`mlartifacts/` beside a SQLite
store), when it is local, must take a new file before anything runs (`check_artifacts`): a
read-only one, or a full disk, is one StoreError naming the folder and the fix, not an OSError
traceback from the cell's first artifact, after its run has opened.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

import mlflow
import psutil
from filelock import FileLock
from mlflow.entities import Experiment, LifecycleStage, Run, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from sqlalchemy import event
from sqlalchemy.engine import Engine

from benchmark.runtime.files import FULL, READ_ONLY
from benchmark.tracking import server
from benchmark.tracking.identity import (
    CELL_KEY_TAG,
    HARNESS_TAG,
    KIND_TAG,
    OUTPUT_DIR_TAG,
    RUN_FILE,
    SCHEMA_TAG,
    SCHEMA_VERSION,
    read_outcome,
    redact,
)
from benchmark.tracking.result import Status
from benchmark.tracking.server import StoreError as StoreError

HOST_TAG, PID_TAG, PID_STARTED_TAG = "heartbeat.host", "heartbeat.pid", "heartbeat.pid_started"
BEAT_TAG = "heartbeat.last"
HEARTBEAT_S = 30.0  # how often a running cell says it is alive
STALE_AFTER_S = 600.0  # silence after which a run on another host counts as dead
CLOCK_SKEW_S = 300.0  # how far in the future a heartbeat may be (another host's clock) and count
# The MLflow UI opens an experiment of this kind on its runs (not on the GenAI overview).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
ERROR_TAG_CHARS = 5000  # a run's `error` tag: one line, at most this long


# ---------------------------------------------------------------- a SQLite store another holds

# MLflow's SQL store sets SQLite's busy timeout to 20 s at the start of every session: a store
# locked longer by another process (a `sqlite3` shell's open transaction, a backup, a sweep's
# burst of writes) failed the cell, with a traceback for every statement that gave up.
_MLFLOW_BUSY = re.compile(r"\s*PRAGMA\s+busy_timeout\s*=\s*\d+\s*;?\s*", re.IGNORECASE)


def _busy_ms() -> int:
    return int(server.SQLITE_BUSY_S * 1000)


@event.listens_for(Engine, "connect")
def _sqlite_waits(connection: Any, record: Any) -> None:
    """Every SQLite connection that SQLAlchemy opens (MLflow's store) waits SQLITE_BUSY_S for a
    lock another process holds."""
    if isinstance(connection, sqlite3.Connection):
        connection.execute(f"PRAGMA busy_timeout = {_busy_ms()}")


@event.listens_for(Engine, "before_cursor_execute", retval=True)
def _longer_than_mlflows(
    conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    """MLflow's own `PRAGMA busy_timeout = 20000` at each session, made SQLITE_BUSY_S."""
    if _MLFLOW_BUSY.fullmatch(statement):
        statement = f"PRAGMA busy_timeout = {_busy_ms()};"
    return statement, parameters


class _LockedSaidOnce(logging.Filter):
    """MLflow logs the traceback of every statement that gave up on a locked SQLite store; the
    harness says it in one line instead (server.store_locked), where the error surfaces."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


logging.getLogger("mlflow.store.db.utils").addFilter(_LockedSaidOnce())


def check_sqlite(uri: str, write: bool = True) -> None:
    """A SQLite store must be MLflow's (or a new file), and writable when cells write to it;
    nothing is created or migrated in someone else's database. One locked by another process
    is waited on for up to SQLITE_BUSY_S, then said as such."""
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
        with closing(
            sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True, timeout=server.SQLITE_BUSY_S)
        ) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master")}
    except sqlite3.DatabaseError as error:
        if "locked" in str(error):  # busy for SQLITE_BUSY_S: another process holds it
            raise StoreError(
                f"the tracking store {file} is locked by another process (still locked after "
                f"{server.SQLITE_BUSY_S:g} s): wait for that process to finish (a sweep "
                "writing to it, a sqlite3 shell or an `mlflow` command holding a transaction, "
                "a copy or a backup), then relaunch the same command."
            ) from None
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

    A misspelt URI or a missing database driver, a server that is down or answers errors, a
    store locked by another process for longer than SQLITE_BUSY_S, an experiment of that name
    in MLflow's trash, a local artifact folder that refuses a new file (check_artifacts):
    StoreError or TrackingUnreachable, in one line naming the fix.
    """
    server.check_reachable(uri)  # a server that is down: one line at once, not minutes
    check_sqlite(uri)  # someone else's database, or a read-only file: one line, nothing written
    mlflow.set_tracking_uri(uri)
    with said_if_locked(uri):
        if not uri.startswith("sqlite:///"):  # a server or database serialises this itself
            experiment = _get_or_create_experiment(uri, name, None)
        else:
            store = Path(uri.removeprefix("sqlite:///"))
            store.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(f"{store}.lock", timeout=600):
                beside = (store.parent / "mlartifacts").as_uri()
                experiment = _get_or_create_experiment(uri, name, beside)
    check_artifacts(uri, experiment)
    return str(experiment.experiment_id)


def artifact_folder(location: str) -> Path | None:
    """The local folder of an artifact location (`file:///...` or a path), or None for one this
    process does not write itself (a server's `mlflow-artifacts:`, a bucket)."""
    parts = urlsplit(location)
    if parts.scheme == "file":
        return Path(url2pathname(parts.path))
    if not parts.scheme or len(parts.scheme) == 1:  # a path (C: on Windows)
        return Path(location)
    return None


# A file stands where the artifact folder (or one above it) should be.
NOT_A_FOLDER = {
    errno.EEXIST: "a file stands there, not a folder",
    errno.ENOTDIR: "a file stands in its path, where a folder should be",
}


def check_artifacts(uri: str, experiment: Experiment) -> None:
    """The folder where `experiment`'s runs keep their artifacts, when it is local: created if
    missing, and a small file written in it and removed, before any run opens or cell trains.
    MLflow would otherwise fail the cell's first artifact, its run already open, with an OSError
    traceback. One refused for want of permission (a read-only folder or file system), of space,
    or because a file is in the way: one StoreError (`artifacts_refused`); any other OSError
    is raised as it is (a broken disk: its traceback is wanted)."""
    folder = artifact_folder(experiment.artifact_location or "")
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".benchmark-write-check.")
        try:
            os.write(fd, b"checked")
        finally:
            os.close(fd)
            with suppress(OSError):
                os.unlink(probe)
    except OSError as error:
        if (said := artifacts_refused(error, folder, uri, experiment.name)) is None:
            raise
        raise said from None


def artifacts_refused(error: OSError, folder: Path, uri: str, name: str) -> StoreError | None:
    """The one line for a write in the artifact `folder` that the file system refused (by its
    errno: no permission or a read-only file system, no space, a file in the way), with the
    fix; None for any other error."""
    beside = (
        uri.startswith("sqlite:///")
        and folder.resolve()
        == (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve()
    )
    if beside:  # where every experiment of a SQLite store keeps them
        elsewhere = (
            "set tracking.uri to a store in a folder you can write (a SQLite store keeps its "
            "runs' artifacts in mlartifacts/ beside it)"
        )
    else:
        elsewhere = (
            f"set tracking.experiment to a new experiment (the experiment '{name}' keeps its "
            "runs' artifacts there) or tracking.uri to another store"
        )
    said = f"cannot write the runs' artifacts in {folder}: "
    if error.errno in READ_ONLY:
        return StoreError(
            f"{said}{READ_ONLY[error.errno]}; make {folder} writable, or {elsewhere}."
        )
    if error.errno in FULL:
        return StoreError(
            f"{said}{FULL[error.errno]}; free some space on the disk of {folder}, or {elsewhere}."
        )
    if error.errno in NOT_A_FOLDER:
        where = error.filename or folder
        return StoreError(
            f"{said}{NOT_A_FOLDER[error.errno]} ({where}); move that file away, or {elsewhere}."
        )
    return None


@contextmanager
def said_if_locked(uri: str) -> Iterator[None]:
    """An error of MLflow's because a SQLite store stayed locked by another process longer than
    SQLITE_BUSY_S becomes server.store_locked's one line (the cause kept)."""
    try:
        yield
    except MlflowException as error:
        if (locked := server.store_locked(error, uri)) is not None:
            raise locked from error
        raise


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


def _get_or_create_experiment(uri: str, name: str, artifacts: str | None) -> Experiment:
    if (experiment := mlflow.get_experiment_by_name(name)) is not None:
        if experiment.lifecycle_stage == LifecycleStage.DELETED:
            raise StoreError(deleted_experiment(uri, name, experiment.experiment_id))
        return experiment
    try:
        exp_id = mlflow.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
    except MlflowException as error:  # another process created it since we looked
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        created = mlflow.get_experiment_by_name(name)
        if created is None:  # created, then deleted under us: say so rather than guess
            raise
        return created
    return mlflow.get_experiment(exp_id)


def deleted_experiment(uri: str, name: str, exp_id: str) -> str:
    """What to do with an experiment in MLflow's trash (deleted in the UI, not yet purged by
    `mlflow gc`): no run can be added to it or changed in it, and its name is taken."""
    return (
        f"the experiment '{name}' (id {exp_id}) in {redact(uri)} is deleted (in MLflow's "
        "trash): restore it with `MLFLOW_TRACKING_URI="
        f"{redact(uri)} mlflow experiments restore --experiment-id {exp_id}`, or set "
        "tracking.experiment to another name."
    )


def finished_run(uri: str, experiment: str, key: str) -> Run | None:
    """The latest FINISHED run of the cell with this key, if any (stale runs ended first)."""
    exp_id = experiment_id(uri, experiment)
    with said_if_locked(uri):
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


# Statuses of a run that was cut off: a relaunch may resume its cell from what it kept.
CUT_OFF = (RunStatus.to_string(RunStatus.FAILED), RunStatus.to_string(RunStatus.KILLED))


def interrupted_runs(uri: str, experiment: str, key: str) -> list[Run]:
    """The runs of the cell with this key that ended FAILED or KILLED since its latest FINISHED
    run (all of them when none FINISHED), newest first; stale runs ended first. A run still
    RUNNING (this launch's own, or one going on elsewhere) is passed over."""
    exp_id = experiment_id(uri, experiment)
    with said_if_locked(uri):
        end_stale_runs(mlflow.MlflowClient(uri), [exp_id])
        settle_abandoned_runs(exp_id, key)
        runs = mlflow.search_runs(
            [exp_id],
            f"tags.{CELL_KEY_TAG} = '{key}'",
            order_by=["attributes.start_time DESC"],
            output_format="list",
        )
    cut: list[Run] = []
    for run in runs:
        if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
            break
        if run.info.status in CUT_OFF:
            cut.append(run)
    return cut


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


def keep_beating(uri: str, run_id: str) -> Callable[[], None]:
    """A daemon thread that tags the run as alive every HEARTBEAT_S; returns its stop. It dies
    with the process, whose run then goes stale."""
    stop = threading.Event()
    client = mlflow.MlflowClient(uri)

    def beating() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                beat(client, run_id)
            except Exception:  # an unreachable store must not kill the run: the next try
                continue

    threading.Thread(target=beating, daemon=True, name="benchmark-heartbeat").start()
    return stop.set


def gone_reason(tags: dict[str, str], now: float | None = None) -> str | None:
    """Why the process behind a RUNNING run is gone, or None while it may still be alive. On
    another host: its heartbeat is older than STALE_AFTER_S, or further ahead of this host's
    clock than CLOCK_SKEW_S (a wrong clock: no sign of life, or a dead run would never go
    stale)."""
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
    try:
        silent = now - float(tags.get(BEAT_TAG, 0))
    except ValueError:  # not a time: no sign of life
        silent = now
    if silent > STALE_AFTER_S:
        return f"{GONE_PREFIX}no heartbeat from {tags.get(HOST_TAG)} for {silent:.0f}s"
    if -silent > CLOCK_SKEW_S:
        return (
            f"{GONE_PREFIX}the heartbeat from {tags.get(HOST_TAG)} is {-silent:.0f}s in the "
            "future (a clock set wrong there): not a sign of life"
        )
    return None


def error_tag(text: str) -> str:
    """A run's `error` tag: one line, its secrets masked. An error whose message holds a
    traceback (a DataLoader worker's: "Caught FileNotFoundError in DataLoader worker process
    0. Original Traceback ...") is its last line, the original error, which names the file;
    any other message has its lines joined. The whole traceback belongs in the run's
    `error.txt` and the cell's log."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if "Traceback (most recent call last):" in text and len(lines) > 1:
        head = lines[0].split(":", 1)[0]  # the type the error was raised as
        last = lines[-1]
        where = re.search(r"in (DataLoader worker process \d+)", text)
        text = last + (f" (in {where.group(1)})" if where else "")
        if not last.startswith(head) and re.fullmatch(r"\w+", head):
            text = f"{head}: {text}"
    else:
        text = " ".join(lines)
    return redact(text)[:ERROR_TAG_CHARS]


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
            client.set_tag(run.info.run_id, "error", error_tag(reason))
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            ended.append(run.info.run_id)
    return ended


def _said_error(tags: dict[str, str]) -> str | None:
    """The error a cell wrote in its outcome file before it exited without ending its run (the
    store was down), if its folder is readable here."""
    said = _outcome(Path(tags.get(OUTPUT_DIR_TAG, "")))
    return str(said["error"]) if said.get("status") == Status.failed and "error" in said else None


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
        client.set_tag(run_id, "error", error_tag(reason))
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
        folder = Path(run.data.tags.get(OUTPUT_DIR_TAG, ""))
        said, run_file = _outcome(folder), folder / RUN_FILE
        if not (said and run_file.is_file()):
            continue
        if json.loads(run_file.read_text()).get("run_id") != run.info.run_id:
            continue
        if said.get("status") == Status.failed and settle_failed_run(
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
    _sweep_beats[run.info.run_id] = keep_beating(uri, run.info.run_id)
    return run.info.run_id


# The heartbeats of the sweeps' parent runs that this process started, by run id: a sweep runs
# for hours, and a report on another host would otherwise end its silent parent FAILED.
_sweep_beats: dict[str, Callable[[], None]] = {}


def end_sweep_run(
    uri: str, run_id: str, outcomes: dict[str, int], status: str | None = None
) -> None:
    """FINISHED, or FAILED when a cell failed, or `status` (KILLED: the sweep was stopped by a
    signal); the counts of each outcome as metrics. Its heartbeat stops."""
    if (stop := _sweep_beats.pop(run_id, None)) is not None:
        stop()
    client = mlflow.MlflowClient(uri)
    for state, count in outcomes.items():
        client.log_metric(run_id, f"cells_{state}", count)
    if status is None:
        status = RunStatus.to_string(
            RunStatus.FAILED if outcomes.get(Status.failed) else RunStatus.FINISHED
        )
    client.set_terminated(run_id, status)
