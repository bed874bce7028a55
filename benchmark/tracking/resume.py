"""Which cells of a relaunched sweep are already done, decided without torch: a cell is done when
the store holds a FINISHED run with its key (its config and the fingerprint of its data), so a
relaunch runs the failed, interrupted and missing cells, and those whose data changed."""

from __future__ import annotations

import os
from pathlib import Path

from benchmark.config.spec import CellSpec
from benchmark.data.manifest import Manifest, build_manifest
from benchmark.tracking import identity, store
from benchmark.tracking.result import HEADLINES, CellSummary


def cell_manifest(spec: CellSpec) -> Manifest:
    """The cell's images and splits (files checked once, verdicts remembered in the cache)."""
    return build_manifest(spec.dataset, Path(spec.paths.data_root), spec.seed, spec.cache_dir)


def cell_identity(spec: CellSpec) -> tuple[Manifest, str]:
    """The cell's manifest and its key (its config and its data's content digests)."""
    manifest = cell_manifest(spec)
    return manifest, identity.cell_key(spec, manifest.sha256)


def finished_earlier(spec: CellSpec, key: str) -> CellSummary | None:
    """The summary of this cell's latest FINISHED run, if there is one."""
    if os.environ.get(identity.RUN_ID_ENV):
        return None  # a DDP rank started by rank 0, which has already decided to run the cell
    uri = identity.tracking_uri(spec)
    run = store.finished_run(uri, spec.tracking.experiment, key)
    if run is None:
        return None
    metrics = run.data.metrics
    name = next(n for n in HEADLINES if n in metrics)
    return CellSummary(
        spec.name,
        run.info.run_id,
        uri,
        metrics[name],
        metrics.get("test_loss"),
        skipped=True,
        score_name=name,
    )
