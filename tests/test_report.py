"""Golden-file tests of the report on a tracking store with known runs: three seeds, a rerun, a
failed cell, a running cell and never-run cells."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from benchmark.report.__main__ import main as report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# (dataset, colour, strategy, seed, status, test_acc, start order)
RUNS = [
    ("hymenoptera", "rgb", "finetune", 0, "FINISHED", 0.90, 1),
    ("hymenoptera", "rgb", "finetune", 1, "FINISHED", 0.92, 2),
    ("hymenoptera", "rgb", "finetune", 2, "FINISHED", 0.94, 3),
    ("hymenoptera", "rgb", "freeze", 0, "FINISHED", 0.50, 4),  # replaced by its rerun below
    ("hymenoptera", "rgb", "freeze", 1, "FINISHED", 0.95, 5),
    ("hymenoptera", "rgb", "freeze", 2, "FINISHED", 0.97, 6),
    ("hymenoptera", "rgb", "freeze", 0, "FINISHED", 0.96, 7),  # the rerun: counts
    ("hymenoptera", "gray", "finetune", 0, "FAILED", None, 8),
    ("hymenoptera", "gray", "finetune", 1, "FINISHED", 0.88, 9),
    ("hymenoptera", "gray", "freeze", 0, "FAILED", None, 10),
    ("dogs_vs_cats", "rgb", "finetune", 0, "RUNNING", None, 11),
    ("hymenoptera", "rgb", "finetune", 2, "FAILED", None, 12),  # a later failed retry: 0.94 counts
]

# Checked by hand: 0.92 ± 0.02 = mean/sd of 0.90, 0.92, 0.94; the freeze rerun (0.96) replaces 0.50.
GOLDEN = Path(__file__).parent / "golden" / "report_table.md"

pytestmark = pytest.mark.foreign_runs  # runs written by hand, as another tool would


@pytest.fixture
def store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("benchmark", (tmp_path / "artifacts").as_uri())
    for dataset, colour, strategy, seed, status, accuracy, order in RUNS:
        run = client.create_run(experiment, start_time=1_000_000 + order)
        params = {
            "dataset": dataset,
            "colour": colour,
            "strategy": strategy,
            "backbone": "efficientnet_lite0",
            "seed": str(seed),
        }
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_tag(run.info.run_id, "device", "cpu")
        if accuracy is not None:
            for epoch, value in enumerate([accuracy - 0.1, accuracy]):
                client.log_metric(run.info.run_id, "val_acc", value, step=epoch)
            client.log_metric(run.info.run_id, "test_acc", accuracy)
            client.log_metric(run.info.run_id, "wall_time_s", 100.0 + order)
            client.log_metric(run.info.run_id, "train_images_per_s", 10.0)
            client.log_metric(run.info.run_id, "peak_rss_mb", 2000.0)
            with mlflow.start_run(run_id=run.info.run_id):
                confusion = {"classes": ["ants", "bees"], "matrix": [[8, 2], [1, 9]]}
                mlflow.log_dict(confusion, "confusion_matrix.json")
        if status != "RUNNING":
            client.set_terminated(run.info.run_id, status)
    return uri


def test_tables_match_the_golden_file(store, tmp_path):
    assert report(["--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert GOLDEN.read_text() in markdown
    assert "the latest FINISHED run counts" in markdown and "Cost per cell" in markdown
    table = pd.read_csv(tmp_path / "out" / "report.csv").set_index(
        ["dataset", "colour", "strategy"]
    )
    assert len(table) == 8  # 2 datasets x 2 colours x 2 strategies, never-run ones included
    finetune = table.loc[("hymenoptera", "rgb", "finetune")]
    assert (finetune.n, finetune.test_acc_mean, finetune.test_acc_sd) == (3, 0.92, 0.02)
    freeze = table.loc[("hymenoptera", "rgb", "freeze")]
    assert (freeze.n, freeze.test_acc_mean, freeze.test_acc_sd) == (3, 0.96, 0.01)
    assert table.loc[("hymenoptera", "gray", "freeze")].state == "failed"
    assert table.loc[("dogs_vs_cats", "rgb", "finetune")].state == "running"
    assert table.loc[("dogs_vs_cats", "gray", "freeze")].state == "not run"
    assert finetune.wall_time_s == 102.0  # mean of 101, 102, 103
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert "\\toprule" in tex and "0.920 ± 0.020 (n=3)" in tex


def test_html_page_is_self_contained_with_its_pictures(store, tmp_path):
    assert report(["--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 + 3  # bars, curves, 3 confusions
    assert "http" not in page.replace("http-equiv", "")  # nothing fetched from elsewhere
    assert "0.920 ± 0.020 (n=3)" in page


def test_missing_experiment_and_a_misspelt_store_are_clear_errors(store, tmp_path, capsys):
    assert report(["--tracking-uri", store, "--experiment", "other", "--out", str(tmp_path)]) == 1
    assert "no experiment 'other'" in capsys.readouterr().err
    misspelt = tmp_path / "mlfow.db"
    assert report(["--tracking-uri", f"sqlite:///{misspelt}", "--out", str(tmp_path)]) == 1
    assert f"no tracking store at {misspelt}" in capsys.readouterr().err
    assert not misspelt.exists()  # nothing created


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it)",
)
def test_html_renders_in_a_real_browser_without_errors(store, tmp_path):
    assert report(["--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            (tmp_path / "out" / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Uncaught" not in done.stderr and "CONSOLE" not in done.stderr
    assert shot.stat().st_size > 10_000
