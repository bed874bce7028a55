"""The MLflow UI as the harness's users browse it (issue 36, item 4): `make ui`
(benchmark.tools.ui) prints, before it serves, the address of the experiment's runs table in
MLflow's machine-learning view with the harness's saved view (the cells by test accuracy, the
accuracy columns shown), and starts one server process without MLflow's job consumers; a cell's
run is named for what differs from the defaults beyond the cell's name. No server is started
here: the command and environment it would run are inspected (`make ui-check` drives a real one
in Chromium)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest
from mlflow.environment_variables import MLFLOW_SERVER_ENABLE_JOB_EXECUTION

from benchmark.tools import ui
from benchmark.tracking import identity
from tests.conftest import cell_spec
from tests.test_faults import cell_env
from tests.test_stub_cells import STUB_CELL

MLFLOW_JS = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"


def saved_view(uri: str, experiment_id: str, key: str) -> dict[str, Any]:
    """The view the UI opens for `viewStateShareKey=key`: the experiment's tag, unwrapped as
    MLflow's page unwraps it (the saved-view envelope, its `state` a JSON string)."""
    tags = mlflow.MlflowClient(uri).get_experiment(experiment_id).tags
    envelope = json.loads(tags[f"mlflow.sharedViewState.{key}"])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    view: dict[str, Any] = json.loads(envelope["state"])
    return view


class FakeServer:
    """subprocess.Popen for the server: records what it was given, and has ended at once."""

    started: ClassVar[list[FakeServer]] = []

    def __init__(self, command: list[str], env: dict[str, str], printed: str) -> None:
        self.command, self.env, self.printed = command, env, printed
        FakeServer.started.append(self)

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


