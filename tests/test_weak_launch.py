"""Issue 37, the launch's weak cases: each ends in one line naming the problem and the fix, with
the run's state right and nothing lost. CUDA_VISIBLE_DEVICES naming GPUs that torch does not
see (a machine without one, a CPU-only torch, a broken driver) under hydra/launcher=gpus; an
artifact folder of the tracking store that refuses writes (read-only, no permission, full)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from benchmark.cell.run import run_cell
from benchmark.orchestration import launcher as launcher_module
from benchmark.orchestration.launcher import CellProcessLauncher
from benchmark.orchestration.sweep import CellOutcome
from benchmark.tracking import store
from benchmark.tracking.store import StoreError
from tests.conftest import TINY

# ---------------------------------------------------------------- 1. GPUs torch does not see


def _launcher(tmp_path: Path, store_file: Path, workers: int = 1, **config: object) -> tuple:
    """The gpus launcher over a store, its cells stubbed: each cell's process is one that has
    ended FINISHED at once (its outcome written), and the environment it was given is kept."""
    launcher = CellProcessLauncher(workers=workers, poll_seconds=0.01)
    launcher.config = OmegaConf.create(
        {
            "hydra": {"hydra_logging": None, "verbose": False, "sweep": {"dir": str(tmp_path)}},
            "tracking": {"uri": f"sqlite:///{store_file}", "experiment": "benchmark"},
            **config,
        }
    )
    launcher.hydra_context = SimpleNamespace(callbacks=SimpleNamespace(on_job_end=lambda **k: None))
    started: list[dict[str, str]] = []

    def prepare(index, overrides, sweep_dir):
        (folder := sweep_dir / str(index)).mkdir(parents=True, exist_ok=True)
        return launcher.config, folder

    def popen(command, env, **kwargs):
        started.append(env)
        folder = Path(command[-1].removeprefix("hydra.run.dir="))
        CellOutcome(" ".join(command[3:-1]), "finished", 0.9, f"run-{folder.name}").save(folder)
        return SimpleNamespace(returncode=0, poll=lambda: 0)

    launcher._prepare = prepare
    launcher._finished_earlier = lambda *args: None
    return launcher, started, popen


@pytest.fixture
def quiet_hydra(monkeypatch):
    monkeypatch.setattr(launcher_module, "setup_globals", lambda: None)
    monkeypatch.setattr(launcher_module, "configure_log", lambda *args: None)


def test_cuda_visible_devices_without_a_gpu_torch_sees_is_one_line_then_cpu_workers(
    tmp_path, tmp_store, monkeypatch, caplog, quiet_hydra
):
    """It said "Launching 2 cells on GPUs 0" and then ran them one at a time on the CPU (each
    cell's torch found no GPU): now the launcher goes by what torch sees, says so in one line,
    and runs the cells on its CPU workers, as it would without the variable."""
    caplog.set_level(logging.INFO, logger="benchmark")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no GPU, even on a GPU machine
    launcher, started, popen = _launcher(tmp_path, tmp_store, workers=2)
    monkeypatch.setattr(subprocess, "Popen", popen)
    returns = launcher.launch([["seed=0"], ["seed=1"]], 0)
    assert [job.return_value.status for job in returns] == ["finished", "finished"]
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1, said  # one line: the problem, what happens, the fix
    (line,) = said
    assert "\n" not in line
    assert line.startswith("CUDA_VISIBLE_DEVICES=0 but torch sees no GPU (")
    assert "launching 2 cells on 2 CPU worker(s)" in line
    assert "unset CUDA_VISIBLE_DEVICES" in line
    lines = caplog.text
    assert "on GPUs" not in lines and "on GPU 0" not in lines, lines
    assert lines.count("starts (cell") == 2 and lines.count(" on CPU ") == 2, lines
    # Each cell got the environment it had (no GPU named for it by the launcher).
    assert [env.get("CUDA_VISIBLE_DEVICES") for env in started] == ["0", "0"]


def test_cuda_visible_devices_naming_more_gpus_than_torch_sees_launches_on_those_it_sees(
    tmp_path, tmp_store, monkeypatch, caplog, quiet_hydra
):
    """CUDA's rule: the devices after the first that does not exist are not seen. A cell given
    GPU 7 of a two-GPU machine ran on the CPU; the launcher now uses GPUs 0 and 1 only."""
    caplog.set_level(logging.INFO, logger="benchmark")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launcher, started, popen = _launcher(tmp_path, tmp_store)
    monkeypatch.setattr(subprocess, "Popen", popen)
    launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], 0)
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith("CUDA_VISIBLE_DEVICES=0,1,7 names 3 GPUs but torch sees 2: ")
    assert "launching 3 cells on GPUs 0 | 1" in line
    assert sorted({env["CUDA_VISIBLE_DEVICES"] for env in started}) == ["0", "1"]


def test_gpus_torch_sees_are_launched_on_without_a_word(
    tmp_path, tmp_store, monkeypatch, caplog, quiet_hydra
):
    caplog.set_level(logging.INFO, logger="benchmark")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    launcher, started, popen = _launcher(tmp_path, tmp_store)
    monkeypatch.setattr(subprocess, "Popen", popen)
    launcher.launch([["seed=0"], ["seed=1"]], 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "Launching 2 cells on GPUs 2 | 5" in caplog.text
    assert sorted(env["CUDA_VISIBLE_DEVICES"] for env in started) == ["2", "5"]


def test_a_sweep_asking_for_the_gpu_without_one_torch_sees_is_refused_in_one_line(
    tmp_path, tmp_store, monkeypatch, caplog, quiet_hydra
):
    """trainer=gpu (accelerator gpu): every cell would fail on the CPU, one after the other."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    launcher, started, popen = _launcher(tmp_path, tmp_store, trainer={"accelerator": "gpu"})
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(SystemExit) as stopped:
        launcher.launch([["seed=0"], ["seed=1"]], 0)
    assert stopped.value.code == 2 and not started
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith("CUDA_VISIBLE_DEVICES=0 but torch sees no GPU (")
    assert "trainer.accelerator=gpu" in line and "\n" not in line


# ---------------------------------------------------------------- 2. an artifact folder refusing


def _refusing(monkeypatch, folder: Path, code: int) -> None:
    """New files and folders in `folder` fail with `code`, as in a read-only folder for a user,
    on a read-only file system or a full disk (the tests run as root, who writes anyway)."""
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path) -> bool:
        return Path(path).resolve().is_relative_to(folder.resolve())

    def opening(path, flags, *args, **kwargs):
        if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    def making(path, *args, **kwargs):
        if inside(path) and Path(path).resolve() != folder.resolve():
            raise OSError(code, os.strerror(code), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", opening)
    monkeypatch.setattr(os, "mkdir", making)


@pytest.mark.parametrize(
    ("code", "said", "fix"),
    [
        (errno.EACCES, "permission denied", "make {} writable"),
        (errno.EPERM, "operation not permitted", "make {} writable"),
        (errno.EROFS, "read-only file system", "make {} writable"),
        (errno.ENOSPC, "no space left on device", "free some space on the disk of {}"),
    ],
)
def test_an_artifact_folder_that_refuses_writes_is_one_line_before_any_run(
    tmp_store, monkeypatch, code, said, fix
):
    uri = f"sqlite:///{tmp_store}"
    folder = tmp_store.parent / "mlartifacts"  # where a SQLite store keeps its runs' files
    folder.mkdir()
    _refusing(monkeypatch, folder, code)
    with pytest.raises(StoreError) as refused:
        store.experiment_id(uri, "benchmark")  # what every cell and launcher does first
    message = str(refused.value)
    assert "\n" not in message and said in message, message
    assert message.startswith(f"cannot write the runs' artifacts in {folder}: ")
    assert fix.format(folder) in message and "tracking.uri" in message
    assert not list(folder.iterdir())  # the check left nothing behind


def test_a_read_only_artifact_folder_stops_the_launcher_before_any_cell(
    tmp_path, tmp_store, monkeypatch, caplog, quiet_hydra
):
    folder = tmp_store.parent / "mlartifacts"
    folder.mkdir()
    _refusing(monkeypatch, folder, errno.EROFS)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU: nvidia-smi not asked
    launcher, started, popen = _launcher(tmp_path, tmp_store)
    monkeypatch.setattr(subprocess, "Popen", popen)
    with pytest.raises(SystemExit) as stopped:
        launcher.launch([["seed=0"]], 0)
    assert stopped.value.code == 1 and not started
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert line.startswith(f"cannot write the runs' artifacts in {folder}: it is on a read-only")


def _immutable(folder: Path, on: bool) -> bool:
    """`chattr +i`: no new file in `folder`, even for root (False where the file system or the
    container does not allow it)."""
    if shutil.which("chattr") is None:
        return False
    flag = "+i" if on else "-i"
    return subprocess.run(["chattr", flag, str(folder)], capture_output=True).returncode == 0


def test_a_cell_whose_artifact_folder_is_read_only_stops_before_its_run_in_one_line(
    make_cfg, tmp_path
):
    """Real, as root too: the folder made immutable. The cell failed in its first artifact with
    "PermissionError: [Errno 1] Operation not permitted: '.../mlartifacts/<run>'", its run
    FAILED with that traceback; now it stops before it opens a run or trains."""
    cfg = make_cfg("strategy=linear_probe", *TINY)
    store.experiment_id(cfg.tracking.uri, cfg.tracking.experiment)
    folder = tmp_path / "mlartifacts"
    folder.mkdir(exist_ok=True)
    if not _immutable(folder, True):
        pytest.skip("chattr +i is not allowed here")
    try:
        with pytest.raises(StoreError) as refused:
            run_cell(cfg)
    finally:
        _immutable(folder, False)
    message = str(refused.value)
    assert message.startswith(f"cannot write the runs' artifacts in {folder}: ")
    assert "operation not permitted" in message and f"make {folder} writable" in message
    mlflow.set_tracking_uri(cfg.tracking.uri)
    assert mlflow.search_runs(experiment_names=["benchmark"]).empty  # no run opened, none left
