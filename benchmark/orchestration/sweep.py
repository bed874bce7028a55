"""What happened to each cell of a sweep, and the summary said once at its end.

Every cell leaves an `outcome.json` in its output folder (finished, skipped because an earlier
launch finished it, or failed with the error), whichever launcher ran it: the done-marker that a
subprocess launcher reads back. A failed cell does not stop the others; the sweep exits non-zero
at the end if any failed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from benchmark.runtime import interrupt
from benchmark.runtime.progress import SweepProgress, duration, sweep_size
from benchmark.tracking import identity

log = logging.getLogger("benchmark")
OUTCOME_FILE = identity.OUTCOME_FILE
STATES = ("finished", "skipped", "failed")
# Where Lightning reads a process's rank from: without any of them, the process is rank 0.
DISTRIBUTED_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


class RankZeroOnly(Protocol):
    """Lightning's `rank_zero_only` decorator as Lightning uses it: it keeps the process's global
    rank as an attribute (from those variables at import, then from the strategy), which the
    decorator's own type does not declare."""

    rank: int


@dataclass
class CellOutcome:
    cell: str
    status: str  # one of STATES
    score: float | None = None  # the cell's headline: test_acc (max_val_acc under protocol=study)
    run_id: str | None = None
    error: str | None = None

    def save(self, folder: Path) -> None:
        """A DDP cell's ranks share its folder: rank 0 speaks for the cell."""
        if any(os.environ.get(v) for v in DISTRIBUTED_RANK_VARIABLES):
            # Imported only then: `--help`, a config error and shell completion need no
            # Lightning (and torch) to say what they say.
            from lightning.fabric.utilities.rank_zero import rank_zero_only

            if cast(RankZeroOnly, rank_zero_only).rank != 0:
                return
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{OUTCOME_FILE}.{os.getpid()}"  # a reader never sees half a file
        partial.write_text(json.dumps(asdict(self)))
        partial.replace(folder / OUTCOME_FILE)

    @staticmethod
    def load(folder: Path, cell: str) -> CellOutcome:
        """What the cell in `folder` reported; a cell killed before it could say is failed."""
        said = identity.read_outcome(folder)
        if said == {}:
            return CellOutcome(cell, "failed", error=f"ended without an outcome; see {folder}")
        error = f"its outcome file {folder / OUTCOME_FILE} is damaged; see {folder}"
        if said is None:  # damaged
            return CellOutcome(cell, "failed", error=error)
        try:  # the file's JSON values as they are (a missing or unknown field fails here)
            return CellOutcome(**cast(dict[str, Any], said))
        except TypeError:  # not an outcome's fields
            return CellOutcome(cell, "failed", error=error)


class SweepSummary(Callback):
    """A Hydra callback: opens the sweep's parent MLflow run (the cells are its children, in this
    process or in others), counts each cell's outcome as it ends, summarises at the sweep's end
    and ends the parent run FINISHED, or FAILED if a cell failed."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.failed: list[str] = []
        self.parent: tuple[str, str] | None = None  # (tracking URI, run id)
        self.progress: SweepProgress | None = None
        self.here: dict[str, float] = {}  # cells started in this process: their start time

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from benchmark.tracking import store

        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        os.environ[identity.SWEEP_ENV] = sweep_dir
        self.progress = SweepProgress(sweep_size(config.hydra.overrides.task))
        uri = identity.store_uri(config.tracking.uri)
        try:
            run_id = store.start_sweep_run(uri, config.tracking.experiment, sweep_dir)
        except Exception as error:  # the cells will say what is wrong with the store
            log.warning(
                "No parent run for the sweep in %s: %s",
                identity.redact(uri),
                identity.redact(str(error)),
            )
            return
        os.environ[identity.PARENT_RUN_ENV] = run_id
        self.parent = (uri, run_id)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A cell of the sweep starts in this process (Hydra's basic launcher): `cell k/N`,
        elapsed and time left. Launchers that start cells elsewhere say so themselves."""
        if self.progress is None:
            return  # a single run, or a cell process started by a launcher
        overrides = " ".join(config.hydra.overrides.task)
        self.here[overrides] = time.monotonic()
        position, state = self.progress.start(), self.progress.status()
        log.info("cell %s starts [%s]: %s", position, state, overrides)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        overrides = " ".join(job_return.overrides or [])
        if job_return.status == JobStatus.FAILED:  # raised past the task function
            outcome = CellOutcome(overrides, "failed", error=str(job_return._return_value))
        else:
            outcome = job_return.return_value
        self.outcomes[outcome.status] += 1
        if outcome.status == "failed":
            self.failed.append(f"{overrides}: {outcome.error}")
        if self.progress is not None and (started := self.here.pop(overrides, None)):
            took = duration(time.monotonic() - started)
            state = self.progress.done(skipped=outcome.status == "skipped")
            log.info("cell %s after %s [%s]: %s", outcome.status, took, state, overrides)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.outcomes:  # e.g. stock submitit launchers: the cells ended elsewhere
            log.warning(
                "Sweep done: no cell reported its outcome to this process; each cell's %s is in "
                "its folder under %s (hydra/launcher=slurm or slurm_local report them here).",
                OUTCOME_FILE,
                config.hydra.sweep.dir,
            )
            return
        if self.parent is not None:
            from benchmark.tracking import store

            try:
                store.end_sweep_run(*self.parent, dict(self.outcomes))
            except Exception as error:  # a store that is down must not hide the summary
                log.warning("The sweep's run %s could not be ended: %s", self.parent[1], error)
        counts = ", ".join(f"{self.outcomes[state]} {state}" for state in STATES)
        log.info("Sweep done: %d cells: %s.", sum(self.outcomes.values()), counts)
        for failure in self.failed:
            log.error("Failed: %s", failure)
        if signum := interrupt.received():  # it came after the last cell had started
            log.error("The sweep was terminated by signal %d; relaunch it to run the rest.", signum)
            raise SystemExit(128 + signum)
        if self.failed:
            raise SystemExit(1)
