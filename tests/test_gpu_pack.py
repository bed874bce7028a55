"""What travels to a lent GPU machine fits its 64 MiB: the tracked tree within its share (with room
for the results grid to grow to its complete size), the grid's cells logging no system metrics, and
`benchmark.tools.slim` cutting a store down to what the report reads."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import mlflow
import pytest

from benchmark.tools.slim import main as slim_main
from benchmark.tools.slim import slim
from benchmark.tracking.store import StoreError, artifact_file

PROJECT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_pack", PROJECT / "scripts" / "gpu_pack.py")
assert spec and spec.loader
gpu_pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_pack)


def tracked_bytes(*paths: str) -> int:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", *paths],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return sum((PROJECT / f).stat().st_size for f in listed if f and (PROJECT / f).is_file())


# Runs in results/grid/mlflow.db once `make results` is complete (the grid of protocol v2): 140
# cells (120 tuned, 20 protocol=study), their sweeps' parent runs, and about 10 % for cells that
# are cut off and run again (slim deletes the trials' child runs: tune_trials.json records them).
GRID_RUNS_WHEN_COMPLETE = 160


def empty_store_bytes(folder: Path) -> int:
    """An MLflow SQLite store with no run (its schema), vacuumed as the committed one is."""
    store = folder / "empty.db"
    mlflow.MlflowClient(f"sqlite:///{store}").search_experiments()
    with closing(sqlite3.connect(store)) as db:
        db.execute("VACUUM")
    return store.stat().st_size


def test_the_tracked_tree_leaves_room_for_the_pack_and_the_complete_grid(tmp_path):
    tree, grid = tracked_bytes(), tracked_bytes("results/grid")
    with closing(sqlite3.connect(PROJECT / "results" / "grid" / "mlflow.db")) as store:
        (runs,) = store.execute("SELECT count(*) FROM runs").fetchone()
    empty = empty_store_bytes(tmp_path)  # the schema: paid once, not per run
    # (a store the grid has only just started in holds no run yet: nothing to scale)
    complete = empty + (grid - empty) * max(1.0, GRID_RUNS_WHEN_COMPLETE / max(runs, 1))
    assert gpu_pack.PACK_BUDGET + gpu_pack.TREE_BUDGET <= gpu_pack.LIMIT_BYTES
    assert tree - grid + complete <= gpu_pack.TREE_BUDGET, (
        f"the tracked tree is {tree / 2**20:.1f} MiB (results/grid {grid / 2**20:.1f} MiB, "
        f"{runs} runs): with the grid at {GRID_RUNS_WHEN_COMPLETE} runs it would pass its "
        f"{gpu_pack.TREE_BUDGET / 2**20:.0f} MiB share of what a GPU machine carries "
        "(python -m benchmark.tools.slim on the committed stores)"
    )


def test_the_pack_is_for_python_3_12_unless_asked():
    dry = subprocess.run(
        ["make", "-n", "gpu-pack"], cwd=PROJECT, capture_output=True, text=True, check=True
    ).stdout
    assert "--pythons 3.12 " in dry + " "
    more = subprocess.run(
        ["make", "-n", "gpu-pack", "GPU_PYTHONS=3.11,3.12"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--pythons 3.11,3.12" in more


def test_the_pack_takes_the_smallest_images_of_each_class_and_split(tmp_path):
    root = tmp_path / "src" / "hymenoptera_data"
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for name, size in (("a.jpg", 300), ("b.jpg", 100), ("c.jpg", 200)):
                (root / split / label / name).write_bytes(b"x" * size)
    assert gpu_pack.copy_images(tmp_path / "src", tmp_path / "out", 2) == 8
    kept = sorted(p.name for p in (tmp_path / "out/hymenoptera_data/train/ants").iterdir())
    assert kept == ["b.jpg", "c.jpg"]


def test_the_results_cells_log_no_system_metrics():
    dry = subprocess.run(
        ["make", "-n", "results", "backbones"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")  # the recipes' continued lines as one command each
    cells = [line for line in dry.splitlines() if re.search(r"-m benchmark(\.tools\.rank)? ", line)]
    assert len(cells) == 6  # results: the plan, the datasets' loop, study; backbones: three
    assert all("tracking.system_metrics=false" in line for line in cells), cells
    slims = [line for line in dry.splitlines() if "-m benchmark.tools.slim" in line]
    assert len(slims) == 2  # each store slimmed before its report


def a_store_with_one_run(
    tmp_path: Path, empty_store: Path, status: str = "FINISHED"
) -> tuple[str, str]:
    """A store with a run as a grid cell leaves it: a learning curve, a test accuracy, system
    metric samples, and its artifacts beside the store."""
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(empty_store, store)
    uri = f"sqlite:///{store}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment(
        "benchmark", artifact_location=(store.parent / "mlartifacts").as_uri()
    )
    run = client.create_run(experiment, tags={"benchmark.harness": "benchmark"})
    run_id = run.info.run_id
    for step, value in enumerate((0.5, 0.7, 0.8)):
        client.log_metric(run_id, "val_acc", value, step=step)
        client.log_metric(run_id, "system/cpu_utilization_percentage", 50.0 + step, step=step)
        client.log_metric(run_id, "system/system_memory_usage_megabytes", 900.0, step=step)
    client.log_metric(run_id, "test_acc", 0.75)
    client.log_param(run_id, "dataset", "hymenoptera")
    files = tmp_path / "files"
    (files / "hydra").mkdir(parents=True)
    (files / "confusion_matrix.json").write_text(json.dumps({"classes": ["a"], "matrix": [[1]]}))
    (files / "tune_trials.json").write_text(json.dumps({"columns": ["value"], "data": [[0.8]]}))
    (files / "manifest.csv").write_text("path,label,split\n" * 1000)
    (files / "hydra" / "config.yaml").write_text("seed: 0\n")
    client.log_artifacts(run_id, str(files))
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return uri, run_id


def test_slim_keeps_what_the_report_reads_and_drops_the_rest(tmp_path, empty_store):
    uri, run_id = a_store_with_one_run(tmp_path, empty_store)
    store = Path(uri.removeprefix("sqlite:///"))
    done = slim(uri)
    assert done.samples_deleted == 6 and done.files_deleted == 2
    assert done.artifacts_after < done.artifacts_before
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert set(run.data.metrics) == {"val_acc", "test_acc"}  # system/* gone, the rest kept
    assert [m.value for m in client.get_metric_history(run_id, "val_acc")] == [0.5, 0.7, 0.8]
    assert run.data.params == {"dataset": "hymenoptera"} and run.info.status == "FINISHED"
    kept = artifact_file(uri, run_id, run.info.artifact_uri, "confusion_matrix.json")
    assert kept is not None and json.loads(kept.read_text())["matrix"] == [[1]]
    left = sorted(p.name for p in (store.parent / "mlartifacts").rglob("*") if p.is_file())
    assert left == ["confusion_matrix.json", "tune_trials.json"]  # the tuning's record stays
    with closing(sqlite3.connect(store)) as db:  # vacuumed: no free pages left behind
        assert db.execute("pragma freelist_count").fetchone()[0] == 0


def test_slim_deletes_the_trial_runs_and_keeps_their_cells_record(tmp_path, empty_store):
    """A tuned cell's trials are child runs (about 10 a cell, 900 in the grid): the committed
    store keeps the cell and its tune_trials.json, not them, nor their artifacts."""
    uri, cell = a_store_with_one_run(tmp_path, empty_store)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_run(cell).info.experiment_id
    trials = []
    for number in range(3):
        trial = client.create_run(
            experiment,
            tags={"benchmark.kind": "trial", "mlflow.parentRunId": cell},
            run_name=f"trial {number + 1}/16",
        )
        client.log_metric(trial.info.run_id, "val_acc", 0.5, step=0)
        client.log_param(trial.info.run_id, "strategy.lr", "0.01")
        client.log_text(trial.info.run_id, "curve", "trial.txt")
        client.set_terminated(trial.info.run_id)
        trials.append(trial.info.run_id)
    done = slim(uri)
    assert done.trials_deleted == 3
    left = {r.info.run_id for r in client.search_runs([experiment])}
    assert left == {cell}
    store = Path(uri.removeprefix("sqlite:///"))
    with closing(sqlite3.connect(store)) as db:
        for table in ("metrics", "latest_metrics", "params", "tags"):
            marks = ",".join("?" * len(trials))
            query = f"select count(*) from {table} where run_uuid in ({marks})"
            assert db.execute(query, trials).fetchone()[0] == 0, table
    assert not [p for t in trials for p in (store.parent / "mlartifacts").glob(f"*/{t}")]
    assert artifact_file(uri, cell, client.get_run(cell).info.artifact_uri, "tune_trials.json")


def test_slim_leaves_a_store_with_a_running_cell_alone(tmp_path, empty_store, capsys):
    uri, run_id = a_store_with_one_run(tmp_path, empty_store, status="RUNNING")
    with pytest.raises(StoreError, match="RUNNING"):
        slim(uri)
    capsys.readouterr()
    assert slim_main(["--tracking-uri", uri]) == 1
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    metrics = mlflow.MlflowClient(uri).get_run(run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics


def test_slim_takes_only_a_local_sqlite_store(capsys):
    assert slim_main(["--tracking-uri", "http://localhost:5000"]) == 1
    assert "not a local SQLite store" in capsys.readouterr().err
