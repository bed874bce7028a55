"""Quiet by default (issue 36 B): a cell's console says each message once, without the
known-harmless lines of the libraries it runs; `verbose=true` shows them all."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from collections import Counter

import pytest

from benchmark.runtime import console
from tests.conftest import PROJECT, TINY

# Hydra's job-logging prefix, `[2026-12-07 20:41:24,577][lightning...][INFO] - `, and the one
# of Lightning's own console handler, `INFO: `: the same message under two prefixes is one.
PREFIX = re.compile(r"^(\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - |(DEBUG|INFO|WARNING|ERROR): )")
NOISE = (
    "💡 Tip",  # Lightning's advertisement
    "srun",  # Lightning's SLURM hint
    "Total FLOPs",  # Lightning's model summary table
    "interpreted in multiple ways",  # MLflow's dataset source warning
    "system metrics",  # MLflow's sampler starting and stopping
    "was configured so",  # Lightning restating trainer.limit_*_batches
)


@pytest.mark.e2e
def test_a_tiny_default_cell_says_each_line_once_and_no_known_noise(tmp_path, shared_data):
    """`python -m benchmark` (the default cell, its model summary on): no line twice, under
    Hydra's prefix or Lightning's, none of the known-harmless ones; its own lines are there."""
    env = {**os.environ, "BENCHMARK_DATA_ROOT": str(shared_data), "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    tiny = [o for o in TINY if "enable_model_summary" not in o]
    done = subprocess.run(
        [sys.executable, "-m", "benchmark", *tiny],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the console as a user sees it: both streams, in order
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [PREFIX.sub("", line).rstrip() for line in done.stdout.splitlines()]
    said = Counter(line for line in lines if line.strip())
    assert [line for line, n in said.items() if n > 1] == [], done.stdout
    assert [line for line in lines if any(n in line for n in NOISE)] == [], done.stdout
    assert sum(line.startswith("model: ") for line in lines) == 1, done.stdout  # one-line summary
    assert sum("test_acc=" in line for line in lines) == 1, done.stdout
    assert not any(line.startswith("INFO: ") for line in done.stdout.splitlines()), done.stdout


class Said(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lightning_says():
    """What Lightning's rank-zero logger lets through, as its records reach a handler."""
    import lightning.pytorch  # noqa: F401  its loggers at INFO, as in a cell

    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    said = Said()
    logger.addHandler(said)
    yield logger, said.messages
    logger.removeHandler(said)
    console.setup(verbose=True)  # no filter left behind for the next test in this process


def test_harmless_lines_are_left_out_and_repeats_said_once(lightning_says):
    logger, messages = lightning_says
    console.setup(verbose=False)
    logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try LitLogger")
    logger.info("`Trainer(limit_val_batches=1)` was configured so 1 batch will be used.")
    logger.info("Using bfloat16 Automatic Mixed Precision (AMP)")
    logger.info("Using bfloat16 Automatic Mixed Precision (AMP)")  # the next Trainer's
    logger.warning("GPU available but not used. You can set it by doing `Trainer(...)`")
    assert messages == [
        "Using bfloat16 Automatic Mixed Precision (AMP)",
        "GPU available but not used. You can set it by doing `Trainer(...)`",
    ]
    console.setup(verbose=False)  # the next cell of a sweep: said afresh
    logger.info("Using bfloat16 Automatic Mixed Precision (AMP)")
    assert len(messages) == 3


def test_verbose_shows_everything(lightning_says):
    logger, messages = lightning_says
    console.setup(verbose=True)
    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try LitLogger"
    logger.info(tip)
    logger.info(tip)
    assert messages == [tip, tip]


def test_harmless_warnings_are_ignored_unless_verbose():
    hint = (
        "The `srun` command is available on your system but is not used. HINT: If your "
        "intention is to run Lightning on SLURM, prepend your python command with `srun`"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # whatever pytest's own filters say
        console.setup(verbose=False)
        console.setup(verbose=False)  # idempotent: one entry per pattern
        warnings.warn(hint, UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["something else"]
        console.setup(verbose=True)
        warnings.warn(hint, UserWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["something else", hint]
    patterns = [h.pattern for h in console.HARMLESS if h.source == console.WARNING]
    assert all(h.why for h in console.HARMLESS) and len(patterns) >= 2


def test_lightnings_own_console_handler_goes_under_hydras_logging(lightning_says):
    """Under Hydra's job logging (the root logger has a handler) Lightning's `INFO: ...`
    handler is removed and its records reach the root's handler, once."""
    lightning = logging.getLogger("lightning")
    own = logging.StreamHandler()
    lightning.addHandler(own)
    root = logging.getLogger()
    hydra_like = Said()
    root.addHandler(hydra_like)
    try:
        console.setup(verbose=False)
        assert own not in lightning.handlers and lightning.propagate
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("Seed set to 7")
        assert hydra_like.messages.count("Seed set to 7") == 1
    finally:
        root.removeHandler(hydra_like)
        lightning.removeHandler(own)
