"""`hydra/launcher=gpus`: every GPU of one machine busy, one cell per GPU.

Each cell runs in a fresh `python -m benchmark` process with CUDA_VISIBLE_DEVICES set before CUDA
starts (the proven pattern of DomainBed's multi-GPU launcher; Hydra's joblib and submitit local
launchers reuse processes or stack every job on one GPU). The next cell starts as soon as a GPU
frees up; `gpus_per_cell=K` gives each cell K GPUs (for trainer=ddp). Without a GPU,
`hydra.launcher.workers` cells run at a time on the CPU. Each cell's output goes to `cell.log` in
its folder and its outcome to `outcome.json`, read back here. A cell killed before it could write
one (SIGKILL, out of memory) is failed, and its MLflow run is ended FAILED rather than left RUNNING.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from benchmark.orchestration.sweep import OUTCOME_FILE, CellOutcome
from benchmark.runtime.progress import SweepProgress

log = logging.getLogger("benchmark")


@dataclass
class GpuLauncherConf:
    _target_: str = "hydra_plugins.benchmark_launcher.GpuLauncher"
    # GPU indices to use; None: every visible GPU (CUDA_VISIBLE_DEVICES, else nvidia-smi).
    gpus: list[int] | None = None
    # GPUs each cell gets (CUDA_VISIBLE_DEVICES=a,b): K > 1 for trainer=ddp, whose devices=-1
    # takes every GPU it sees.
    gpus_per_cell: int = 1
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
    """Slots for concurrent cells: one per GPU ("0", "1", ...) or per group of `gpus_per_cell`
    GPUs ("0,1", "2,3"; GPUs left over are not used), or `workers` CPU slots (None)."""

    def __init__(self, gpus: list[int], workers: int, gpus_per_cell: int = 1) -> None:
        if workers < 1:  # an empty pool would wait forever for a free slot
            raise ValueError(
                f"hydra.launcher.workers={workers}: the number of cells run at once without a "
                "GPU must be 1 or more; set hydra.launcher.workers=1 (or more)."
            )
        if gpus_per_cell < 1 or (gpus and len(gpus) < gpus_per_cell):
            raise ValueError(
                f"hydra.launcher.gpus_per_cell={gpus_per_cell}, but the GPUs are {gpus}: "
                "use 1 to len(gpus)."
            )
        whole = len(gpus) - len(gpus) % gpus_per_cell
        groups = [gpus[i : i + gpus_per_cell] for i in range(0, whole, gpus_per_cell)]
        self.free: list[str | None] = (
            [",".join(map(str, group)) for group in groups] if gpus else [None] * workers
        )

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
    # The cell's folder's clock when it started (its fresh cell.log's mtime): an outcome file
    # older than that is an earlier launch's, not this cell's.
    since_ns: int = 0


class CellProcessLauncher(Launcher):
    def __init__(
        self,
        gpus: list[int] | None = None,
        gpus_per_cell: int = 1,
        workers: int = 1,
        poll_seconds: float = 0.5,
        env: dict[str, str] | None = None,
    ) -> None:
        self.gpus, self.gpus_per_cell = gpus, gpus_per_cell
        self.workers, self.poll_seconds = workers, poll_seconds
        self.env = dict(env or {})

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context, self.config = hydra_context, config

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from benchmark.tracking import (  # the store and experiment exist before cells race
            identity,
            store,
        )

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        from benchmark.tracking.server import TrackingUnreachable

        gpus = visible_gpus() if self.gpus is None else list(self.gpus)
        try:
            pool = DevicePool(gpus, self.workers, self.gpus_per_cell)
        except ValueError as error:  # one line, before any cell or store
            log.error("%s", error)
            raise SystemExit(2) from None
        try:
            store.experiment_id(
                identity.store_uri(self.config.tracking.uri), self.config.tracking.experiment
            )
        except (TrackingUnreachable, store.StoreError) as error:  # one line, before any cell
            log.error("%s", error)
            raise SystemExit(1) from None
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        slots = " | ".join(map(str, pool.free))
        where = f"GPUs {slots}" if gpus else f"{self.workers} CPU worker(s)"
        log.info("Launching %d cells on %s", len(job_overrides), where)
        pending = deque(enumerate(job_overrides, start=initial_job_idx))
        running: list[Running] = []
        returns: dict[int, JobReturn] = {}
        progress = SweepProgress(len(job_overrides))
        while pending or running:
            while pending and pool.available:
                index, overrides = pending.popleft()
                config, folder = self._prepare(index, list(overrides), sweep_dir)
                if (done := self._finished_earlier(config, folder, list(overrides))) is not None:
                    progress.start()
                    log.info(
                        "\t#%d skipped: FINISHED earlier in MLflow run %s [%s]",
                        index,
                        done.run_id,
                        progress.done(skipped=True),
                    )
                    done.save(folder)
                    returns[index] = self._finish(list(overrides), config, folder, done)
                    continue
                running.append(
                    self._start(
                        index, list(overrides), config, folder, pool.acquire(), sweep_dir, progress
                    )
                )
            time.sleep(self.poll_seconds)
            for cell in [c for c in running if c.process.poll() is not None]:
                running.remove(cell)
                pool.release(cell.slot)
                outcome = self._outcome(cell)
                log.info(
                    "\t#%d %s after %.0fs [%s]: %s",
                    cell.index,
                    outcome.status,
                    time.time() - cell.started,
                    progress.done(),
                    " ".join(filter_overrides(cell.overrides)),
                )
                returns[cell.index] = self._finish(
                    cell.overrides, cell.config, cell.folder, outcome
                )
        self._end_runs_left_running([returns[i] for i in sorted(returns)])
        return [returns[i] for i in sorted(returns)]

    def _prepare(
        self, index: int, overrides: list[str], sweep_dir: Path
    ) -> tuple[DictConfig, Path]:
        """The cell's config (hydra node included) and its output folder."""
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = config.hydra.job.num = index
            folder = sweep_dir / str(config.hydra.sweep.subdir)
            config.hydra.runtime.output_dir = str(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return config, folder

    def _finished_earlier(
        self, config: DictConfig, folder: Path, overrides: list[str]
    ) -> CellOutcome | None:
        """A cell already FINISHED in the store is not started at all, so that a relaunched
        sweep pays a process only for its missing cells. The key comes from the config as the
        cell would see it (as Hydra's run_job prepares it); if it cannot be computed here, the
        cell's own process decides."""
        if config.rerun:
            return None
        from benchmark.cell.run import finished
        from benchmark.config.spec import from_config

        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # for ${hydra:...} in the cell's config
        try:
            done = finished(from_config(config))  # the cell's own first steps
        except Exception:  # bad data, say: the cell's own process reports it
            log.debug("Cell %s not checked here", folder, exc_info=True)
            return None
        finally:
            HydraConfig.instance().cfg = saved
        if done is None:
            return None
        return CellOutcome(" ".join(overrides), "skipped", done.score, done.run_id)

    def _start(
        self,
        index: int,
        overrides: list[str],
        config: DictConfig,
        folder: Path,
        slot: str | None,
        sweep_dir: Path,
        progress: SweepProgress,
    ) -> Running:
        env = {**os.environ, **self.env}  # with the sweep folder and parent run (SweepSummary)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        command = [sys.executable, "-m", "benchmark", *overrides, f"hydra.run.dir={folder}"]
        with open(folder / "cell.log", "w") as output:
            since_ns = os.fstat(output.fileno()).st_mtime_ns  # the file system's clock, now
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        device = f"GPU {slot}" if slot is not None else "CPU"
        log.info(
            "\t#%d starts (cell %s) on %s [%s]: %s",
            index,
            progress.start(),
            device,
            progress.status(),
            " ".join(filter_overrides(overrides)),
        )
        return Running(process, index, overrides, slot, folder, config, time.time(), since_ns)

    def _outcome(self, cell: Running) -> CellOutcome:
        """What the cell reported. One that died before it could say is failed, with the signal
        or exit code, and the MLflow run it had started is ended FAILED with that reason. An
        outcome file written before the cell started (an earlier launch's, in the same sweep
        folder, e.g. with rerun=true) is not this cell's word: it is replaced by what happened."""
        file = cell.folder / OUTCOME_FILE
        try:
            said_ns: int | None = file.stat().st_mtime_ns if file.is_file() else None
        except OSError:
            said_ns = None
        if said_ns is not None and said_ns >= cell.since_ns:
            return CellOutcome.load(cell.folder, " ".join(cell.overrides))
        from benchmark.tracking import identity, store

        code = cell.process.returncode
        if code < 0:
            reason = f"killed by signal {-code} ({signal.Signals(-code).name})"
        else:
            reason = f"exited with code {code} without an outcome"
        try:
            run_id = store.settle_failed_run(cell.folder / identity.RUN_FILE, reason)
        except Exception:  # the store is unreachable: the run stays RUNNING, the sweep goes on
            log.warning("Could not end the MLflow run of %s", cell.folder, exc_info=True)
            run_id = None
        error = f"{reason}; see {cell.folder / 'cell.log'}"
        outcome = CellOutcome(" ".join(cell.overrides), "failed", run_id=run_id, error=error)
        if said_ns is not None:  # an earlier launch's word there: replaced by what happened
            outcome.save(cell.folder)
        return outcome

    def _end_runs_left_running(self, returns: Sequence[JobReturn]) -> None:
        """A cell that failed because the tracking server went away could neither end nor tag
        its run (nor could `_outcome`, while the server was down): it would stay RUNNING. Once
        the sweep is over, each failed cell's run is ended FAILED with the cell's error, if the
        store answers by then (benchmark.tracking.store.settle_failed_run)."""
        from benchmark.tracking import identity, server, store

        failed = [
            (Path(job.working_dir) / identity.RUN_FILE, job.return_value.error or "failed")
            for job in returns
            if job.working_dir and job.return_value.status == "failed"
        ]
        if not failed:
            return
        try:
            server.check_reachable(identity.store_uri(self.config.tracking.uri))
        except server.TrackingUnreachable as error:
            log.warning("%s The runs of the failed cells may stay RUNNING.", error)
            return
        for run_file, reason in failed:
            try:
                if (run_id := store.settle_failed_run(run_file, reason)) is not None:
                    log.info("\tRun %s of %s ended FAILED, with its error", run_id, run_file.parent)
            except Exception:
                log.warning("Could not end the MLflow run of %s", run_file.parent, exc_info=True)

    def _finish(
        self,
        overrides: Sequence[str],
        config: DictConfig,
        folder: Path,
        outcome: CellOutcome,
    ) -> JobReturn:
        job = JobReturn(
            overrides=list(overrides),
            cfg=config,
            working_dir=str(folder),
            status=JobStatus.COMPLETED,
        )
        job.return_value = outcome
        self.hydra_context.callbacks.on_job_end(config=config, job_return=job)
        return job


class ReportsCellsHere:
    """Mixin for launchers that run each cell in another process and get its JobReturn back
    (hydra-submitit: SLURM jobs or local processes). Hydra calls the callbacks' `on_job_end` in
    that other process, so the sweep's own SweepSummary would hear of no cell: each returned
    JobReturn (its return value the cell's CellOutcome) is reported in the sweep's process too.
    """

    hydra_context: HydraContext
    config: DictConfig

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        watcher = OutcomeWatcher(sweep_dir, len(job_overrides))
        watcher.start()
        try:
            returns = super().launch(job_overrides, initial_job_idx)  # type: ignore[misc]
        finally:
            watcher.stop()
        for job in returns:
            self.hydra_context.callbacks.on_job_end(config=job.cfg, job_return=job)
        return returns


class OutcomeWatcher(threading.Thread):
    """While submitit waits for the jobs, the sweep's log says each cell's end as `k/N done`,
    elapsed, about how long is left: read from the outcome files the cells write in their
    folders (a shared file system, as SLURM sweeps have), those written since the launch."""

    def __init__(self, sweep_dir: Path, total: int, poll_seconds: float = 5.0) -> None:
        super().__init__(daemon=True, name="benchmark-outcomes")
        self.sweep_dir, self.poll_seconds = sweep_dir, poll_seconds
        self.progress = SweepProgress(total)
        self.since = time.time()
        self.seen: set[Path] = set()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.poll_seconds):
            self.poll()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=self.poll_seconds + 5)
        self.poll()  # the cells that ended since the last look

    def poll(self) -> None:
        for file in sorted(self.sweep_dir.glob(f"*/{OUTCOME_FILE}")):
            if file in self.seen or file.stat().st_mtime < self.since:
                continue
            self.seen.add(file)
            outcome = CellOutcome.load(file.parent, file.parent.name)
            state = self.progress.done(skipped=outcome.status == "skipped")
            log.info("\tcell %s [%s]: %s", outcome.status, state, outcome.cell)
