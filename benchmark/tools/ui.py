"""`python -m benchmark.tools.ui [--tracking-uri URI] [--port 5000] [--host 127.0.0.1]`: MLflow's
UI on the project's store, opened where a user of the harness looks first (`make ui`).

- The address it prints opens the experiment's runs table in MLflow's machine-learning view
  (`workflowType=machine_learning`; MLflow 3 otherwise opens its GenAI overview), its cells
  sorted by test accuracy, the accuracy, time and cell columns shown. MLflow has no setting for
  the columns a table shows first: its experiment page loads a saved view from the URL's
  `viewStateShareKey=<key>`, read from the experiment's tag `mlflow.sharedViewState.<key>`
  (what its "Views" menu saves: a name and the JSON of the search's facets and the table's
  state). The tag is written here, under one key (SHARE_KEY), so the address stays the same
  and the view is in the Views menu as VIEW_NAME.
- One server process (`--workers 1`; MLflow starts 4) and no job execution (the GenAI
  evaluation jobs' consumers; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false): a UI to browse runs on
  a machine whose cores train cells.
- A tracking server's URI (http, https) is already a UI: the view is saved on it and its address
  printed; nothing is started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlencode

import mlflow

from benchmark.tracking import identity, server, store

# MLflow's UI (3.x): the experiment tag a shared view is read from, the URL parameter naming it,
# and the parameter that picks the machine-learning view over the GenAI one.
SHARED_VIEW_TAG = "mlflow.sharedViewState."
SHARE_KEY_PARAM = "viewStateShareKey"
SHARE_KEY = "benchmark-cells"
VIEW_NAME = "benchmark: cells by test_acc"
WORKFLOW = {"workflowType": "machine_learning"}
# The columns the runs table shows (the run's name and date always come first): the scores,
# the cost, then what the cell is. `tune_s` and `shift_test_acc` exist for tuned cells and a
# dataset's shift test only; a column no run has is not shown. `Models`: a run's logged model
# (`make predict MODEL=...`).
METRIC_COLUMNS = ("test_acc", "best_val_acc", "shift_test_acc", "wall_time_s", "tune_s")
PARAM_COLUMNS = (*identity.CELL_PARAMS, "seed")
ATTRIBUTE_COLUMNS = ("Models",)
ORDER_BY = "test_acc"
RUN_NAME_WIDTH, SCORE_WIDTH = 400, 150  # pixels
# The env that turns MLflow's job execution off, and the one server process.
JOB_EXECUTION_ENV = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
WORKERS = 1
READY_S = 120  # how long to wait for the server to answer before saying it is not ready


def column(kind: str, name: str) -> str:
    """A column's key in MLflow's runs table: metrics.`test_acc`, params.`strategy`."""
    return f"{kind}.`{name}`"


RUN_NAME = column("attributes", "Run Name")


def view_state() -> dict[str, object]:
    """The runs table's view (MLflow's search facets and UI state, the keys its experiment
    page reads from a saved view): the cells of the experiment, best test accuracy first, the
    columns above shown.

    Sorted by a metric, MLflow lists runs flat (it nests a sweep's cells under their parent run
    only when sorted by date, and a saved view cannot open a parent: it leaves `runsExpanded`
    out), so the filter (`benchmark.kind` = cell) keeps the rows that have a score: no sweep
    parents, no tuning trials. Clearing it (the search box) shows them again."""
    columns = [
        *(column("metrics", m) for m in METRIC_COLUMNS),
        *(column("params", p) for p in PARAM_COLUMNS),
        *(column("attributes", a) for a in ATTRIBUTE_COLUMNS),
    ]
    return {
        "searchFilter": f"tags.`{identity.KIND_TAG}` = 'cell'",
        "orderByKey": column("metrics", ORDER_BY),
        "orderByAsc": False,
        "selectedColumns": columns,
        # (the table sizes only the columns of this list) wide enough for a run's name with its
        # overrides, and a score's digits
        "columnOrder": [RUN_NAME, *columns],
        "columnWidths": {
            RUN_NAME: RUN_NAME_WIDTH,
            **{column("metrics", m): SCORE_WIDTH for m in METRIC_COLUMNS[:3]},
        },
    }


def saved_view(view: Mapping[str, object], now_ms: int) -> str:
    """The tag's value: MLflow's saved-view envelope (its name, times in ms, and the view as a
    JSON string), which its Views menu lists and its experiment page opens."""
    state = json.dumps(view)
    return json.dumps({"name": VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms, "state": state})


def share_view(uri: str, experiment: str) -> str:
    """The experiment's id (created as a cell creates it, if the store has none yet), with the
    view saved on it as the tag SHARED_VIEW_TAG + SHARE_KEY (rewritten: the current view)."""
    experiment_id = store.experiment_id(uri, experiment)
    value = saved_view(view_state(), int(time.time() * 1000))
    with store.said_if_locked(uri):
        mlflow.MlflowClient(uri).set_experiment_tag(
            experiment_id, SHARED_VIEW_TAG + SHARE_KEY, value
        )
    return experiment_id


def runs_url(base: str, experiment_id: str) -> str:
    """The address of the experiment's runs table in the machine-learning view, with the saved
    view (share_view)."""
    query = urlencode({**WORKFLOW, SHARE_KEY_PARAM: SHARE_KEY})
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"


def local_base(host: str, port: int) -> str:
    """The address a browser on this machine opens (0.0.0.0 listens everywhere: 127.0.0.1)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` (what `mlflow ui` runs) on the store at `uri`, one worker process."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--host", host,
        "--port", str(port),
        "--workers", str(WORKERS),
    ]  # fmt: skip


def server_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The server's environment: this one, MLflow's job execution off (no job consumers)."""
    return {**environ, JOB_EXECUTION_ENV: "false"}


def wait_ready(process: subprocess.Popen[bytes], base: str, seconds: float) -> bool:
    """Whether the server at `base` answers /health within `seconds` (False as soon as its
    process ends)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


class _Stopped(Exception):
    """SIGTERM to this process: the server is stopped with it."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped


def serve(uri: str, host: str, port: int, url: str) -> int:
    """The server, until it ends, Ctrl-C or SIGTERM (which stop it too: no server is left
    behind); the address again once it answers."""
    process = subprocess.Popen(server_command(uri, host, port), env=server_env())
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        started = time.monotonic()
        if wait_ready(process, local_base(host, port), READY_S):
            print(f"MLflow UI ready after {time.monotonic() - started:.0f} s: {url}", flush=True)
        return process.wait()
    except (KeyboardInterrupt, _Stopped):
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.tools.ui",
        description="MLflow's UI on the harness's store: prints the address of the runs table "
        "(machine-learning view, accuracy columns shown), then serves it with one worker.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument("--experiment", default="benchmark", help="(tracking.experiment)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    identity.use_credentials(given)
    uri = identity.store_uri(given)
    try:
        experiment_id = share_view(uri, args.experiment)
    except (server.TrackingUnreachable, store.StoreError) as error:
        print(f"error: {identity.redact(str(error))}", file=sys.stderr)
        return 2
    if server.is_server(uri):
        print(f"Runs (already served): {runs_url(uri, experiment_id)}", flush=True)
        return 0
    url = runs_url(local_base(args.host, args.port), experiment_id)
    print(f"Runs: {url}", flush=True)
    return serve(uri, args.host, args.port, url)


if __name__ == "__main__":
    sys.exit(main())
