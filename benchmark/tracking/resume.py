"""Which cells of a relaunched sweep are already done, decided without torch: a cell is done when
the store holds a FINISHED run with its key (its config and the fingerprint of its data), so a
relaunch runs the failed, interrupted and missing cells, and those whose data changed."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from benchmark.config.spec import CellSpec
from benchmark.data.manifest import Manifest, build_manifest
from benchmark.tracking import identity, store
from benchmark.tracking.result import CellSummary

log = logging.getLogger("benchmark")


def cell_manifest(spec: CellSpec) -> Manifest:
    """The cell's images and splits (files checked once, verdicts remembered in the cache)."""
    return build_manifest(spec.dataset, Path(spec.paths.data_root), spec.seed, spec.cache_dir)


def cell_identity(spec: CellSpec) -> tuple[Manifest, str]:
    """The cell's manifest and its key (its config and its data's content digests)."""
    manifest = cell_manifest(spec)
    return manifest, identity.cell_key(spec, manifest.sha256)


def started_by_rank_zero() -> bool:
    """Whether this process is a DDP rank that rank 0 started (Lightning's DDP launcher re-runs
    the command line, rank 0's run id in RUN_ID_ENV) once it had decided to run the cell: such a
    rank neither looks for a FINISHED run nor takes the cell's lock. Not the same question as
    `ranks.is_rank_zero`: the ranks that SLURM or torchrun start themselves carry no run id, and
    each looks (so that all of them skip a FINISHED cell alike)."""
    return bool(os.environ.get(identity.RUN_ID_ENV))


def finished_earlier(spec: CellSpec, key: str) -> CellSummary | None:
    """The summary of this cell's latest FINISHED run, if there is one."""
    if started_by_rank_zero():
        return None  # rank 0 has already decided to run the cell
    uri = identity.tracking_uri(spec)
    run = store.finished_run(uri, spec.tracking.experiment, key)
    if run is None:
        return None
    return CellSummary.of(spec.name, run.info.run_id, uri, run.data.metrics, skipped=True)


def interrupted_earlier(spec: CellSpec, key: str) -> list[tuple[str, Path]]:
    """The attempts of this cell that were cut off (FAILED or KILLED) since it last FINISHED,
    newest first, each as its run id and its output folder: where a relaunch looks for what an
    attempt kept to resume from (benchmark.cell.resume). Every rank of a DDP cell asks alike
    (a RUNNING run, rank 0's own, is not one of them), so that all resume from the same one."""
    uri = identity.tracking_uri(spec)
    runs = store.interrupted_runs(uri, spec.tracking.experiment, key)
    return [
        (run.info.run_id, Path(folder))
        for run in runs
        if (folder := run.data.tags.get(identity.OUTPUT_DIR_TAG))
    ]


def lock_file(spec: CellSpec, key: str) -> Path:
    """Where the cell's lock lives: beside a SQLite store (every process writing to it sees it),
    else in the cache folder (a server's cells on this host)."""
    uri = identity.tracking_uri(spec)
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else None
    return (folder or Path(spec.cache_dir)) / ".cell-locks" / f"{key}.lock"


@contextmanager
def cell_lock(spec: CellSpec, key: str) -> Iterator[None]:
    """Held while the cell decides to run and runs: the same cell launched twice at once is
    computed once; the second launch waits (saying so), then finds it FINISHED and skips it.
    The OS frees the lock of a process that dies. DDP ranks started by rank 0 take none."""
    if started_by_rank_zero():
        yield
        return
    file = lock_file(spec, key)
    file.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(file)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning(
            "cell %s is already running in another process (lock %s): waiting for it, then "
            "this launch skips it if it FINISHED (rerun=true: runs it again).",
            spec.name,
            file,
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
