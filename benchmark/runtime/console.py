"""What a cell says on the console: each message once, and the known-harmless lines of the
libraries it runs left out (`verbose=true` shows them all).

Each message once: Lightning adds a console handler of its own to the `lightning` logger when it
is imported (`INFO: ...`), while Hydra's job logging already writes every record that reaches the
root logger to the console and the job's log file: every Lightning line came twice. Under Hydra
(the root logger has handlers) Lightning's own console handlers are removed and its records go
through Hydra's, once, into the log file too. Lightning also says its set-up lines again for every
Trainer a cell builds (feature extraction, each tuning trial, the fit): each is said once per cell.

The known-harmless lines (HARMLESS) are filtered at their source, by the logger or the warning
that emits them, each with the reason it is harmless. Everything else, warnings and errors
included, is shown as before.

No torch, Lightning or MLflow is imported here: their loggers are found by name.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from typing import cast

# Lightning's loggers: `rank_zero_info` and `rank_zero_warn` log through these (the first one
# imported sets lightning_utilities' logger), seed_everything through the last.
LIGHTNING_SAYS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.fabric.utilities.seed",
)
# The loggers Lightning may give a console handler of its own (lightning/__init__.py always;
# lightning.pytorch and lightning.fabric when the root logger had none at their import).
LIGHTNING_HANDLERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
LIGHTNING = "lightning"  # a HARMLESS entry of any of LIGHTNING_SAYS
WARNING = "py.warnings"  # HARMLESS entries that are Python warnings, not log records


@dataclass(frozen=True)
class Harmless:
    """A message of a library that says nothing a user of the harness needs: `source` is the
    logger that emits it (LIGHTNING: any of Lightning's; WARNING: a Python warning), `pattern`
    a regular expression matched at the message's start, `why` the reason it is left out. Of
    the log records only those at INFO or below are dropped."""

    source: str
    pattern: str
    why: str


HARMLESS = (
    Harmless(
        LIGHTNING,
        r"💡 Tip:",
        "Lightning's advertisement for its cloud services (LitLogger, litmodels), per Trainer",
    ),
    Harmless(
        LIGHTNING,
        r"`Trainer\(limit_\w+_batches=.*\)` was configured so",
        "it restates the command's own trainer.limit_*_batches override",
    ),
    Harmless(
        LIGHTNING,
        r"(GPU available: False, used: False|TPU available: False|HPU available: False)",
        "no such device here, and none used (a GPU that is there but unused is still said)",
    ),
    Harmless(
        LIGHTNING,
        r"`Trainer\.fit` stopped: `max_epochs=\d+` reached",
        "the normal end of every fit: the progress lines show each epoch",
    ),
    Harmless(
        LIGHTNING,
        r"(Restoring states from the checkpoint path at|Loaded model weights from the checkpoint)",
        "the test of the checkpoint chosen on validation, as always; the run logs it as its model",
    ),
    Harmless(
        LIGHTNING,
        r"Trainer already configured with model summary callbacks",
        "the harness's one-line model summary (classifier.ModelSize) replaces Lightning's table",
    ),
    Harmless(
        "mlflow.system_metrics.system_metrics_monitor",
        r"",
        "the system-metrics sampler starting and stopping around every run (and that it "
        "samples no GPU on a machine without one); its samples are in the run",
    ),
    Harmless(
        "mlflow.store.db.utils",
        r"(Creating initial MLflow database tables|Updating database tables)",
        "MLflow setting up the tables of a new SQLite store, as it does for every new store",
    ),
    Harmless(
        "mlflow.pyfunc",
        r"Validating input example against model signature",
        "MLflow checking, as the run logs its model, that the model loads and predicts its input "
        "example (a failure is a warning, and said)",
    ),
    Harmless(
        "hydra._internal.core_plugins.basic_launcher",
        r"\t#\d+ : ",
        "the cell's overrides, which the sweep's own `cell k/N starts` line says with its progress",
    ),
    Harmless(
        WARNING,
        r"The `srun` command is available on your system but is not used",
        "Lightning's hint for a DDP job started by hand on SLURM; hydra/launcher=slurm starts its "
        "cells with srun itself, and a cell outside SLURM does not need it",
    ),
    Harmless(
        WARNING,
        r"You called `self\.log\('\w+', \.\.\., logger=True\)` but have no logger configured",
        "a tuning trial logs to no Lightning logger on purpose (its curve goes to its own child "
        "run, benchmark.cell.mlflow_run.TrialRuns)",
    ),
    Harmless(
        WARNING,
        r"The specified dataset source can be interpreted in multiple ways: "
        r"LocalArtifactDatasetSource, LocalArtifactDatasetSource\.",
        "MLflow registers its local-folder source twice: both readings are the same class, the "
        "splits' folder, for every cell",
    ),
)


class _Quiet(logging.Filter):
    """Drops a logger's HARMLESS records (at INFO or below), and a message it said before in
    this cell (`once`: Lightning's set-up lines, again for every Trainer)."""

    def __init__(self, patterns: list[str], once: bool) -> None:
        super().__init__()
        self.harmless = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
        self.once, self.said = once, set[str]()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        if self.harmless is not None and self.harmless.match(message):
            return False
        if self.once:
            if message in self.said:
                return False
            self.said.add(message)
        return True


_WARNING_PATTERNS = [h.pattern for h in HARMLESS if h.source == WARNING]


def setup(verbose: bool = False) -> None:
    """Each message once, and (unless `verbose`) the HARMLESS ones left out. Called where a
    cell or a sweep starts (again for each cell of a sweep: "said before" starts afresh);
    idempotent."""
    if logging.getLogger().handlers:  # Hydra's job logging writes every record once
        for name in LIGHTNING_HANDLERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # its console handler, not a file
                    logger.removeHandler(handler)
            logger.propagate = True
    loggers = {h.source: h.source for h in HARMLESS if h.source not in (LIGHTNING, WARNING)}
    loggers |= {name: LIGHTNING for name in LIGHTNING_SAYS}
    for name, source in loggers.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _Quiet)]:
            logger.removeFilter(old)
        if not verbose:
            patterns = [h.pattern for h in HARMLESS if h.source == source]
            logger.addFilter(_Quiet(patterns, once=source == LIGHTNING))
    _quiet_warnings(not verbose)


def _quiet_warnings(quiet: bool) -> None:
    """The HARMLESS warnings ignored, or (verbose) shown as Python shows a UserWarning: once per
    place. Our earlier entries for them are replaced, not piled up."""
    others = [f for f in warnings.filters if _pattern(f[1]) not in _WARNING_PATTERNS]
    cast(list[object], warnings.filters)[:] = others  # a list, typed as a Sequence
    for pattern in _WARNING_PATTERNS:  # each call also resets Python's "already shown" records
        warnings.filterwarnings("ignore" if quiet else "default", message=pattern)


def _pattern(message: re.Pattern[str] | None) -> str | None:
    return None if message is None else message.pattern
