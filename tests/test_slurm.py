"""hydra/launcher=slurm: the grid as SLURM jobs through hydra-submitit-launcher, with the knobs a
cluster needs; hydra/launcher=slurm_local runs the same code path as local processes."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
from omegaconf import DictConfig

from benchmark.config.schema import register_configs
from benchmark.orchestration.launcher import ReportsCellsHere
from tests.conftest import CONF, TINY
from tests.test_e2e import benchmark, runs_in

KNOBS = {
    "partition": "gpu",
    "account": "vision",
    "timeout_min": 90,
    "nodes": 1,
    "gpus_per_node": 4,
    "tasks_per_node": 4,
    "cpus_per_task": 6,
    "mem_gb": 200,
    "array_parallelism": 8,
}


def launcher_config(name: str, *overrides: str) -> DictConfig:
    """hydra.launcher as `python -m benchmark -m hydra/launcher=NAME ...` composes it."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"hydra/launcher={name}", *overrides],
            return_hydra_config=True,
        )
    return cfg.hydra.launcher


def test_the_slurm_launcher_composes_with_its_knobs():
    defaults = launcher_config("slurm")
    assert defaults.tasks_per_node == 1 and defaults.gpus_per_node == 1
    assert defaults.submitit_folder.endswith("/.submitit/%j")
    launcher = launcher_config("slurm", *(f"hydra.launcher.{k}={v}" for k, v in KNOBS.items()))
    assert {key: launcher[key] for key in KNOBS} == KNOBS
    cls = get_class(launcher._target_)
    assert issubclass(cls, SlurmLauncher) and issubclass(cls, ReportsCellsHere)
    local = get_class(launcher_config("slurm_local")._target_)
    assert issubclass(local, LocalLauncher) and issubclass(local, ReportsCellsHere)


def test_the_slurm_launcher_refuses_a_misspelt_knob():
    with pytest.raises(Exception, match="partitoin"):
        launcher_config("slurm", "hydra.launcher.partitoin=gpu")


@pytest.mark.e2e
def test_a_grid_through_submitit_processes_finishes_and_is_summarised(
    tmp_path, shared_data, tmp_store
):
    swept = benchmark(
        "benchmark",
        "-m",
        "hydra/launcher=slurm_local",
        "seed=0,1",
        "strategy=finetune",
        *TINY,
        cwd=tmp_path,
        data_root=shared_data,
    )
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in swept.stdout
    # Each cell's JobReturn came back to the sweep's process and was counted there.
    assert "Sweep done: 2 cells: 2 finished, 0 skipped, 0 failed." in swept.stdout
    # While submitit waited, each cell's end was said as it came: k/N, elapsed, time left.
    assert "[1/2 done, " in swept.stdout and "about" in swept.stdout
    assert "[2/2 done, " in swept.stdout
    runs = runs_in(tmp_path / "mlflow.db")
    assert sorted(runs.status) == ["FINISHED", "FINISHED"]
    assert sorted(runs["params.seed"]) == ["0", "1"] and runs["metrics.test_acc"].notna().all()
    assert runs["tags.sweep"].nunique() == 1
    assert len(list((tmp_path / "multirun").rglob("outcome.json"))) == 2
