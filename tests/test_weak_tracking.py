"""Issue 37, the tracking store's weak cases: each ends in one line naming the problem and the fix
(no traceback, no minutes of retries), with the run's state right and nothing lost. A misspelt
URI or a missing database driver; a server whose API fails, answers HTML or never answers; a
SQLite store locked by another process, briefly (waited on) or for long (one line); an
experiment in MLflow's trash; a heartbeat from the future, and a sweep's parent run that must
keep beating; a run deleted while its cell runs, and an error whose message is a traceback."""

from __future__ import annotations

import http.server
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import LifecycleStage

from benchmark.cell.mlflow_run import cell_run
from benchmark.tracking import server, store
from benchmark.tracking.identity import HARNESS_TAG
from benchmark.tracking.resume import cell_manifest
from benchmark.tracking.server import BadTrackingUri, TrackingUnreachable
from benchmark.tracking.store import StoreError
from tests.conftest import TINY
from tests.test_faults import cell_env

# ---------------------------------------------------------------- 1. a misspelt URI, a driver


@pytest.mark.parametrize(
    ("uri", "said"),
    [
        ("sqlit:///x.db", "no store for the scheme 'sqlit:' (accepted: sqlite:///<file>"),
        ("htp://host:5000", "no store for the scheme 'htp:' (accepted: sqlite:///<file>"),
        ("localhost:5000", "did you mean http://localhost:5000?"),
        ("sqlite://x.db", "a SQLite file takes three slashes"),
        ("http://", "no host in it"),
        ("postgresql+nosuch://h/db", "SQLAlchemy has no driver 'postgresql+nosuch'"),
    ],
)
def test_a_uri_mlflow_cannot_open_is_refused_at_once_in_one_line(tmp_path, uri, said):
    started = time.monotonic()
    with pytest.raises(BadTrackingUri) as refused:
        store.experiment_id(uri, "benchmark")  # what every cell, launcher and report does first
    assert time.monotonic() - started < 2  # not MLflow's seconds, then its registry's error
    message = str(refused.value)
    assert said in message and "\n" not in message and "Model registry" not in message
    assert message.startswith(f"tracking.uri {uri}")
    assert isinstance(refused.value, TrackingUnreachable)  # every entry point says it in one line
    assert not list(tmp_path.iterdir())  # nothing created


def test_a_misspelt_scheme_names_the_one_meant():
    assert "; did you mean sqlite:///x.db?" in str(server.uri_problem("sqlit:///x.db"))
    assert "; did you mean http://host?" in str(server.uri_problem("htp://host"))
    for fine in ("sqlite:///a/b.db", "http://h:5000", "https://h", "file:///tmp/x", "mlruns"):
        assert server.uri_problem(fine) is None, fine


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_installed("psycopg"), reason="psycopg (SQLAlchemy's default) is installed")
def test_postgresql_without_its_driver_names_the_pip_install_and_the_driver_installed():
    uri = "postgresql://mlflow:s3cretpw@127.0.0.1:1/mlflow"
    with pytest.raises(BadTrackingUri) as refused:
        server.check_reachable(uri)  # before MLflow's "No module named 'psycopg'" traceback
    message = str(refused.value)
    assert "No module named 'psycopg'" in message
    assert 'pip install "psycopg[binary]"' in message
    if _installed("psycopg2"):  # the other driver, there already
        assert "postgresql+psycopg2://***@127.0.0.1:1/mlflow" in message
    assert "s3cretpw" not in message and "\n" not in message


@pytest.mark.skipif(_installed("MySQLdb"), reason="mysqlclient is installed")
def test_mysql_without_its_driver_names_its_pip_package():
    assert "pip install mysqlclient" in str(server.uri_problem("mysql://u@h/db"))


@pytest.mark.e2e
def test_a_misspelt_uri_on_the_command_line_is_one_line(tmp_path, shared_data):
    command = [sys.executable, "-m", "benchmark", "tracking.uri=sqlit:///x.db"]
    env = {**cell_env(), "BENCHMARK_DATA_ROOT": str(shared_data)}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "Model registry" not in output
    (line,) = [line for line in output.splitlines() if "[ERROR]" in line]
    assert "tracking.uri sqlit:///x.db: MLflow has no store for the scheme 'sqlit:'" in line
    assert not (tmp_path / "x.db").exists()


