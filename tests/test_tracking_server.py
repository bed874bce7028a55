"""A real tracking server, as the README sets it up: `mlflow server` on a PostgreSQL backend with
proxied artifacts in a folder, restarted in the middle of a 4-cell sweep. Nothing lost, nothing
wrong: the cells that hit the outage fail at once with a line that says why, none is left
RUNNING, and relaunching the command leaves exactly one FINISHED run per cell, every metric in it.

PostgreSQL (Debian's `postgresql` package, which .ci/run installs) runs from a fresh cluster in a
temporary folder, on 127.0.0.1 only; the test is skipped only when its binaries are absent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from subprocess import Popen

import mlflow
import pytest
import requests

from benchmark.cell.run import run_cell
from benchmark.tracking import server as mlflow_server
from benchmark.tracking.identity import HARNESS_TAG, KIND_TAG, RUN_FILE, cell_key
from benchmark.tracking.server import TrackingUnreachable
from benchmark.tracking.store import experiment_id, finished_run
from tests.conftest import PROJECT, TINY
from tests.test_sweep import _pid_of_cell

pytestmark = pytest.mark.e2e

LOOPBACK = "127.0.0.1"  # every server here listens on loopback only
FIX = "start the server or set tracking.uri / MLFLOW_TRACKING_URI"
# What a user may set to fail sooner than the defaults (server.HTTP_DEFAULTS, about 30 s): MLflow
# retries a refused connection after 0 and 2 s. The outage below outlasts that by OUTAGE_MARGIN_S.
USER_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
OUTAGE_MARGIN_S = 8.0
SWEEP_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def postgres_bin() -> Path | None:
    """Debian's /usr/lib/postgresql/<version>/bin (newest), else initdb on the PATH."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class Postgres:
    """A throw-away cluster in `folder`, trust authentication on 127.0.0.1, socket in `folder`.
    PostgreSQL refuses to run as root: as root, it runs as the `postgres` user."""

    def __init__(self, bin_dir: Path, folder: Path) -> None:
        self.bin, self.folder, self.port = bin_dir, folder, free_port()
        self.data, self.log = folder / "data", folder / "postgres.log"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(folder, "postgres", "postgres")

    def _run(self, tool: str, *args: str, timeout: float = 120) -> None:
        done = subprocess.run(
            [*self.as_user, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        log = self.log.read_text()[-3000:] if self.log.is_file() else ""
        assert done.returncode == 0, f"{tool} failed:\n{done.stdout}{done.stderr}{log}"

    def start(self) -> str:
        """The cluster, started, with a database `mlflow`; its SQLAlchemy URI (psycopg2)."""
        self._run("initdb", "-D", str(self.data), "-U", "mlflow", "--auth=trust", "-E", "UTF8")
        options = (
            f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.folder} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"  # a test's database
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )
        self._run("createdb", "-h", LOOPBACK, "-p", str(self.port), "-U", "mlflow", "mlflow")
        return f"postgresql+psycopg2://mlflow@{LOOPBACK}:{self.port}/mlflow"

    def stop(self) -> None:
        if (self.data / "postmaster.pid").is_file():
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


class TrackingServer:
    """`mlflow server` on 127.0.0.1:`port`, stopped and started again on the same port."""

    def __init__(self, backend: str, artifacts: Path, log: Path) -> None:
        self.backend, self.artifacts, self.log = backend, artifacts, log
        self.port = free_port()
        self.uri = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> float:
        """Start the server and wait until /health answers; the seconds that took."""
        started = time.monotonic()
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            LOOPBACK,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend,
            "--artifacts-destination",
            str(self.artifacts),
        ]
        # The GenAI job runner (9 more processes) serves nothing this harness uses.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        while time.monotonic() - started < timeout:
            assert self.process.poll() is None, f"mlflow server exited:\n{self.tail()}"
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise AssertionError(f"mlflow server not up after {timeout} s:\n{self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        self.terminate()
        self.wait_stopped(timeout)

    def terminate(self) -> None:
        """SIGTERM to its process group: uvicorn stops listening at once, then finishes the
        requests in flight."""
        if self.process is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)

    def refuses(self, timeout: float = 30) -> bool:
        """Whether new connections are refused within `timeout` (it no longer listens)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.uri}/health", timeout=1)
            except requests.ConnectionError:
                return True
            except requests.Timeout:
                pass
            time.sleep(0.05)
        return False

    def wait_stopped(self, timeout: float = 30) -> None:
        """Wait for the whole process group (uvicorn is a child of `mlflow server`) to exit;
        SIGKILL what is left after `timeout`."""
        if self.process is None:
            return
        pgid, self.process = self.process.pid, None
        if not _group_gone(pgid, timeout):
            with suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            assert _group_gone(pgid, 30), f"mlflow server (process group {pgid}) would not exit"

    def tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.is_file() else ""


def _group_gone(pgid: int, timeout: float) -> bool:
    """Whether every process of the group has exited within `timeout` (zombies count as gone:
    the leader is reaped here, its children by whoever inherits them)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)
        if not _live_members(pgid):
            return True
        time.sleep(0.1)
    return False


