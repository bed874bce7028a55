"""What a cell costs, measured for the cell alone: its wall time and the memory high-water marks
reached while it ran, not the process's lifetime peak (a sweep under Hydra's basic launcher runs
many cells in one process)."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

_STATUS, _CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Restart the kernel's resident-memory high-water mark (VmHWM) from the current RSS
    (Linux: writing 5 to /proc/self/clear_refs); False where that cannot be done."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark since the last reset. Linux's VmHWM
    belongs to the process's own address space; ru_maxrss would carry over the peak of a large
    parent that started it."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, not macOS


@dataclass
class CellCost:
    """Started when a cell starts; `stop` reads what it cost."""

    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        reset_peak_rss()
        self.rss_at_start_mb = psutil.Process().memory_info().rss / 2**20
        self._reset_gpu_peak()

    def _reset_gpu_peak(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def peak_rss_mb(self) -> float:
        """The cell's own peak, since its start (the process's, where the high-water mark
        cannot be reset)."""
        return peak_rss_mb()

    def peak_gpu_mem_mb(self) -> float | None:
        if not torch.cuda.is_available():
            return None
        return torch.cuda.max_memory_allocated() / 2**20
