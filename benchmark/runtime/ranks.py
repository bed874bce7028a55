"""Which process of a DDP cell this is: whether a launcher started it as one rank of several
(`is_distributed`) and whether it is global rank 0, the one that speaks for its cell
(`is_rank_zero`). Decided here and nowhere else.

No torch or Lightning is imported here (`--help`, a config error and the store's checks need
neither): Lightning's own reckoning of the rank is read where Lightning is loaded already, and
before that the rank it will read when it is.
"""

from __future__ import annotations

import os
import sys

# Where Lightning reads a process's rank from, in its order: without any of them, the process is
# rank 0.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
# The module that keeps Lightning's rank, as `rank_zero_only.rank` (set from RANK_VARIABLES when
# the module is imported, then to its global rank by the Trainer's strategy).
_LIGHTNING_RANK = "lightning.fabric.utilities.rank_zero"


def is_distributed() -> bool:
    """Whether this process was started as one rank of several (Lightning's DDP subprocesses, a
    SLURM task, torchrun): one of RANK_VARIABLES is set."""
    return any(os.environ.get(name) for name in RANK_VARIABLES)


def rank() -> int:
    """This process's global rank: Lightning's, once Lightning is loaded; before that, the one
    Lightning will read from RANK_VARIABLES (0 without any)."""
    zero_only = getattr(sys.modules.get(_LIGHTNING_RANK), "rank_zero_only", None)
    known = getattr(zero_only, "rank", None)
    if isinstance(known, int):
        return known
    return next((int(value) for name in RANK_VARIABLES if (value := os.environ.get(name))), 0)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (a single process is): the one that opens and logs
    its cell's MLflow run, writes its outcome and keeps its tuning's study."""
    return rank() == 0
