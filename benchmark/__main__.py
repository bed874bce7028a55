"""`python -m benchmark [-m] key=value ...`: one cell, or with -m a sweep over the grid."""

from __future__ import annotations

import logging
import warnings

import hydra
from omegaconf import DictConfig

from benchmark.config import register_configs
from benchmark.data import DatasetError
from benchmark.models import BackboneError
from benchmark.training import run_cell

log = logging.getLogger("benchmark")
register_configs()
# Lightning 2.6 on torch 2.14 warns about its own use of a torch API, once per loop.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        result = run_cell(cfg)
    except (DatasetError, BackboneError) as error:
        # Bad input, not a bug: say what and how to fix it, without a traceback.
        log.error("%s", error)
        raise SystemExit(1) from None
    log.info("%s", result.summary())
    log.info("Browse runs: mlflow ui --backend-store-uri %s", result.tracking_uri)
    return result.test_acc


if __name__ == "__main__":
    main()
