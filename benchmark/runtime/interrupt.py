"""SIGTERM (a scheduler's preemption, `kill`) or SIGINT (Ctrl-C): the cell ends FAILED, its
outcome written, and the process exits 128 + the signal's number (143, 130).

Python runs a signal handler between two bytecodes of whatever runs then, and an exception the
handler raises inside an at-fork hook or a finalizer is printed ("Exception ignored in ...") and
dropped: a SIGTERM that arrives while a DataLoader forks its workers would be lost, and the sweep
would go on. So the signal is also remembered, and `check` raises it again where a cell can stop:
after each batch (`StopOnSignal`), and before and after each cell. Between two cells of a sweep
(inside Hydra's own code) the handler only remembers it: the sweep then stops before its next
cell (benchmark.orchestration.sweep.SweepSummary), saying what ran and what did not.

Ctrl-C is handled the same way rather than as Python's KeyboardInterrupt: Lightning turns that
into `sys.exit(1)` with SIGINT ignored from then on, which left a tuned cell with no outcome and
a sweep with no summary, its parent run RUNNING.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

_received: int | None = None
_in_cell = False
_holding = False


class Terminated(BaseException):
    """The process was asked to stop: its cell ends FAILED, and the process exits 143.

    A BaseException, as KeyboardInterrupt is: libraries wrap whatever `Exception` comes through
    their code (MLflow's SQL store turns it into an MlflowException, which ended a cell that was
    terminated while it wrote a metric with a traceback and exit 1)."""


class Requeued(BaseException):
    """What ended a cell whose SLURM job was requeued on SLURM's warning (the launcher's
    checkpoint): submitit's exit, or the scheduler's SIGTERM, named for the run's error tag."""


HANDLED = (signal.SIGTERM, signal.SIGINT)
_requeued: str | None = None


def _said(signum: int) -> str:
    if signum == signal.SIGINT:
        return f"interrupted by Ctrl-C (signal {signum}, SIGINT)"
    return f"terminated by signal {signum} ({signal.Signals(signum).name})"


def _on_signal(signum: int, frame: object) -> None:
    global _received
    _received = signum
    if _in_cell and not _holding:
        raise Terminated(_said(signum))


@contextmanager
def cell() -> Iterator[None]:
    """While a cell runs, the signal raises Terminated where it lands."""
    global _in_cell
    _in_cell = True
    try:
        yield
    finally:
        _in_cell = False


@contextmanager
def held() -> Iterator[None]:
    """While the block runs (a cell recording why it ended), a signal is only remembered: raised
    inside it, it would cut that record short (a run left active, which MLflow's own exit hook
    then ends FINISHED). `received()` and `check()` tell it afterwards."""
    global _holding
    before, _holding = _holding, True
    try:
        yield
    finally:
        _holding = before


def install() -> None:
    """Handle SIGTERM and SIGINT from now on (Lightning's own SIGTERM handler calls this one
    while it trains)."""
    for signum in HANDLED:
        signal.signal(signum, _on_signal)


def received() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _received


def exit_code() -> int:
    """The exit status for the signal that stopped this process (128 + its number; 143, SIGTERM,
    when none was received but a cell was stopped, e.g. by Lightning's own SIGTERM handling)."""
    return 128 + (_received if _received is not None else signal.SIGTERM)


def reason() -> str:
    """What stopped this process ("terminated by signal 15 (SIGTERM)"), or "" if nothing did."""
    return _said(_received) if _received is not None else ""


def check() -> None:
    """Raise Terminated if the process was asked to stop, even if that first raise was lost."""
    if _received is not None:
        raise Terminated(_said(_received))


def requeue(said: str) -> None:
    """The cell's job is being requeued (`said`: why); whatever ends the cell now is that."""
    global _requeued
    _requeued = said


def requeued() -> str | None:
    """Why the cell's job is being requeued, if it is."""
    return _requeued


def as_ended(error: BaseException) -> BaseException:
    """`error` as the cell's run records it: Requeued when the job is being requeued and the
    error is how the process is stopped for it (submitit's SystemExit, the scheduler's SIGTERM)."""
    if _requeued is not None and isinstance(error, SystemExit | Terminated):
        return Requeued(_requeued)
    return error