# ---------------------------------------------------------------- 2. a server's API


class FakeServer(http.server.BaseHTTPRequestHandler):
    """/health answers OK; the API answers as `mode` says: 500, an HTML page, or not at all."""

    mode = "500"

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/health":
            self._answer(200, "text/plain", "OK")
        elif self.mode == "500":
            self._answer(500, "text/plain", "Internal Server Error\nsqlalchemy.exc: no table")
        elif self.mode == "html":
            page = "<!doctype html><html><head><title>Sign in</title></head><body/></html>"
            self._answer(200, "text/html", page)
        else:  # sleeps: accepts, never answers in time
            time.sleep(3)
            self._answer(200, "application/json", "{}")

    do_POST = do_GET

    def _answer(self, code: int, kind: str, body: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())


@contextmanager
def fake_server(mode: str) -> Iterator[str]:
    handler = type("Handler", (FakeServer,), {"mode": mode})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize(
    ("mode", "said"),
    [
        ("500", "answers /health but its API fails (GET /api/2.0/mlflow/experiments/search: "
         "HTTP 500: Internal Server Error): see the server's log"),
        ("html", "answers its API with an HTML page ('Sign in'), not MLflow's JSON"),
        ("sleeps", "answers /health but not its API (GET /api/2.0/mlflow/experiments/search: "
         "no answer within 0.5 s)"),
    ],
)  # fmt: skip
def test_a_server_whose_api_fails_is_one_line_within_a_bounded_wait(monkeypatch, mode, said):
    monkeypatch.setattr(server, "API_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # were MLflow to wait: not long
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with fake_server(mode) as uri:
        started = time.monotonic()
        with pytest.raises(TrackingUnreachable) as refused:
            store.experiment_id(uri, "benchmark")
        assert time.monotonic() - started < 3  # not MLflow's retries, minutes of them
    message = str(refused.value)
    assert message.startswith(f"MLflow tracking server {uri} ") and said in message, message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("mode", "said"),
    [("500", "failed during the run (its API answered HTTP 500 every time"),
     ("html", "answered a page that is not its API during the run")],
)  # fmt: skip
def test_a_server_that_fails_mid_run_is_one_line(monkeypatch, mode, said):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with (
        fake_server(mode) as uri,
        pytest.raises(TrackingUnreachable) as lost,
        server.explained(uri),
    ):
        mlflow.MlflowClient(uri).get_run("0" * 32)
    message = str(lost.value)
    assert said in message and "relaunch" in message and "\n" not in message, message


# ---------------------------------------------------------------- 3. a SQLite store locked


@contextmanager
def locked(file: Path, seconds: float) -> Iterator[threading.Thread]:
    """Another connection holds an exclusive lock on `file` for `seconds` (a sqlite3 shell's
    open transaction, a backup), from the moment the block starts."""
    holding = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(file, isolation_level=None, check_same_thread=False)
        db.execute("begin exclusive")
        holding.set()
        time.sleep(seconds)
        db.execute("commit")
        db.close()

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(30)
    try:
        yield holder
    finally:
        holder.join()


def test_a_lock_held_longer_than_mlflows_20_s_is_waited_out(tmp_path, empty_store):
    """MLflow's store gives up on a locked SQLite file after 20 s (its busy timeout), and the
    cell died of it; the harness waits SQLITE_BUSY_S instead."""
    file = tmp_path / "mlflow.db"
    shutil.copy(empty_store, file)
    uri = f"sqlite:///{file}"
    client = mlflow.MlflowClient(uri)
    exp_id = store.experiment_id(uri, "benchmark")
    run = client.create_run(exp_id, tags={HARNESS_TAG: "benchmark"})
    with locked(file, 21.5):
        started = time.monotonic()
        client.log_metric(run.info.run_id, "val_acc", 0.5)  # waits for the lock, then writes
    assert time.monotonic() - started > 20
    assert client.get_run(run.info.run_id).data.metrics == {"val_acc": 0.5}
    client.set_terminated(run.info.run_id)


