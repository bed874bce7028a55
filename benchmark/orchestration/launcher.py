"""`hydra/launcher=gpus`: every GPU of one machine busy, one cell per GPU.

Each cell runs in a fresh `python -m benchmark` process with CUDA_VISIBLE_DEVICES set before CUDA
starts (the proven pattern of DomainBed's multi-GPU launcher; Hydra's joblib and submitit local
launchers reuse processes or stack every job on one GPU). The next cell starts as soon as a GPU
frees up; `gpus_per_cell=K` gives each cell K GPUs (for trainer=ddp). Without a GPU,
`hydra.launcher.workers` cells run at a time on the CPU. The GPUs are those that torch sees
(`gpus_torch_sees`): GPUs named (CUDA_VISIBLE_DEVICES, nvidia-smi, `hydra.launcher.gpus`) that
torch does not see (no driver, a CPU-only torch, an index past the machine's GPUs) are said in
one line, and the cells run on those it sees, or on the CPU workers. Each cell's output goes to
`cell.log` in its folder and its outcome to `outcome.json`, read back here. A cell killed before
it could write one (SIGKILL, out of memory) is failed, and its MLflow run is ended FAILED rather
than left RUNNING.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from benchmark.orchestration.sweep import OUTCOME_FILE, CellOutcome
from benchmark.runtime.progress import SweepProgress
from benchmark.tracking.result import Status

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


def torch_gpu_count() -> int:
    """How many GPUs torch sees in this process (after CUDA_VISIBLE_DEVICES: those it names up
    to the first that does not exist): 0 with a CPU-only torch, or without a driver or device.
    Through NVML when it answers (no CUDA context in the launcher's process)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA initialization: Found no NVIDIA driver ..."
        return int(torch.cuda.device_count())


def cpu_only_torch() -> bool:
    """This torch is built without CUDA (or ROCm): no GPU for it on any machine."""
    import torch

    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def why_no_gpu() -> tuple[str, str]:
    """Why torch sees no GPU, and what would let it: a CPU-only build of torch, else the driver
    or the device."""
    import torch

    if cpu_only_torch():
        return (
            f"torch {torch.__version__} is a CPU-only build",
            "install a CUDA build of torch (https://pytorch.org/get-started/locally/)",
        )
    return (
        "no NVIDIA driver or device answers",
        "check the driver and the GPUs with nvidia-smi (in a container: --gpus)",
    )


@dataclass
class GpuChoice:
    """The GPUs a sweep runs on, and, when torch does not see all the GPUs named, what is wrong
    and how to fix it (said in one line with what the launcher does instead)."""

    gpus: list[int]
    problem: str | None = None
    fix: str = ""  # what would let torch see them
    on_cpu: str = ""  # what says "the CPU" instead of naming GPUs: "unset CUDA_VISIBLE_DEVICES"


def gpus_torch_sees(named: list[int] | None) -> GpuChoice:
    """The GPUs to launch on: `named` (hydra.launcher.gpus), else those CUDA_VISIBLE_DEVICES or
    nvidia-smi list, kept to those torch sees. (A cell started on a GPU its torch did not see
    ran on the CPU, one cell per such "GPU", after the sweep had said it ran on GPUs.)

    Torch seeing none (a machine without a GPU, a CPU-only torch, a driver that does not
    answer): no GPU, so the CPU workers, as without the GPUs named. Seeing fewer than named:
    those it sees (CUDA's rule: the devices listed after the first that does not exist are not
    seen; `hydra.launcher.gpus` holds the machine's indices). Indices given in
    hydra.launcher.gpus while this process's CUDA_VISIBLE_DEVICES hides GPUs from its torch
    cannot be checked here (each cell gets its own CUDA_VISIBLE_DEVICES): taken as given,
    unless this torch is CPU-only."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible_gpus() if named is None else list(named)
    if not gpus:
        return GpuChoice(gpus)
    listed = ",".join(map(str, gpus))
    if named is not None:
        source, undo = f"hydra.launcher.gpus=[{listed}]", "drop hydra.launcher.gpus"
    elif visible is not None:
        source, undo = f"CUDA_VISIBLE_DEVICES={visible}", "unset CUDA_VISIBLE_DEVICES"
    else:
        source, undo = f"nvidia-smi lists GPU(s) {listed}", ""
    hidden = named is not None and visible is not None  # this process's torch is not the cells'
    seen = torch_gpu_count()
    if seen == 0:
        if hidden and not cpu_only_torch():
            return GpuChoice(gpus)
        why, fix = why_no_gpu()
        return GpuChoice([], f"{source} but torch sees no GPU ({why})", fix, undo)
    if hidden:
        return GpuChoice(gpus)
    # Listed by CUDA_VISIBLE_DEVICES or nvidia-smi: the first `seen`; the machine's: below it.
    kept = gpus[:seen] if named is None else [g for g in gpus if g < seen]
    if len(kept) == len(gpus):
        return GpuChoice(gpus)
    return GpuChoice(
        kept,
        f"{source} names {len(gpus)} GPUs but torch sees {seen}",
        "name only the GPUs there are (nvidia-smi -L)",
    )


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


def prepare_cell(
    hydra_context: HydraContext,
    sweep_config: DictConfig,
    index: int,
    overrides: list[str],
    sweep_dir: Path,
) -> tuple[DictConfig, Path]:
    """The config of the sweep's cell `index` (hydra node included) and its output folder,
    created: the folder Hydra's run_job gives the cell (hydra.sweep.dir / hydra.sweep.subdir)."""
    config = hydra_context.config_loader.load_sweep_config(sweep_config, overrides)
    with open_dict(config):
        config.hydra.job.id = config.hydra.job.num = index
        folder = sweep_dir / str(config.hydra.sweep.subdir)
        config.hydra.runtime.output_dir = str(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return config, folder


def finished_earlier(config: DictConfig, folder: Path, overrides: list[str]) -> CellOutcome | None:
    """A cell already FINISHED in the store is not started at all, so that a relaunched sweep
    pays a process (or a SLURM job) only for its missing cells. The key comes from the config as
    the cell would see it (as Hydra's run_job prepares it); if it cannot be computed here, the
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
    return CellOutcome.of(" ".join(overrides), done)


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

        choice = gpus_torch_sees(self.gpus)
        self._refuse_a_gpu_sweep_without_gpus(choice)
        pool = self._device_pool(choice.gpus)
        identity.use_credentials(self.config.tracking.uri)  # the cells inherit them
        try:
            store.experiment_id(
                identity.store_uri(self.config.tracking.uri), self.config.tracking.experiment
            )
        except (TrackingUnreachable, store.StoreError) as error:  # one line, before any cell
            log.error("%s", error)
            raise SystemExit(1) from None
        sweep_dir = Path(self.config.hydra.sweep.dir).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._say_launching(choice, pool, len(job_overrides))
        returns = self._run_cells(job_overrides, initial_job_idx, pool, sweep_dir)
        self._end_runs_left_running([returns[i] for i in sorted(returns)])
        return [returns[i] for i in sorted(returns)]

    def _refuse_a_gpu_sweep_without_gpus(self, choice: GpuChoice) -> None:
        """SystemExit(2), said in one line before any cell, when the sweep's
        trainer.accelerator needs a GPU and torch sees none of those named."""
        accelerator = str(OmegaConf.select(self.config, "trainer.accelerator", default="auto"))
        if choice.problem and not choice.gpus and accelerator in ("gpu", "cuda"):
            # every cell would fail on the CPU, one after the other: one line, before any
            log.error(
                "%s: the sweep's trainer.accelerator=%s needs one, so no cell is launched; %s, "
                "or set trainer.accelerator=auto to run the cells on the CPU.",
                choice.problem,
                accelerator,
                choice.fix,
            )
            raise SystemExit(2)

    def _device_pool(self, gpus: list[int]) -> DevicePool:
        """The slots the cells run in; a launcher setting that allows none is SystemExit(2),
        said in one line before any cell or store."""
        try:
            return DevicePool(gpus, self.workers, self.gpus_per_cell)
        except ValueError as error:  # one line, before any cell or store
            log.error("%s", error)
            raise SystemExit(2) from None

    def _say_launching(self, choice: GpuChoice, pool: DevicePool, cells: int) -> None:
        """The line that opens the sweep: how many cells on which slots, or, when torch does not
        see the GPUs named, what is wrong, what happens instead and the fix."""
        slots = " | ".join(map(str, pool.free))
        where = f"GPUs {slots}" if choice.gpus else f"{self.workers} CPU worker(s)"
        if choice.problem:  # what is wrong, what happens instead, the fix: one line
            quiet = ""
            if choice.on_cpu and not choice.gpus:
                quiet = f"{choice.on_cpu} to run on the CPU without this warning, or "
            log.warning(
                "%s: launching %d cells on %s; %s%s.",
                choice.problem,
                cells,
                where,
                quiet,
                choice.fix,
            )
        else:
            log.info("Launching %d cells on %s", cells, where)

    def _run_cells(
        self,
        job_overrides: Sequence[Sequence[str]],
        initial_job_idx: int,
        pool: DevicePool,
        sweep_dir: Path,
    ) -> dict[int, JobReturn]:
        """Each cell skipped (FINISHED earlier) or started as soon as a slot is free, polled
        until every one has ended: their JobReturns by job index."""
        pending = deque(enumerate(job_overrides, start=initial_job_idx))
        running: list[Running] = []
        returns: dict[int, JobReturn] = {}
        progress = SweepProgress(len(job_overrides))
        while pending or running:
            while pending and pool.available:
                index, overrides = pending.popleft()
                config, folder = self._prepare(index, list(overrides), sweep_dir)
                skipped = self._skip_if_finished(index, overrides, config, folder, progress)
                if skipped is not None:
                    returns[index] = skipped
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
                returns[cell.index] = self._ended(cell, progress)
        return returns

    def _skip_if_finished(
        self,
        index: int,
        overrides: Sequence[str],
        config: DictConfig,
        folder: Path,
        progress: SweepProgress,
    ) -> JobReturn | None:
        """A cell FINISHED earlier in the store: said, its outcome saved in its folder, and its
        JobReturn; None for a cell to start."""
        if (done := self._finished_earlier(config, folder, list(overrides))) is None:
            return None
        progress.start()
        log.info(
            "\t#%d skipped: FINISHED earlier in MLflow run %s [%s]",
            index,
            done.run_id,
            progress.done(skipped=True),
        )
        done.save(folder)
        return self._finish(list(overrides), config, folder, done)

    def _ended(self, cell: Running, progress: SweepProgress) -> JobReturn:
        """A cell whose process has ended: its outcome read, said, and its JobReturn."""
        outcome = self._outcome(cell)
        log.info(
            "\t#%d %s after %.0fs [%s]: %s",
            cell.index,
            outcome.status,
            time.time() - cell.started,
            progress.done(),
            " ".join(filter_overrides(cell.overrides)),
        )
        return self._finish(cell.overrides, cell.config, cell.folder, outcome)

    def _prepare(
        self, index: int, overrides: list[str], sweep_dir: Path
    ) -> tuple[DictConfig, Path]:
        """The cell's config (hydra node included) and its output folder."""
        return prepare_cell(self.hydra_context, self.config, index, overrides, sweep_dir)

    def _finished_earlier(
        self, config: DictConfig, folder: Path, overrides: list[str]
    ) -> CellOutcome | None:
        return finished_earlier(config, folder, overrides)

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
        outcome = CellOutcome(" ".join(cell.overrides), Status.failed, run_id=run_id, error=error)
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
            if job.working_dir and job.return_value.status == Status.failed
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


class CellFailed(Exception):
    """Raised at the end of a SLURM (or submitit local) job whose cell failed, after the cell
    wrote its outcome: submitit records an error, the job exits non-zero, and `sacct` says
    FAILED for the cell's FAILED run (COMPLETED for a FINISHED or skipped one)."""


@dataclass
class SubmittedCell:
    index: int
    overrides: list[str]
    config: DictConfig
    folder: Path
    job: Any  # submitit.Job
    gone_since: float | None = None  # when the scheduler was first seen to hold it no more


# The states of a SLURM job that has ended (squeue --states=all, sacct), and what each means.
ENDED_STATES = {
    "BOOT_FAIL": "its node failed to boot",
    "CANCELLED": "scancel, or an administrator",
    "COMPLETED": "",
    "DEADLINE": "past its deadline",
    "FAILED": "",
    "NODE_FAIL": "its node failed",
    "OUT_OF_MEMORY": "past hydra.launcher.mem_gb",
    "PREEMPTED": "by a job of higher priority",
    "TIMEOUT": "past its time limit, hydra.launcher.timeout_min",
}


ENDED = {*ENDED_STATES, "gone"}  # gone: no longer listed at all

# Why a pending job waits, when it only has to wait (squeue %r).
WAITING = {
    "None", "Priority", "Resources", "JobArrayTaskLimit", "BeginTime", "Dependency",
    "Reservation", "Licenses", "Prolog", "NodeDown", "Cleaning",
}  # fmt: skip


class ReportsCellsHere:
    """Mixin for the hydra-submitit launchers (SLURM jobs, or submitit's local processes): the
    sweep waits for its cells itself, instead of submitit's `job.results()`, so that

    - a cell already FINISHED in the store is not submitted at all (a relaunch queues only the
      cells left to run);
    - each cell's JobReturn (its value the cell's CellOutcome) is reported to the sweep's own
      callbacks (SweepSummary): Hydra calls `on_job_end` in the job's process, where the sweep
      would hear of no cell;
    - a job the scheduler ends (scancel, its time limit, a preemption, its node failing, out of
      memory) or that dies without a result (killed, os._exit) is one failed cell, its MLflow
      run ended FAILED with the scheduler's word as its `error` tag, while the others go on:
      submitit's wait raised for the first such job and stopped the sweep, and without SLURM
      accounting (no slurmdbd: sacct fails) it waited forever for a job that had died;
    - a failed cell's job exits non-zero (CellFailed), so that `sacct` says FAILED for it.

    The scheduler is asked with `squeue --states=all` (which answers without accounting, for
    MinJobAge after a job ends) and `sacct` when it answers. A job the scheduler no longer
    runs and whose result has not appeared `RESULT_GRACE_S` later (a shared file system may lag)
    is failed.
    """

    hydra_context: HydraContext
    config: DictConfig
    params: dict[str, Any]
    _EXECUTOR: str
    POLL_S, POLL_MAX_S = 2.0, 30.0
    RESULT_GRACE_S = 15.0
    _said_pending: set[str]

    # ------------------------------------------------------------ in the job's process

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        job: JobReturn = super().__call__(*args, **kwargs)  # type: ignore[misc]
        if job.status == JobStatus.FAILED:  # raised past the cell's own handling
            raise CellFailed(f"{' '.join(job.overrides or [])}: {job._return_value}")
        outcome = job.return_value
        if isinstance(outcome, CellOutcome) and outcome.status == Status.failed:
            raise CellFailed(f"{outcome.cell}: {outcome.error}")
        return job

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this in the job when SLURM signals it (SIGUSR2: its time limit is
        `hydra.launcher.signal_delay_s` away, or a preemption). The job is requeued through
        submitit, as hydra-submitit-launcher does (the same call again, `scontrol requeue`): the
        cell's run ends FAILED, its error `Requeued: ...`, and the job, started again, resumes the
        cell from the end of its last epoch (benchmark.cell.resume). A job that timed out is
        requeued `hydra.launcher.max_num_timeout` times (SLURM_RESTART_COUNT counts the
        requeues); after that (or at 0) Terminated, raised where the signal lands, ends the cell
        FAILED as SIGTERM does (benchmark.runtime.interrupt), its run's error saying timed out;
        relaunching the sweep resumes it. The same words go to the cell's outcome first, for a
        signal that lands before the cell has started."""
        from benchmark.runtime import interrupt

        timeout_min = self.params.get("timeout_min")
        limit_s = 60 * float(timeout_min or 0)
        ran_s = time.time() - psutil.Process().create_time()
        timed_out = bool(limit_s) and ran_s >= min(0.8 * limit_s, limit_s - 600)  # as submitit
        if timed_out:
            said = (
                f"timed out: the SLURM job neared its time limit after {ran_s:.0f} s "
                f"(hydra.launcher.timeout_min={timeout_min})"
            )
        else:
            said = f"preempted: SLURM signalled the job after {ran_s:.0f} s, before its time limit"
        requeues = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        allowed = int(self.params.get("max_num_timeout") or 0)
        if not timed_out or requeues < allowed:
            interrupt.requeue(
                f"{said}; the job is requeued (requeue {requeues + 1}), the cell resumes from "
                "its last epoch"
            )
            log.warning("%s", said)
            return super().checkpoint(*args, **kwargs)  # type: ignore[misc]
        if requeues:
            said += f", requeued {requeues} times (hydra.launcher.max_num_timeout={allowed})"
        try:
            hydra = HydraConfig.get()
            cell = " ".join(hydra.overrides.task)
            CellOutcome(cell, Status.failed, error=said).save(Path(hydra.runtime.output_dir))
        except Exception:  # not in a cell yet: the sweep hears it from the scheduler
            log.debug("No outcome written for the signal", exc_info=True)
        raise interrupt.Terminated(said)

    # ------------------------------------------------------------ in the sweep's process

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from benchmark.tracking import identity

        setup_globals()
        identity.use_credentials(self.config.tracking.uri)  # for the cells FINISHED earlier
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        self._said_pending = set()
        watcher = OutcomeWatcher(sweep_dir, len(job_overrides))
        watcher.start()
        try:
            returns = self._run(job_overrides, initial_job_idx, sweep_dir)
        finally:
            watcher.stop()
        for job in returns:
            config = job.cfg if job.cfg is not None else self.config
            self.hydra_context.callbacks.on_job_end(config=config, job_return=job)
        return returns

    def _run(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path
    ) -> list[JobReturn]:
        from hydra.core.singleton import Singleton

        returns: dict[int, JobReturn] = {}
        cells: list[SubmittedCell] = []
        for index, overrides in enumerate(map(list, job_overrides), start=initial_job_idx):
            config, folder = prepare_cell(
                self.hydra_context, self.config, index, overrides, sweep_dir
            )
            if (done := finished_earlier(config, folder, overrides)) is not None:
                log.info("\t#%d skipped: FINISHED earlier in MLflow run %s", index, done.run_id)
                done.save(folder)
                returns[index] = cell_return(overrides, config, folder, done)
            else:
                cells.append(SubmittedCell(index, overrides, config, folder, None))
        if cells:
            since = time.time()
            executor = self._executor()
            arguments = [
                (c.overrides, "hydra.sweep.dir", c.index, f"job_id_for_{c.index}",
                 Singleton.get_state())
                for c in cells
            ]  # fmt: skip
            try:
                jobs = executor.map_array(self, *zip(*arguments, strict=True))
            except Exception as error:  # sbatch refused them: its own words, in one line
                said = " ".join(str(error).split())
                log.error("The scheduler refused the sweep's jobs: %s", said)
                raise SystemExit(1) from None
            for cell, job in zip(cells, jobs, strict=True):
                cell.job = job
                log.info("\t#%d job %s: %s", cell.index, job.job_id, " ".join(cell.overrides))
            for cell, outcome in self._wait(cells, since):
                returns[cell.index] = cell_return(cell.overrides, cell.config, cell.folder, outcome)
        return [returns[i] for i in sorted(returns)]

    def _executor(self) -> Any:
        """submitit's executor for the launcher's parameters, as hydra-submitit-launcher
        builds it."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        init_keys = {"submitit_folder", "max_num_timeout"}
        init = {"folder": self.params["submitit_folder"]}
        if "max_num_timeout" in self.params:
            init[f"{self._EXECUTOR}_max_num_timeout"] = self.params["max_num_timeout"]
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                key if key in shared else f"{self._EXECUTOR}_{key}": value
                for key, value in self.params.items()
                if key not in init_keys
            }
        )
        return executor

    def _wait(
        self, cells: list[SubmittedCell], since: float
    ) -> Iterator[tuple[SubmittedCell, CellOutcome]]:
        """Each cell with its outcome, as its job ends."""
        pending, started = list(cells), time.monotonic()
        while pending:  # every 2 s at first, every 30 s after 5 minutes
            time.sleep(min(self.POLL_MAX_S, max(self.POLL_S, (time.monotonic() - started) / 10)))
            states = self._scheduler_states([c.job.job_id for c in pending])
            now = time.monotonic()
            for cell in list(pending):
                if cell.job.paths.result_pickle.exists():
                    outcome = self._result(cell, since)
                elif states is None:  # no scheduler to ask (local processes) or no answer
                    if self._EXECUTOR == "slurm" or not cell.job.done():
                        continue
                    outcome = self._result(cell, since)
                elif (state := states.get(cell.job.job_id, "gone").split()[0]) in ENDED:
                    cell.gone_since = cell.gone_since or now
                    said = self._cell_said(cell, since)
                    # A result may lag behind on a shared file system; a failed cell sent none.
                    # A preempted job may be requeued: it shows PENDING again.
                    waiting = said is None or said.status != Status.failed or state == "PREEMPTED"
                    if waiting and now - cell.gone_since < self.RESULT_GRACE_S:
                        continue
                    outcome = self._without_result(cell, states.get(cell.job.job_id), since)
                else:  # pending, running, or requeued after a preemption
                    cell.gone_since = None
                    continue
                pending.remove(cell)
                yield cell, outcome

    def _scheduler_states(self, job_ids: list[str]) -> dict[str, str] | None:
        """SLURM's state of each job it still knows ("RUNNING", "CANCELLED"); None for
        local processes, or when squeue does not answer. A job held pending for a reason that
        waiting may not cure (a request beyond what the partition offers) is said once."""
        if self._EXECUTOR != "slurm" or not job_ids:
            return None
        arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r"]
        try:
            listed = subprocess.run(
                [*command, f"--jobs={','.join(arrays)}"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            listed = subprocess.CompletedProcess(command, 1, "", str(error))
        if listed.returncode != 0:  # every job past MinJobAge: "Invalid job id specified"
            if "Invalid job id" in listed.stderr:
                return {}
            if "squeue" not in self._said_pending:  # slurmctld restarting, say: waits
                self._said_pending.add("squeue")
                log.warning("squeue does not answer (%s); waiting", listed.stderr.strip())
            return None
        states = {}
        for line in listed.stdout.splitlines():
            job_id, state, reason = [*line.split("|", 2), "", ""][:3]
            states[job_id.strip()] = state
            if state == "PENDING" and reason not in WAITING and reason not in self._said_pending:
                self._said_pending.add(reason)
                log.warning(
                    "SLURM holds job %s pending: %s (scontrol show job %s). If that cannot "
                    "change (a request beyond what the partition offers: hydra.launcher."
                    "cpus_per_task, mem_gb, gpus_per_node, timeout_min), scancel the sweep's "
                    "jobs: each is then a failed cell.",
                    job_id,
                    reason,
                    job_id,
                )
        return states

    def _result(self, cell: SubmittedCell, since: float) -> CellOutcome:
        """The outcome of a job that ended with a result: the JobReturn's, or the outcome the
        failed cell wrote (CellFailed), or the job's error."""
        try:
            returned = cell.job.results()[0]
        except Exception as error:
            said = self._cell_said(cell, since)
            if said is not None and said.status == Status.failed:
                return said
            return self._failed(cell, job_error(cell.job.job_id, error), said, since)
        outcome = returned.return_value
        assert isinstance(outcome, CellOutcome), outcome
        return outcome

    def _without_result(self, cell: SubmittedCell, listed: str | None, since: float) -> CellOutcome:
        """A job that SLURM no longer runs, with no result: failed with the scheduler's word."""
        job_id = cell.job.job_id
        state, code = scheduler_end(job_id, listed)
        if state == "UNKNOWN":
            reason = (
                f"SLURM job {job_id} ended without a result, and the scheduler cannot say how "
                "(no accounting record: sacct needs slurmdbd)"
            )
        else:
            meaning = ENDED_STATES.get(state.split()[0], "")
            said = [meaning] if meaning else []
            status, _, signum = code.partition(":")
            if signum not in ("", "0"):
                said.append(f"signal {signum}")
            elif status not in ("", "0"):
                said.append(f"exit code {status}")
            reason = f"SLURM job {job_id} {state}" + (f" ({', '.join(said)})" if said else "")
        reason += f"; its log: {cell.job.paths.stderr}"
        return self._failed(cell, reason, self._cell_said(cell, since), since)

    def _cell_said(self, cell: SubmittedCell, since: float) -> CellOutcome | None:
        """The outcome the cell wrote during this launch, if it wrote one."""
        file = cell.folder / OUTCOME_FILE
        try:
            if file.stat().st_mtime < since:
                return None
        except OSError:
            return None
        return CellOutcome.load(cell.folder, " ".join(cell.overrides))

    def _failed(
        self, cell: SubmittedCell, reason: str, said: CellOutcome | None, since: float
    ) -> CellOutcome:
        """The cell failed for `reason`: its run (if it opened one during this launch) ends
        FAILED with the reason as its error tag, before what the cell itself said, and its
        folder's outcome says so too."""
        name = " ".join(cell.overrides)
        if said is not None and said.status == Status.failed:
            name = said.cell
            reason = f"{reason}; the cell: {said.error}" if said.error else reason
        try:
            run_id = settle_run(cell.folder, reason, since)
        except Exception:  # the store is unreachable: the sweep goes on
            log.warning("Could not end the MLflow run of %s", cell.folder, exc_info=True)
            run_id = None
        outcome = CellOutcome(name, Status.failed, run_id=run_id, error=reason)
        outcome.save(cell.folder)
        return outcome


def job_error(job_id: str, error: Exception) -> str:
    """submitit's error for a job, in one line: the exception its function raised (the last
    line of the traceback submitit quotes), or the first line of what it says of a job that
    ended without a result."""
    text = str(error)
    quoted = text.split("-" * 22)  # FailedJobError: the traceback between two such rules
    lines = [line.strip() for line in (quoted[1] if len(quoted) > 2 else text).splitlines()]
    lines = [line for line in lines if line] or [type(error).__name__]
    return f"job {job_id}: {lines[-1] if len(quoted) > 2 else ' '.join(lines[:2])}"


def scheduler_end(job_id: str, listed: str | None) -> tuple[str, str]:
    """How a SLURM job ended: its state ("CANCELLED by 0", "TIMEOUT") and exit code ("0:15"),
    from accounting (sacct), else from what squeue listed, else ("UNKNOWN", "")."""
    try:
        accounted = subprocess.run(
            ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={job_id}",
             "--format=JobID,State,ExitCode"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        rows = [line.split("|") for line in accounted.stdout.splitlines() if line.count("|") == 2]
    except (OSError, subprocess.TimeoutExpired):
        rows = []
    for found, state, code in rows:
        if found == job_id and state:
            return state, code
    return (listed or "UNKNOWN"), ""


def settle_run(folder: Path, reason: str, since: float) -> str | None:
    """The MLflow run that the cell in `folder` opened during this launch (its run file newer
    than `since`), ended FAILED if it is still RUNNING, its `error` tag `reason` (followed by
    the tag it had, if the cell had ended it). A FINISHED run is left alone. Its id if changed."""
    import mlflow
    from mlflow.entities import RunStatus

    from benchmark.tracking import identity, store

    run_file = folder / identity.RUN_FILE
    if not run_file.is_file() or run_file.stat().st_mtime < since:
        return None
    started = json.loads(run_file.read_text())
    client, run_id = mlflow.MlflowClient(started["tracking_uri"]), started["run_id"]
    run = client.get_run(run_id)
    if run.info.status == RunStatus.to_string(RunStatus.FINISHED):
        return None
    had = run.data.tags.get("error", "")  # the cell's own, e.g. "Terminated: terminated by ..."
    if had and not had.startswith(store.GONE_PREFIX) and had.split(": ", 1)[-1] not in reason:
        reason = f"{reason}; {had}"
    client.set_tag(run_id, "error", store.error_tag(reason))
    if run.info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    return run_id


def cell_return(
    overrides: list[str], config: DictConfig, folder: Path, outcome: CellOutcome
) -> JobReturn:
    """A JobReturn for a cell the sweep's process settled (skipped, or failed by its job)."""
    job = JobReturn(
        overrides=list(overrides), cfg=config, working_dir=str(folder), status=JobStatus.COMPLETED
    )
    job.return_value = outcome
    return job


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
            state = self.progress.done(skipped=outcome.status == Status.skipped)
            log.info("\tcell %s [%s]: %s", outcome.status, state, outcome.cell)
