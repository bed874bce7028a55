"""Hydra instantiates launchers only from classes defined in the `hydra_plugins` namespace:
benchmark's launcher is named here, and implemented in `benchmark.launcher`."""

from benchmark.launcher import CellProcessLauncher, register


class GpuLauncher(CellProcessLauncher):
    """`hydra/launcher=gpus`: a fresh process per cell, one cell per GPU (benchmark.launcher)."""


register()