def test_make_ui_prints_the_runs_table_in_the_ml_view_then_serves_one_worker_without_jobs(
    tmp_store: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The address printed (before the server starts) opens the experiment's runs page with
    workflowType=machine_learning (MLflow 3.18 opens its GenAI overview without it) and the
    saved view's key; the server is `mlflow server` with --workers 1, its job execution off."""
    uri = f"sqlite:///{tmp_store}"
    monkeypatch.setenv(MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name, "true")  # as a user may have it
    FakeServer.started.clear()
    monkeypatch.setattr(
        ui.subprocess,
        "Popen",
        lambda command, env: FakeServer(command, env, capsys.readouterr().out),
    )
    assert ui.main(["--tracking-uri", uri, "--port", "5077"]) == 0
    (server,) = FakeServer.started
    (line,) = server.printed.splitlines()  # said before the server was started
    url = line.removeprefix("Runs: ")
    experiment = mlflow.MlflowClient(uri).get_experiment_by_name("benchmark")
    parts = urlsplit(url)
    route, _, query = parts.fragment.partition("?")
    assert (parts.scheme, parts.netloc) == ("http", "127.0.0.1:5077")
    assert route == f"/experiments/{experiment.experiment_id}/runs"
    assert parse_qs(query) == {
        "workflowType": ["machine_learning"],
        "viewStateShareKey": [ui.SHARE_KEY],
    }
    assert saved_view(uri, experiment.experiment_id, ui.SHARE_KEY) == ui.view_state()

    command = server.command
    assert command[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--backend-store-uri") + 1] == uri
    assert command[command.index("--port") + 1] == "5077"
    assert server.env[MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name] == "false"
    monkeypatch.setenv(MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name, "false")
    assert MLFLOW_SERVER_ENABLE_JOB_EXECUTION.get() is False  # as MLflow's server reads it


def test_on_a_tracking_server_it_saves_the_view_and_prints_its_address_starting_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)  # set by the command: unset after the test
    saved: list[str] = []
    monkeypatch.setattr(ui, "share_view", lambda uri, experiment: saved.append(uri) or "7")
    monkeypatch.setattr(ui, "serve", lambda *args: pytest.fail("started a server"))
    assert ui.main(["--tracking-uri", "http://me:s3cret@tracking.example:5000"]) == 0
    assert saved == ["http://tracking.example:5000"]  # the login goes to MLflow's variables
    assert capsys.readouterr().out == (
        "Runs (already served): http://tracking.example:5000/#/experiments/7/runs"
        f"?workflowType=machine_learning&viewStateShareKey={ui.SHARE_KEY}\n"
    )


def test_the_saved_view_shows_the_accuracy_columns_best_test_acc_first(tmp_store: Path) -> None:
    """The experiment's tag holds the view: the scores, the cost and what each cell is as
    columns (MLflow's keys: metrics.`test_acc`), sorted by test_acc descending, the cells only;
    written again, it stays one tag under one key."""
    uri = f"sqlite:///{tmp_store}"
    experiment_id = ui.share_view(uri, "benchmark")
    assert ui.share_view(uri, "benchmark") == experiment_id
    view = saved_view(uri, experiment_id, ui.SHARE_KEY)
    columns = view["selectedColumns"]
    assert columns[:3] == [
        "metrics.`test_acc`",
        "metrics.`best_val_acc`",
        "metrics.`shift_test_acc`",
    ]
    assert {"metrics.`wall_time_s`", "metrics.`tune_s`"} <= set(columns)
    params = ["dataset", "colour", "strategy", "backbone", "seed"]
    assert [c for c in columns if c.startswith("params.")] == [f"params.`{p}`" for p in params]
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`test_acc`", False)
    assert view["searchFilter"] == "tags.`benchmark.kind` = 'cell'"
    assert set(view["columnWidths"]) <= set(view["columnOrder"])  # MLflow sizes only those
    tags = mlflow.MlflowClient(uri).get_experiment(experiment_id).tags
    assert [t for t in tags if t.startswith(ui.SHARED_VIEW_TAG)] == [
        ui.SHARED_VIEW_TAG + ui.SHARE_KEY
    ]


@pytest.mark.skipif(not MLFLOW_JS.is_dir(), reason="MLflow installed without its UI")
def test_the_installed_mlflow_ui_reads_what_the_view_relies_on() -> None:
    """The names the view relies on are in the installed MLflow's UI code: the URL parameters,
    the tag prefix, the saved-view envelope, the keys a view may set and the column keys' form.
    An upgrade that renames one fails here, not silently in a browser (then `make ui-check`
    shows what the UI does)."""
    code = "".join(file.read_text(errors="ignore") for file in MLFLOW_JS.glob("*.js"))
    for name in (
        '"viewStateShareKey"',
        '"mlflow.sharedViewState."',
        '"workflowType"',
        '"machine_learning"',
        '"selectedColumns","columnOrder","columnWidths"',  # what a saved view may set
        '"searchFilter","orderByKey","orderByAsc"',
        "Invalid saved-view envelope",  # {name, createdAt, state}
        'RUN_NAME:"Run Name"',
        "tags.`mlflow.runName`",  # keys of that form: metrics.`test_acc`
    ):
        assert name in code, name


def test_a_run_name_says_the_overrides_beyond_the_cells_name() -> None:
    """The cell's name, then the overrides that change what it computes and that the name does
    not say, as typed; paths, store, progress and the name's own keys left out; a password
    masked; cut to RUN_NAME_CHARS. The cell's name (folders, the Optuna study) stays as it
    was."""
    spec = cell_spec(*STUB_CELL)
    overrides = [
        "backbone=stub", "dataset=synthetic", "seed=0", "trainer.max_epochs=2",
        "+trainer.enable_model_summary=false", "trainer.enable_progress_bar=false",
        "data.num_workers=0", "tracking.uri=sqlite:///x.db", "paths.data_root=/data",
        "tune=fair", "~trainer.gradient_clip_val", "hydra.run.dir=out",
    ]  # fmt: skip
    assert identity.run_name(spec, overrides) == (
        "synthetic-rgb-finetune-stub-seed=0 trainer.max_epochs=2 tune=fair "
        "~trainer.gradient_clip_val"
    )
    assert identity.run_name(spec) == "synthetic-rgb-finetune-stub-seed=0"
    secret = identity.run_name(spec, ["dataset.url=https://me:s3cret-token@host/a.zip"])
    assert "s3cret" not in secret and "dataset.url=https://***@host/a.zip" in secret
    long = identity.run_name(spec, [f"strategy.lr={'1' * 200}"])
    assert len(long) == identity.RUN_NAME_CHARS and long.endswith("...")
    assert spec.name == "synthetic/rgb/finetune/stub/seed=0"


def test_task_overrides_are_read_from_the_jobs_hydra_folder(tmp_path: Path) -> None:
    assert identity.task_overrides(tmp_path) == []  # composed without Hydra's runtime
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- trainer.max_epochs=2\n- seed=1\n")
    assert identity.task_overrides(tmp_path) == ["trainer.max_epochs=2", "seed=1"]
    (tmp_path / ".hydra" / "overrides.yaml").write_text("{not: [yaml")
    assert identity.task_overrides(tmp_path) == []  # a damaged file: the plain name


@pytest.mark.e2e
def test_two_cells_that_differ_in_epochs_have_two_run_names(
    tmp_path: Path, tmp_store: Path
) -> None:
    """`python -m benchmark -m ... trainer.max_epochs=1,2`: one cell at two settings, two run
    names (they were both `synthetic-rgb-finetune-stub-seed=0`), the cell's name one."""
    settings = [o for o in STUB_CELL if not o.startswith("trainer.max_epochs")]
    command = [
        sys.executable, "-m", "benchmark", "-m", *settings, "trainer.max_epochs=1,2",
        f"paths.data_root={tmp_path / 'data'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=cell_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_store}")
    experiment = client.get_experiment_by_name("benchmark")
    runs = client.search_runs([experiment.experiment_id], "tags.`benchmark.kind` = 'cell'")
    # (trainer.precision=32-true is STUB_CELL's: not the default either)
    base = "synthetic-rgb-finetune-stub-seed=0 trainer.precision=32-true"
    assert sorted(r.info.run_name for r in runs) == [
        f"{base} trainer.max_epochs=1",
        f"{base} trainer.max_epochs=2",
    ]
    assert {r.data.tags["cell"] for r in runs} == {"synthetic/rgb/finetune/stub/seed=0"}