def _live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        if int(fields[2]) == pgid and fields[0] != "Z":  # state, ppid, pgrp
            members.append(int(stat.parent.name))
    return members


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """PostgreSQL and `mlflow server` on it, both on 127.0.0.1, always stopped afterwards."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not found (Debian: apt-get install postgresql)")
    # pytest's tmp folders are private to root; PostgreSQL's user needs its own folder.
    folder = Path(tempfile.mkdtemp(prefix="benchmark-postgres-"))
    database = Postgres(bin_dir, folder)
    here = tmp_path_factory.mktemp("tracking-server")
    server = None
    try:
        backend = database.start()
        server = TrackingServer(backend, here / "artifacts", here / "mlflow-server.log")
        server.start()
        yield server
    finally:
        if server is not None:
            server.stop()
        database.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_an_unreachable_server_is_said_at_once_with_the_fix(make_cfg, monkeypatch):
    for name in [
        *mlflow_server.HTTP_DEFAULTS,
        "MLFLOW_TRACKING_URI",
    ]:  # unset, and unset again after
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting
    uri = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(TrackingUnreachable) as refused:
        run_cell(make_cfg("strategy=freeze", *TINY, f"tracking.uri={uri}"))
    assert time.monotonic() - started < 5  # MLflow's own retries would take about 4 minutes
    assert (
        str(refused.value) == f"MLflow tracking server {uri} is unreachable (connection "
        f"refused): {FIX} to one that answers."
    )
    # MLflow's retries are bounded for what follows, the user's own setting kept.
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "4"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"

    # A server that accepts the connection but never answers: said after the health timeout.
    monkeypatch.setattr(mlflow_server, "HEALTH_TIMEOUT_S", 0.5)
    with socket.socket() as hung:
        hung.bind((LOOPBACK, 0))
        hung.listen(8)
        uri = f"http://{LOOPBACK}:{hung.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(TrackingUnreachable, match=r"unreachable \(no answer within 0.5 s\)"):
            mlflow_server.check_reachable(uri)
        assert time.monotonic() - started < 3


def test_a_server_lost_mid_run_is_said_in_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://{LOOPBACK}:{free_port()}"
    with pytest.raises(TrackingUnreachable) as lost, mlflow_server.explained(uri):
        mlflow.MlflowClient(uri).get_run("0" * 32)  # MLflow's "API request ... failed"
    message = str(lost.value)
    assert message.startswith(f"MLflow tracking server {uri} stopped answering during the run")
    assert "connection refused" in message and FIX in message and "relaunch" in message
    assert "API request" in str(lost.value.__cause__)  # MLflow's error is kept as the cause
    with pytest.raises(ValueError), mlflow_server.explained(uri):  # anything else passes unchanged
        raise ValueError("not the server")


def test_a_relaunch_ends_failed_the_run_that_a_failed_cell_left_running(make_cfg, tmp_path):
    """The server was down until after the sweep ended: neither the cell nor its launcher could
    end its run. The relaunch does, and leaves alone a run whose cell has not said it ended."""
    cfg = make_cfg("strategy=freeze", *TINY)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    exp_id = experiment_id(cfg.tracking.uri, cfg.tracking.experiment)
    client, error = mlflow.MlflowClient(), f"TrackingUnreachable: MLflow tracking server ... {FIX}"
    left = {}
    for name, outcome in (("failed", {"status": "failed", "error": error}), ("going", None)):
        folder = tmp_path / name
        folder.mkdir()
        tags = {
            "cell_key": cell_key(cfg),
            "hydra_output_dir": str(folder),
            HARNESS_TAG: "benchmark",
            KIND_TAG: "cell",
        }
        left[name] = client.create_run(exp_id, tags=tags).info.run_id
        started = {"run_id": left[name], "tracking_uri": cfg.tracking.uri}
        (folder / RUN_FILE).write_text(json.dumps(started))  # as cell_run writes it
        if outcome is not None:  # as __main__ writes it when the cell fails
            (folder / "outcome.json").write_text(json.dumps(outcome))

    key = cell_key(cfg)
    assert (
        finished_run(cfg.tracking.uri, cfg.tracking.experiment, key) is None
    )  # the relaunch's look-up: nothing FINISHED to skip
    failed = client.get_run(left["failed"])
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == error
    assert client.get_run(left["going"]).info.status == "RUNNING"


def _run_file(sweep_root: Path, deadline: float) -> Path | None:
    """The first RUN_FILE that a cell of the sweep writes (its MLflow run is open)."""
    while time.monotonic() < deadline:
        if found := next(sweep_root.rglob(RUN_FILE), None):
            return found
        time.sleep(0.05)
    return None


@contextmanager
def sweep(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[Popen]:
    """The sweep in its own process group with its cells, waited for at the end of the block
    (SWEEP_TIMEOUT_S: nothing may hang on an outage); killed, cells and all, if anything fails."""
    with open(log, "w") as output:
        process = Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        yield process
        process.wait(timeout=SWEEP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def test_a_sweep_through_a_server_restart_loses_nothing(tracking_server, tmp_path, shared_data):
    server, uri = tracking_server, tracking_server.uri
    command = [
        sys.executable, "-m", "benchmark", "-m", "hydra/launcher=gpus",
        "hydra.launcher.workers=2", "strategy=freeze", "seed=0,1", f"tracking.uri={uri}",
        *TINY,
        "trainer.max_epochs=2",  # a history of two points per metric
        "speed.image_cache=false",  # decode the few images used, not all 397 first
    ]  # fmt: skip
    env = {**os.environ, "BENCHMARK_DATA_ROOT": str(shared_data), "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(USER_RETRIES)
    with sweep(command, tmp_path, env, tmp_path / "first.log") as first_sweep:
        # The first cell whose run is open is held still while the server stops, so that its
        # next request surely meets the outage; the others meet it wherever they are.
        run_file = _run_file(tmp_path / "multirun", time.monotonic() + 300)
        assert run_file is not None, (tmp_path / "first.log").read_text()
        hit, pid = run_file.parent, _pid_of_cell(run_file.parent)
        if pid is not None:
            os.kill(pid, signal.SIGSTOP)
        outage, outage_wall = time.monotonic(), time.time()
        try:
            server.terminate()
            assert server.refuses(), server.tail()
        finally:  # resumed once the server no longer listens: a request it had begun ends
            if pid is not None:
                os.kill(pid, signal.SIGCONT)
        server.wait_stopped()
        # Longer than the cells' retries (USER_RETRIES): a request made in it fails.
        left = mlflow_server.retry_budget_s(env) + OUTAGE_MARGIN_S - (time.monotonic() - outage)
        time.sleep(max(0.0, left))
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{uri}/health", timeout=2)  # still down: the outage was real
        server.start()  # on the same port
        outage_s = time.monotonic() - outage
    first = (tmp_path / "first.log").read_text()
    summary = re.search(r"Sweep done: 2 cells: (\d) finished, 0 skipped, (\d) failed\.", first)
    assert summary is not None and first_sweep.returncode != 0, first
    finished, failed = map(int, summary.groups())
    assert failed >= 1 and finished + failed == 2, first

    # The cells that met the outage failed with one line naming the server and the fix.
    outcomes = [json.loads(p.read_text()) for p in (tmp_path / "multirun").rglob("outcome.json")]
    failures = [o for o in outcomes if o["status"] == "failed"]
    assert len(outcomes) == 2 and len(failures) == failed
    for outcome in failures:
        assert outcome["error"].startswith(f"TrackingUnreachable: MLflow tracking server {uri} ")
        assert FIX in outcome["error"], outcome
    assert json.loads((hit / "outcome.json").read_text())["status"] == "failed"
    hit_log = (hit / "cell.log").read_text()
    assert "stopped answering during the run" in hit_log and "Traceback" not in hit_log
    # It failed soon after the server came back, not minutes later (MLflow's own retries
    # would have kept each request going for about 4 minutes).
    failed_after_s = (hit / "outcome.json").stat().st_mtime - outage_wall
    assert failed_after_s < outage_s + 3 * mlflow_server.retry_budget_s(env) + 60, failed_after_s

    client = mlflow.MlflowClient(uri)
    (experiment,) = client.search_experiments(filter_string="name = 'benchmark'")
    (hit_run,) = client.search_runs(
        [experiment.experiment_id], f"tags.hydra_output_dir = '{hit}'", max_results=10
    )

    with sweep(command, tmp_path, env, tmp_path / "again.log") as relaunched:
        pass
    again = (tmp_path / "again.log").read_text()
    assert relaunched.returncode == 0, again[-5000:]
    summary = re.search(r"Sweep done: 2 cells: (\d) finished, (\d) skipped, 0 failed\.", again)
    assert summary is not None, again[-5000:]
    rerun, skipped = map(int, summary.groups())
    # Only the failed cells run again (one whose run the server had ended FINISHED before its
    # answer was lost would rightly be skipped).
    assert rerun + skipped == 2 and rerun <= failed and skipped >= finished, again[-5000:]

    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`{KIND_TAG}` = 'cell'", max_results=1000
    )
    # The run of a cell that met the outage is ended FAILED with the cell's error (by the cell,
    # by the launcher at the sweep's end, or else by the relaunch): none is left RUNNING.
    assert {r.info.status for r in runs} <= {"FINISHED", "FAILED"}
    for run in runs:
        if run.info.status == "FAILED":
            assert uri in run.data.tags.get("error", ""), run
    assert client.get_run(hit_run.info.run_id).info.status == "FAILED"
    done = [r for r in runs if r.info.status == "FINISHED"]
    keys = [r.data.tags["cell_key"] for r in done]
    assert len(done) == 2 and len(set(keys)) == 2  # every cell FINISHED exactly once
    assert sorted(r.data.params["seed"] for r in done) == ["0", "1"]
    for run in done:  # nothing lost: every metric, one point per epoch, and the artifacts
        run_id = run.info.run_id
        for metric in ("test_acc", "test_loss", "wall_time_s", "peak_rss_mb"):
            assert metric in run.data.metrics, (metric, run_id)
        for metric in ("train_loss", "val_loss", "val_acc"):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == [0, 1], (metric, run_id, history)
        assert len(client.get_metric_history(run_id, "test_acc")) == 1
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.yaml", "manifest.csv", "confusion_matrix.json"} <= artifacts, artifacts
        confusion = client.download_artifacts(run_id, "confusion_matrix.json", str(tmp_path))
        assert sum(map(sum, json.loads(Path(confusion).read_text())["matrix"])) == 4
    stored = {p.name for p in server.artifacts.rglob("*") if p.is_file()}
    assert {"config.yaml", "manifest.csv", "confusion_matrix.json"} <= stored  # on the server
