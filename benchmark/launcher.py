"""`hydra/launcher=gpus`: every GPU of one machine busy, one cell per GPU.

Each cell runs in a fresh `python -m benchmark` process with CUDA_VISIBLE_DEVICES set before CUDA
starts (the proven pattern of DomainBed's multi-GPU launcher; Hydra's joblib and submitit local
launchers reuse processes or stack every job on one GPU). The next cell starts as soon as a GPU
frees up. Without a GPU, `hydra.launcher.workers` cells run at a time on the CPU. Each cell's
output goes to `cell.log` in its folder and its outcome to `outcome.json`, read back here.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from benchmark.sweep import CellOutcome

log = logging.getLogger("benchmark")
SWEEP_ENV = "BENCHMARK_SWEEP"  # the sweep folder, for the cells' `sweep` tag


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.benchmark_launcher.GpuLauncher"
    # GPU indices to use; None: every visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi).
    gpus: list[int] | None = None
    # Cells at a time when there is no GPU.
    workers: int = 1
    poll_seconds: float = 0.5
    # Extra environment for every cell, e.g. {OMP_NUM_THREADS: "4"}.
    env: dict[str, str] = field(default_factory=dict)


def register() -> None:
    ConfigStore.instance().store(
        group="hydra/launcher", name="gpus", node=GpuLauncherConf, provider="benchmark"
    )


def visible_gpus() -> list[int]:
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return [int(i) for i in visible.split(",") if i.strip().isdigit()]
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [i for i, line in enumerate(listing.stdout.splitlines()) if line.startswith("GPU ")]


class DevicePool:
    """Slots for concurrent cells: one per GPU ("0", "1", ...), or `workers` CPU slots (None)."""

    def __init__(self, gpus: list[int], workers: int) -> None:
        self.free: list[str | None] = [str(g) for g in gpus] if gpus else [None] * workers

    def acquire(self) -> str | None:
        """A free slot; raises IndexError when all are taken (check `available` first)."""
        return self.free.pop(0)

    @property
    def available(self) -> bool:
        return bool(self.free)

    def release(self, slot: str | None) -> None:
        self.free.append(slot)


@dataclass
class Running:
    process: subprocess.Popen
    index: int
    overrides: list[str]
    slot: str | None
    folder: Path
    config: DictConfig
    started: float


class CellProcessLauncher(Launcher):
    def __init__(
        self,
        gpus: list[int] | None = None,
        workers: int = 1,
        poll_seconds: float = 0.5,
        env: dict[str, str] | None = None,
    ) -> None:
        self.gpus, self.workers, self.poll_seconds = gpus, workers, poll_seconds
        self.env = dict(env or {})

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from benchmark import tracking  # the store and experiment exist before cells race

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        tracking.experiment_id(tracking.tracking_uri(self.config), self.config.tracking.experiment)
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        gpus = visible_gpus() if self.gpus is None else list(self.gpus)
        pool = DevicePool(gpus, self.workers)
        where = f"GPUs {','.join(map(str, gpus))}" if gpus else f"{self.workers} CPU worker(s)"
        log.info("Launching %d cells on %s", len(job_overrides), where)
        pending = deque(enumerate(job_overrides, start=initial_job_idx))
        running: list[Running] = []
        returns: dict[int, JobReturn] = {}
        while pending or running:
            while pending and pool.available:
                index, overrides = pending.popleft()
                running.append(self._start(index, list(overrides), pool.acquire(), sweep_dir))
            time.sleep(self.poll_seconds)
            for cell in [c for c in running if c.process.poll() is not None]:
                running.remove(cell)
                pool.release(cell.slot)
                outcome = CellOutcome.load(cell.folder, " ".join(cell.overrides))
                log.info(
                    "\t#%d %s after %.0fs: %s",
                    cell.index,
                    outcome.status,
                    time.time() - cell.started,
                    " ".join(filter_overrides(cell.overrides)),
                )
                returns[cell.index] = self._finish(
                    cell.overrides, cell.config, cell.folder, outcome
                )
        return [returns[i] for i in sorted(returns)]

    def _start(
        self, index: int, overrides: list[str], slot: str | None, sweep_dir: Path
    ) -> Running:
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = index
        folder = sweep_dir / str(config.hydra.sweep.subdir)
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, SWEEP_ENV: str(sweep_dir)}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        command = [sys.executable, "-m", "benchmark", *overrides, f"hydra.run.dir={folder}"]
        with open(folder / "cell.log", "w") as output:
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        device = f"GPU {slot}" if slot is not None else "CPU"
        log.info("\t#%d on %s: %s", index, device, " ".join(filter_overrides(overrides)))
        return Running(process, index, overrides, slot, folder, config, time.time())

    def _finish(
        self,
        overrides: Sequence[str],
        config: DictConfig | None,
        folder: Path | None,
        outcome: CellOutcome,
    ) -> JobReturn:
        job = JobReturn(
            overrides=list(overrides),
            cfg=config,
            working_dir=str(folder) if folder else None,
            status=JobStatus.COMPLETED,
        )
        job.return_value = outcome
        self.hydra_context.callbacks.on_job_end(config=config, job_return=job)
        return job
