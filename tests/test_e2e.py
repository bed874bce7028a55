"""The user's path: `python -m benchmark -m ...` on real images, MLflow, then the report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from benchmark.models.precision import native_bf16
from tests.conftest import PROJECT, TINY

pytestmark = pytest.mark.e2e


def benchmark(*args: str, cwd: Path, data_root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "BENCHMARK_DATA_ROOT": str(data_root), "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the cache: the session's ($BENCHMARK_CACHE_DIR)
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def report_of_tiny_runs(cwd: Path, data_root: Path) -> pd.DataFrame:
    """`python -m benchmark.report` on the store in `cwd`: results/report.csv. TINY runs are
    debug runs (one batch), so it counts them only with --include-debug."""
    reported = benchmark(
        "benchmark.report",
        "--out",
        str(cwd / "results"),
        "--include-debug",
        cwd=cwd,
        data_root=data_root,
    )
    assert reported.returncode == 0, reported.stderr[-3000:]
    return pd.read_csv(cwd / "results" / "report.csv")


def runs_in(store: Path, kind: str = "cell") -> pd.DataFrame:
    """The cells' runs (kind="sweep": the sweeps' parent runs)."""
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    return mlflow.search_runs(
        experiment_names=["benchmark"], filter_string=f"tags.`benchmark.kind` = '{kind}'"
    )


def test_four_cell_grid_logs_four_runs_and_reports_them(tmp_path, shared_data):
    swept = benchmark(
        "benchmark",
        "-m",
        "colour=rgb,gray",
        "strategy=finetune,freeze",
        *(o for o in TINY if not o.startswith("trainer.precision")),  # the default fast path
        cwd=tmp_path,
        data_root=shared_data,
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert swept.stdout.count("test_acc=") == 4, swept.stdout  # each cell's one-line summary
    # Hydra's own launcher: each cell's start and end say k/N, elapsed and the time left.
    assert "cell 1/4 starts [0/4 done, " in swept.stdout, swept.stdout
    assert "cell finished after " in swept.stdout and "[3/4 done, " in swept.stdout
    assert "about" in swept.stdout and "[4/4 done, " in swept.stdout

    runs = runs_in(tmp_path / "mlflow.db")  # the default store: ./mlflow.db
    assert len(runs) == 4 and set(runs.status) == {"FINISHED"}
    cells = set(zip(runs["params.colour"], runs["params.strategy"], strict=True))
    assert cells == {(c, s) for c in ("rgb", "gray") for s in ("finetune", "freeze")}
    assert set(runs["params.dataset"]) == {"hymenoptera"}
    assert set(runs["params.backbone"]) == {"efficientnet_lite0"}
    assert set(runs["params.seed"]) == {"0"}
    fast = "bf16-mixed" if native_bf16("cpu") else "32-true"  # trainer.precision=auto, resolved
    assert set(runs["params.trainer.precision"]) == {fast}
    for metric in ("train_loss", "val_loss", "val_acc", "test_acc", "test_loss"):
        assert runs[f"metrics.{metric}"].notna().all(), metric
    assert runs["metrics.test_acc"].between(0, 1).all()
    for tag in ("mlflow.source.git.commit", "torch_version", "device", "cell_group", "debug"):
        assert runs[f"tags.{tag}"].notna().all(), tag

    for cost in ("wall_time_s", "train_images_per_s", "peak_rss_mb"):
        assert (runs[f"metrics.{cost}"] > 0).all(), cost
    assert runs["tags.sweep"].nunique() == 1  # the sweep's cells are grouped
    sweeps = runs_in(tmp_path / "mlflow.db", kind="sweep")
    assert len(sweeps) == 1 and sweeps.status.iloc[0] == "FINISHED"
    assert sweeps["metrics.cells_finished"].iloc[0] == 4
    assert set(runs["tags.mlflow.parentRunId"]) == {sweeps.run_id.iloc[0]}  # the sweep is a tree
    assert set(runs["tags.benchmark.harness"]) == {"benchmark"}
    assert (runs["metrics.best_val_acc"] >= 0).all() and runs["params.input"].notna().all()

    run_id = runs.run_id.iloc[0]
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "manifest.csv", "skipped_files.csv", "confusion_matrix.png"} <= artifacts
    confusion = client.download_artifacts(run_id, "confusion_matrix.json", str(tmp_path))
    confusion = json.loads(Path(confusion).read_text())
    assert confusion["classes"] == ["ants", "bees"]
    assert sum(map(sum, confusion["matrix"])) == 4  # one test batch of 4 images
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_acc")
    assert [m.step for m in history] == [0]  # one value per epoch, stepped by epoch
    rates = [c for c in runs.columns if c.startswith("metrics.lr-")]  # LearningRateMonitor
    assert rates and runs[rates].gt(0).any(axis=1).all(), rates  # a learning-rate curve per cell

    table = report_of_tiny_runs(tmp_path, shared_data)
    assert len(table) == 4 and (table.n == 1).all()
    merged = table.merge(
        runs.rename(columns={"params.colour": "colour", "params.strategy": "strategy"})
    )
    assert (merged.test_acc_mean - merged["metrics.test_acc"]).abs().max() < 1e-6
    assert table.study_val_acc.notna().all()
    markdown = (tmp_path / "results" / "report.md").read_text()
    assert "| hymenoptera | gray" in markdown and "max val (freeze)" in markdown
    assert "0.961" in markdown and "▼" not in markdown  # the study beside ours, not subtracted


def test_missing_dataset_fails_clearly_before_any_run_opens(tmp_path, shared_data):
    empty = tmp_path / "no-data"
    failed = benchmark("benchmark", "dataset.download=false", *TINY, cwd=tmp_path, data_root=empty)
    assert failed.returncode != 0
    assert f"Hymenoptera not found at {empty / 'hymenoptera_data'}" in failed.stdout
    assert "Traceback" not in failed.stdout + failed.stderr
    store = tmp_path / "mlflow.db"  # bad input is refused before a run opens: nothing to clean
    assert not store.exists() or runs_in(store).empty
    (outcome,) = (tmp_path / "outputs").rglob("outcome.json")
    assert "Hymenoptera not found" in json.loads(outcome.read_text())["error"]


def test_own_folder_and_csv_end_to_end_and_a_failing_cell_stops_nothing(
    tmp_path, shared_data, tmp_store
):
    """A sweep on Hydra's own launcher over the user's folder and CSV, two of whose four cells
    fail (a value out of range): the others finish, the sweep says so, a relaunch skips them."""
    folder = tmp_path / "my_images"
    for name in ("ants", "bees"):
        shutil.copytree(shared_data / "hymenoptera_data" / "val" / name, folder / name)
    photos = sorted((shared_data / "dogs-vs-cats" / "train").glob("*.jpg"))
    rows = [(str(p), p.name.split(".")[0]) for p in photos[:20] + photos[-20:]]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "labels.csv", index=False)

    command = [
        "benchmark", "-m", "dataset=imagefolder,csv", "trainer.max_epochs=1,-1",
        f"dataset.root={folder}", f"dataset.file={tmp_path / 'labels.csv'}", "strategy=freeze",
        *(o for o in TINY if not o.startswith("trainer.max_epochs")),
    ]  # fmt: skip
    swept = benchmark(*command, cwd=tmp_path, data_root=shared_data)
    assert swept.returncode != 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert "Sweep done: 4 cells: 2 finished, 0 skipped, 2 failed." in swept.stdout, swept.stdout
    assert swept.stdout.count("trainer.max_epochs=-1: must be an integer >= 1") >= 2
    runs = runs_in(tmp_path / "mlflow.db").set_index("params.dataset")
    assert set(runs.status) == {"FINISHED"} and len(runs) == 2  # bad input opens no run
    assert runs.loc["imagefolder", "params.n_test"] == "31"  # 20% of 70 ants + 83 bees
    assert runs.loc["csv", "params.n_classes"] == "2"
    assert runs["params.manifest_sha256"].str.len().eq(64).all()
    (sweep,) = runs_in(tmp_path / "mlflow.db", kind="sweep").status
    assert sweep == "FAILED"  # the sweep's parent run says a cell failed

    again = benchmark(*command, cwd=tmp_path, data_root=shared_data)
    assert "Sweep done: 4 cells: 0 finished, 2 skipped, 2 failed." in again.stdout, again.stdout
    runs = runs_in(tmp_path / "mlflow.db")
    assert len(runs) == 2 and set(runs.status) == {"FINISHED"}  # no duplicate of a finished cell


def test_every_strategy_appears_in_the_report(make_cfg, tmp_path):
    """In-process (the command line's path is the four-cell grid's above): each strategy with
    an MLP head, AdamW and strong augmentation, then the report's table and its header."""
    from benchmark.cell.run import run_cell
    from benchmark.report.__main__ import main as report

    strategies = ["finetune", "freeze", "freeze_bn_train", "partial", "two_stage"]
    for strategy in strategies:
        run_cell(
            make_cfg(
                f"strategy={strategy}", "head=mlp", "optim=adamw_cosine", "augment=strong", *TINY
            )
        )
    uri, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "results"
    assert report(["--tracking-uri", uri, "--out", str(out), "--include-debug"]) == 0
    table = pd.read_csv(out / "report.csv")
    assert sorted(table.strategy) == sorted(strategies) and (table.n == 1).all()
    header = (out / "report.md").read_text().split("\n")
    row = next(line for line in header if line.startswith("| dataset"))
    assert all(s in row for s in strategies)
