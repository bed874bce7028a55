"""trainer=ddp: one cell on several processes (gloo on the CPU here), logged once, by rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from tests.conftest import TINY
from tests.test_e2e import benchmark, runs_in

pytestmark = pytest.mark.e2e

# Two CPU ranks; each sees its own shard (DistributedSampler), one batch of 4 per split.
DDP_CPU = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
]


def test_ddp_under_the_basic_multirun_launcher_is_refused_before_any_cell(tmp_path, shared_data):
    swept = benchmark(
        "benchmark", "-m", "seed=0,1", *DDP_CPU, *TINY, cwd=tmp_path, data_root=shared_data
    )
    assert swept.returncode != 0
    assert "hydra/launcher=gpus" in swept.stdout and "re-run the whole sweep" in swept.stdout
    assert not list(tmp_path.rglob("outcome.json"))  # no cell ran, none re-ran the sweep
    store = tmp_path / "mlflow.db"
    assert not store.exists() or runs_in(store).empty


def test_a_ddp_cell_runs_two_ranks_and_logs_one_run_from_rank_zero(
    tmp_path, shared_data, tmp_store
):
    """Under hydra/launcher=gpus (a cell's own process, which Lightning re-runs for rank 1,
    as it re-runs a single `python -m benchmark` cell)."""
    swept = benchmark(
        "benchmark",
        "-m",
        "hydra/launcher=gpus",
        "hydra.launcher.workers=1",
        "seed=3",
        *DDP_CPU,
        "strategy=finetune",
        *TINY,
        cwd=tmp_path,
        data_root=shared_data,
    )
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert "Sweep done: 1 cells: 1 finished, 0 skipped, 0 failed." in swept.stdout
    (log,) = (tmp_path / "multirun").rglob("cell.log")
    assert "Starting with 2 processes" in log.read_text()  # Lightning's DDP banner
    folder = log.parent
    assert (folder / "train_ddp_process_1.log").is_file()  # rank 1 re-ran this very cell

    runs = runs_in(tmp_path / "mlflow.db")
    assert len(runs) == 1, runs[["run_id", "status"]]  # rank 1 opened no run of its own
    run = runs.iloc[0]
    assert run.status == "FINISHED" and 0 <= run["metrics.test_acc"] <= 1
    assert run["params.trainer.strategy"] == "ddp" and run["params.trainer.devices"] == "2"
    assert run["metrics.train_images_per_s"] > 0
    # The test predictions of both ranks, gathered by the metric: 2 ranks x 1 batch of 4.
    client = mlflow.MlflowClient()
    confusion = client.download_artifacts(run.run_id, "confusion_matrix.json", str(tmp_path))
    confusion = json.loads(Path(confusion).read_text())
    assert sum(map(sum, confusion["matrix"])) == 8
    assert len(client.get_metric_history(run.run_id, "val_loss")) == 1  # once, not per rank
    outcome = json.loads((folder / "outcome.json").read_text())
    assert outcome["status"] == "finished" and outcome["run_id"] == run.run_id


def test_a_ddp_trainer_is_recognised_whatever_its_precision(make_cfg):
    from benchmark.orchestration.distributed import relaunches_command

    for precision in ("auto", "32-true", "bf16-mixed"):
        ddp = make_cfg(*DDP_CPU, f"trainer.precision={precision}")
        assert relaunches_command(ddp.trainer), precision
    assert not relaunches_command(make_cfg().trainer)
