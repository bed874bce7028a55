"""`python -m benchmark [-m] key=value ...`: one cell, or with -m a sweep over the grid."""

from __future__ import annotations

import logging
import warnings

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from benchmark.config import register_configs
from benchmark.data import DatasetError
from benchmark.models import BackboneError
from benchmark.sweep import CellFailure
from benchmark.training import CellResult, cell_name, run_cell

log = logging.getLogger("benchmark")
register_configs()
# Lightning 2.6 on torch 2.14 warns about its own use of a torch API, once per loop.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> CellResult | CellFailure:
    try:
        result = run_cell(cfg)
    except Exception as error:
        bad_input = isinstance(error, DatasetError | BackboneError)
        if bad_input:  # not a bug: say what and how to fix it, without a traceback
            log.error("%s", error)
        else:
            log.exception("%s failed", cell_name(cfg))
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # The other cells go on; SweepSummary reports this one and fails the sweep at the end.
            return CellFailure(cell_name(cfg), f"{type(error).__name__}: {error}")
        if bad_input:
            raise SystemExit(1) from None
        raise
    log.info("%s", result.summary())
    log.info("Browse runs: mlflow ui --backend-store-uri %s", result.tracking_uri)
    return result


if __name__ == "__main__":
    main()