def test_a_store_locked_at_start_says_so_and_to_wait(tmp_path, empty_store, monkeypatch):
    file = tmp_path / "mlflow.db"
    shutil.copy(empty_store, file)
    monkeypatch.setattr(server, "SQLITE_BUSY_S", 0.5, raising=False)
    with locked(file, 6), pytest.raises(StoreError) as refused:  # sqlite3 waits 5 s
        store.experiment_id(f"sqlite:///{file}", "benchmark")
    message = str(refused.value)
    assert message.startswith(f"the tracking store {file} is locked by another process")
    assert "wait for that process to finish" in message and "relaunch" in message
    assert "not a SQLite database" not in message and "elsewhere" not in message
    store.experiment_id(f"sqlite:///{file}", "benchmark")  # free again: used as it is


def test_a_lock_outlasting_the_wait_mid_run_is_one_line_and_the_run_failed(
    make_cfg, tmp_path, monkeypatch
):
    cfg = make_cfg(*TINY)
    file = Path(cfg.tracking.uri.removeprefix("sqlite:///"))
    monkeypatch.setattr(server, "SQLITE_BUSY_S", 2.0)
    with (
        pytest.raises(StoreError) as stopped,
        cell_run(cfg, "locked", cell_manifest(cfg)) as run,
        locked(file, 5.0),  # held past the 2 s the write waits
    ):
        mlflow.log_metric("val_acc", 0.5)  # gives up after 2 s
    message = str(stopped.value)
    assert message.startswith(f"the tracking store {file} stayed locked by another process")
    assert "relaunch" in message and "\n" not in message
    ended = mlflow.MlflowClient(cfg.tracking.uri).get_run(run.info.run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["error"] == f"StoreError: {message}"


# ---------------------------------------------------------------- 4. a deleted experiment


def test_an_experiment_in_mlflows_trash_is_named_with_the_restore_command(tmp_store):
    uri = f"sqlite:///{tmp_store}"
    exp_id = store.experiment_id(uri, "benchmark")
    mlflow.MlflowClient(uri).delete_experiment(exp_id)  # the UI's Delete
    for look in (
        lambda: store.experiment_id(uri, "benchmark"),
        lambda: store.finished_run(uri, "benchmark", "some-cell"),
    ):
        with pytest.raises(StoreError) as refused:
            look()
        message = str(refused.value)
        assert message == (
            f"the experiment 'benchmark' (id {exp_id}) in {uri} is deleted (in MLflow's trash): "
            f"restore it with `MLFLOW_TRACKING_URI={uri} mlflow experiments restore "
            f"--experiment-id {exp_id}`, or set tracking.experiment to another name."
        )
    mlflow.MlflowClient(uri).restore_experiment(exp_id)  # what the command does
    assert store.experiment_id(uri, "benchmark") == exp_id


# ---------------------------------------------------------------- 5. heartbeats


def test_a_heartbeat_from_the_future_is_no_sign_of_life():
    now = time.time()
    remote = {**store.heartbeat_tags(), store.HOST_TAG: "elsewhere"}
    month = {**remote, store.BEAT_TAG: f"{now + 30 * 86400:.0f}"}
    reason = store.gone_reason(month, now)
    assert reason is not None and reason.startswith("killed: the heartbeat from elsewhere is ")
    assert "in the future" in reason
    skewed = {**remote, store.BEAT_TAG: f"{now + 20:.0f}"}  # a clock a little ahead: alive
    assert store.gone_reason(skewed, now) is None
    assert store.gone_reason({**remote, store.BEAT_TAG: "soon"}, now) is not None


def test_a_sweeps_parent_run_beats_while_the_sweep_runs(tmp_store, monkeypatch):
    """A report on another host ended a live sweep's parent FAILED once its one heartbeat (at
    its start) was older than STALE_AFTER_S; now the parent renews it until the sweep ends."""
    monkeypatch.setattr(store, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(store, "STALE_AFTER_S", 2.0)
    uri = f"sqlite:///{tmp_store}"
    run_id = store.start_sweep_run(uri, "benchmark", "/sweeps/2026-01-01/12-00-00")
    client = mlflow.MlflowClient(uri)
    client.set_tag(run_id, store.HOST_TAG, "elsewhere")  # as a report on another host sees it
    exp_id = client.get_run(run_id).info.experiment_id
    try:
        time.sleep(3.5)  # longer than STALE_AFTER_S
        assert store.end_stale_runs(client, [exp_id]) == []
        assert client.get_run(run_id).info.status == "RUNNING"
    finally:
        store.end_sweep_run(uri, run_id, {"finished": 1})
    assert client.get_run(run_id).info.status == "FINISHED"
    time.sleep(0.5)
    assert not [t for t in threading.enumerate() if t.name == "benchmark-heartbeat"]


# ---------------------------------------------------------------- 6. a run deleted, an error


def test_a_run_deleted_while_its_cell_runs_ends_the_cell_in_one_line(make_cfg):
    cfg = make_cfg(*TINY)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    with pytest.raises(StoreError) as stopped, cell_run(cfg, "deleted", cell_manifest(cfg)) as run:
        client.delete_run(run.info.run_id)  # the UI's Delete
        mlflow.log_metric("val_acc", 0.5)  # the cell's next write
    run_id = run.info.run_id
    message = str(stopped.value)
    assert message.startswith(f"the cell's run {run_id} was deleted from the tracking store")
    assert f"mlflow runs restore --run-id {run_id}" in message and "\n" not in message
    assert mlflow.active_run() is None
    ended = client.get_run(run_id)
    assert ended.info.lifecycle_stage == LifecycleStage.DELETED  # as the user left it
    assert ended.info.status == "FAILED"  # not RUNNING forever, hidden
    assert ended.data.tags["error"] == f"StoreError: {message}"


def test_the_error_tag_is_one_line_and_the_traceback_an_artifact(make_cfg, tmp_path):
    """A DataLoader worker's error carries the worker's traceback in its message: the `error`
    tag is its last line (the file named), the traceback goes to error.txt."""
    from torch._utils import ExceptionWrapper

    gone = tmp_path / "images" / "ants" / "0013035.jpg"
    cfg = make_cfg(*TINY)
    with pytest.raises(FileNotFoundError), cell_run(cfg, "images-gone", cell_manifest(cfg)) as run:
        try:
            gone.open("rb")
        except OSError:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        wrapped.reraise()  # as the loader re-raises a worker's error
    ended = mlflow.MlflowClient(cfg.tracking.uri).get_run(run.info.run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["error"] == (
        f"FileNotFoundError: [Errno 2] No such file or directory: '{gone}' "
        "(in DataLoader worker process 0)"
    )
    trace = mlflow.MlflowClient(cfg.tracking.uri).download_artifacts(
        run.info.run_id, "error.txt", str(tmp_path)
    )
    text = Path(trace).read_text()
    assert "Original Traceback (most recent call last):" in text and str(gone) in text


def test_the_error_a_dead_cell_left_is_tagged_in_one_line_by_whoever_ends_its_run(
    tmp_path, tmp_store
):
    """The stale-run rule ends a dead cell's run with the error its outcome file holds: one line
    too, whatever the cell wrote there."""
    uri = f"sqlite:///{tmp_store}"
    folder = tmp_path / "cell"
    folder.mkdir()
    said = "FileNotFoundError: Caught FileNotFoundError in DataLoader worker process 1.\n" + (
        'Original Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "FileNotFoundError: [Errno 2] No such file or directory: '/data/a.jpg'\n"
    )
    (folder / "outcome.json").write_text(json.dumps({"status": "failed", "error": said}))
    dead = subprocess.Popen(["true"])
    dead.wait()
    tags = {
        **store.heartbeat_tags(),
        store.PID_TAG: str(dead.pid),  # this host, a process that is gone
        HARNESS_TAG: "benchmark",
        "hydra_output_dir": str(folder),
    }
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(store.experiment_id(uri, "benchmark"), tags=tags).info.run_id
    assert store.end_stale_runs(client, [client.get_run(run_id).info.experiment_id]) == [run_id]
    ended = client.get_run(run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["error"] == (
        "FileNotFoundError: [Errno 2] No such file or directory: '/data/a.jpg' "
        "(in DataLoader worker process 1)"
    )
