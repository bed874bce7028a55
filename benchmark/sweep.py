"""What a sweep did, said once at its end: how many cells finished, were skipped because an
earlier launch had finished them, or failed (each failure is a FAILED MLflow run with its error).
A failed cell does not stop the others; the sweep exits non-zero at the end if any failed."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("benchmark")


@dataclass
class CellFailure:
    """What a cell that raised returns to the sweep, which goes on with the next cell."""

    cell: str
    error: str


class SweepSummary(Callback):
    """A Hydra callback: counts each cell's outcome as it ends, summarises at the sweep's end."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.failed: list[str] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        failure = job_return.return_value if job_return.status != JobStatus.FAILED else None
        if job_return.status == JobStatus.FAILED or isinstance(failure, CellFailure):
            self.outcomes["failed"] += 1
            reason = failure.error if isinstance(failure, CellFailure) else "see the log"
            self.failed.append(f"{' '.join(job_return.overrides or [])}: {reason}")
        elif getattr(job_return.return_value, "skipped", False):
            self.outcomes["skipped"] += 1
        else:
            self.outcomes["finished"] += 1

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        counts = ", ".join(f"{self.outcomes[k]} {k}" for k in ("finished", "skipped", "failed"))
        log.info("Sweep done: %d cells: %s.", sum(self.outcomes.values()), counts)
        for failure in self.failed:
            log.error("Failed: %s", failure)
        if self.failed:
            raise SystemExit(1)
