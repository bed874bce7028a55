"""Sweeps lose only what a failure hit: relaunching skips finished cells, a failing cell does not
stop the others, and the sweep says what happened."""

from __future__ import annotations

import mlflow

from benchmark.launcher import DevicePool, visible_gpus
from benchmark.tracking import cell_key
from benchmark.training import run_cell
from tests.conftest import TINY
from tests.test_e2e import benchmark, runs_in


def test_a_finished_cell_is_skipped_and_rerun_runs_it_again(make_cfg):
    cfg = make_cfg("strategy=freeze", *TINY)
    first = run_cell(cfg)
    again = run_cell(cfg)
    assert again.skipped and again.run_id == first.run_id and again.test_acc == first.test_acc
    forced = run_cell(make_cfg("strategy=freeze", *TINY, "rerun=true"))
    assert not forced.skipped and forced.run_id != first.run_id
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["benchmark"])
    assert len(runs) == 2 and set(runs["tags.cell_key"]) == {cell_key(cfg)}


def test_cell_key_ignores_where_and_how_but_not_what(make_cfg, tmp_path):
    base = cell_key(make_cfg(*TINY))
    assert (
        cell_key(
            make_cfg(*TINY, f"paths.output_dir={tmp_path}/x", "trainer.enable_progress_bar=true")
        )
        == base
    )
    assert cell_key(make_cfg(*TINY, "seed=1")) != base
    assert cell_key(make_cfg(*TINY, "strategy.lr=0.5")) != base


def test_a_failing_cell_does_not_stop_the_sweep_and_relaunch_skips_the_rest(tmp_path, shared_data):
    command = ["benchmark", "-m", "dataset=hymenoptera,imagefolder", "strategy=freeze", *TINY]
    first = benchmark(*command, cwd=tmp_path, data_root=shared_data)
    assert first.returncode != 0
    assert "Sweep done: 2 cells: 1 finished, 0 skipped, 1 failed." in first.stdout
    assert "dataset=imagefolder needs dataset.root" in first.stdout
    runs = runs_in(tmp_path / "mlflow.db").set_index("params.dataset")
    assert runs.loc["hymenoptera", "status"] == "FINISHED"
    assert runs.loc["imagefolder", "status"] == "FAILED"

    again = benchmark(*command, cwd=tmp_path, data_root=shared_data)
    assert "Sweep done: 2 cells: 0 finished, 1 skipped, 1 failed." in again.stdout
    runs = runs_in(tmp_path / "mlflow.db")
    assert (runs.status == "FINISHED").sum() == 1  # no duplicate of the finished cell


def test_device_pool_gives_each_running_cell_its_own_gpu_and_reuses_freed_ones():
    pool = DevicePool([0, 1, 3], workers=8)
    held = [pool.acquire() for _ in range(3)]
    assert held == ["0", "1", "3"] and not pool.available  # one cell per GPU, never more
    pool.release("1")
    assert pool.available and pool.acquire() == "1"
    cpu = DevicePool([], workers=2)
    assert [cpu.acquire(), cpu.acquire()] == [None, None] and not cpu.available


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert visible_gpus() == [2, 5]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_gpu_launcher_runs_cells_in_parallel_processes_and_isolates_failures(tmp_path, shared_data):
    swept = benchmark(
        "benchmark",
        "-m",
        "hydra/launcher=gpus",
        "hydra.launcher.workers=2",
        "dataset=hymenoptera,imagefolder",
        "strategy=finetune,freeze",
        *TINY,
        cwd=tmp_path,
        data_root=shared_data,
    )
    assert "Launching 4 cells on 2 CPU worker(s)" in swept.stdout, swept.stdout + swept.stderr
    assert "Sweep done: 4 cells: 2 finished, 0 skipped, 2 failed." in swept.stdout
    assert swept.returncode != 0  # imagefolder without dataset.root fails, in its own cells
    runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(runs.status) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert runs["tags.sweep"].nunique() == 1
    finished = runs[runs.status == "FINISHED"].sort_values("start_time")
    second_started, first_ended = finished.start_time.iloc[1], finished.end_time.iloc[0]
    assert second_started < first_ended, "the two finished cells did not run at the same time"
    logs = list((tmp_path / "multirun").rglob("cell.log"))
    assert len(logs) == 4 and all((log.parent / "outcome.json").is_file() for log in logs)
