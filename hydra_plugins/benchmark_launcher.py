"""Hydra instantiates launchers only from classes defined in the `hydra_plugins` namespace:
benchmark's launchers are named here, and implemented in `benchmark.orchestration.launcher`."""

from benchmark.orchestration.launcher import CellProcessLauncher, ReportsCellsHere, register


class GpuLauncher(CellProcessLauncher):
    """`hydra/launcher=gpus`: a fresh process per cell, one cell per GPU
    (benchmark.orchestration.launcher)."""


register()

try:  # hydra/launcher=slurm and slurm_local: the `slurm` extra (hydra-submitit-launcher)
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import (
        LocalLauncher,
        SlurmLauncher,
    )
except ImportError:
    pass
else:

    class SlurmCellLauncher(ReportsCellsHere, SlurmLauncher):
        """`hydra/launcher=slurm`: each cell a SLURM job (conf/hydra/launcher/slurm.yaml)."""

    class LocalCellLauncher(ReportsCellsHere, LocalLauncher):
        """`hydra/launcher=slurm_local`: the same through submitit's local processes."""
