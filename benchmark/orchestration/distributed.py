"""One cell on several devices (`trainer=ddp`): which launches keep DDP's ranks on one cell.

Lightning's subprocess DDP launcher starts ranks 1..N-1 by re-running this process's command line
(`python -m benchmark <argv>` plus `hydra.run.dir=...`). That is the same cell for a single run
and for a cell of `hydra/launcher=gpus` (started without -m), but under Hydra's basic `-m` the
children would re-run the whole sweep. SLURM tasks (hydra/launcher=slurm) and torchrun start
the ranks themselves, so nothing is re-run there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

from benchmark.models.trainer import build_trainer

log = logging.getLogger("benchmark")

RELAUNCH_UNDER_MULTIRUN = (
    "trainer.strategy={strategy} starts its other ranks by re-running this command line, which "
    "under -m with Hydra's basic launcher would re-run the whole sweep in every rank. Run a grid "
    "of DDP cells with hydra/launcher=gpus (a process per cell; hydra.launcher.gpus_per_cell=K "
    "gives each cell K GPUs) or hydra/launcher=slurm (SLURM starts one task per rank), or run "
    "the cell alone without -m."
)


def relaunches_command(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether Lightning would start this cell's other ranks by re-running the command line.

    Asks Lightning itself: a Trainer built from the config (no model, nothing started) has the
    strategy, launcher and cluster environment that the cell's Trainer will have.
    """
    if "ddp" not in str(trainer_cfg.get("strategy", "")).lower():
        return False
    try:
        trainer = build_trainer(
            trainer_cfg,
            logger=False,
            enable_checkpointing=False,
            precision="32-true",  # `auto` is the harness's; the launcher does not depend on it
        )
    except Exception:  # e.g. no GPU: the cell itself reports that, with its MLflow run
        log.debug("Trainer config not checked for DDP", exc_info=True)
        return False
    launcher = trainer.strategy.launcher
    return (
        isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and launcher.num_processes > 1
    )
