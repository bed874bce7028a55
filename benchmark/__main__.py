"""`python -m benchmark [-m] key=value ...` (or `benchmark ...`): one cell, or with -m a sweep over
the grid. Only the config is read before the cell starts: torch, Lightning and MLflow are
imported when a cell runs, so `--help`, `--cfg job` and a config error answer at once."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from benchmark.config.rules import problems
from benchmark.config.schema import register_configs
from benchmark.config.spec import CellSpec, from_config
from benchmark.orchestration.sweep import CellOutcome, summarised_here
from benchmark.runtime import console, interrupt
from benchmark.tracking.identity import browse_command, redact, use_credentials
from benchmark.tracking.result import CellSummary, Status

log = logging.getLogger("benchmark")


def terminated(name: str, folder: Path, reason: str) -> CellOutcome:
    """The cell was asked to stop: its outcome FAILED, one line, exit 128 + the signal (143 for
    SIGTERM, 130 for Ctrl-C). In a sweep's own process the outcome is returned instead: the
    sweep counts it, then stops and says what ran (SweepSummary)."""
    if (requeued := interrupt.requeued()) is not None:  # not an outcome: the job runs again
        log.warning("%s: %s; its run is FAILED.", name, requeued)
        raise SystemExit(interrupt.exit_code()) from None
    reason = reason or "terminated by signal 15 (SIGTERM)"
    log.error("%s: %s; its run is FAILED, relaunch to run it again.", name, reason)
    outcome = CellOutcome(name, Status.failed, error=reason)
    outcome.save(folder)
    return stopping(outcome)


def stopping(outcome: CellOutcome) -> CellOutcome:
    """After a signal: `outcome` for the sweep of this process to count before it stops, or the
    process exits 128 + the signal."""
    if summarised_here():
        return outcome
    raise SystemExit(interrupt.exit_code()) from None


def plan(spec: CellSpec, multirun: bool) -> CellOutcome:
    """`plan=true` on one cell: its plan printed (benchmark.orchestration.plan), then exit."""
    from benchmark.orchestration.plan import plan_cell, say
    from benchmark.tracking.server import TrackingUnreachable
    from benchmark.tracking.store import StoreError

    use_credentials(spec.tracking.history)  # the store timing the cell
    try:
        code = say(plan_cell(spec))
    except (TrackingUnreachable, StoreError) as error:
        log.error("%s", redact(str(error)))
        code = 1
    if multirun:  # a sweep without SweepSummary: each of its cells says its own plan
        return CellOutcome(spec.name, Status.failed if code else Status.skipped)
    raise SystemExit(code)


def uri_problems(spec: CellSpec) -> list[str]:
    """The cell's tracking URI checked by its form alone (scheme, driver): [] or the one line."""
    from benchmark.tracking.identity import tracking_uri
    from benchmark.tracking.server import BadTrackingUri, check_uri

    try:
        check_uri(tracking_uri(spec))
    except BadTrackingUri as error:
        return [redact(str(error))]
    return []


register_configs()
# Lightning 2.6 on torch 2.14 warns about its own use of a torch API, once per loop.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# A frozen backbone runs in eval mode on purpose (TransferClassifier.train).
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


# Absolute: the installed `benchmark` command finds conf/ from any folder.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> CellOutcome:
    """One cell. Its outcome goes to `outcome.json` in its output folder, for any launcher."""
    hydra_cfg = HydraConfig.get()
    spec = from_config(cfg)  # the boundary: typed from here on
    folder = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    use_credentials(spec.tracking.uri)  # before any store is reached; a launcher's cells inherit
    if spec.plan:  # the cell's plan, nothing run (a sweep's is said once, by SweepSummary)
        return plan(spec, multirun)
    # Out of range, or a tracking URI no store answers to: said before torch and Lightning are
    # imported (a misspelt scheme would otherwise be found half a minute later, in tracebacks).
    if found := problems(spec) or uri_problems(spec):
        return refused(spec.name, folder, found, multirun)
    return run(spec, folder, multirun)


def refused(name: str, folder: Path, found: list[str], multirun: bool) -> CellOutcome:
    """A cell whose config is refused: said in one line, its outcome FAILED (a ConfigError);
    returned in a sweep, else the process exits 1."""
    log.error("%s", " ".join(found))
    outcome = CellOutcome(name, Status.failed, error=f"ConfigError: {' '.join(found)}")
    outcome.save(folder)
    if multirun:
        return outcome
    raise SystemExit(1)


def bad_input_errors() -> tuple[type[Exception], ...]:
    """The errors that are bad input, not bugs (imported here: below them are torch and
    Lightning)."""
    from benchmark.config.rules import ConfigError
    from benchmark.data import DatasetError
    from benchmark.models.backbones import BackboneError
    from benchmark.tracking.server import TrackingUnreachable
    from benchmark.tracking.store import StoreError

    return (ConfigError, DatasetError, BackboneError, TrackingUnreachable, StoreError)


def run(spec: CellSpec, folder: Path, multirun: bool) -> CellOutcome:
    """The cell run, its outcome saved: a signal ends it as `terminated` says; a failure is
    said (bad input in one line, a bug with its traceback), then returned in a sweep, else the
    process exits 1 (bad input) or the error propagates."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from benchmark.cell.run import run_cell
    from benchmark.orchestration.distributed import RELAUNCH_UNDER_MULTIRUN, relaunches_command
    from benchmark.tracking.identity import tracking_uri
    from benchmark.tracking.server import explained

    name, bad_inputs = spec.name, bad_input_errors()
    console.setup(spec.verbose)  # Lightning is imported: each of its lines once, or none
    if multirun and relaunches_command(spec.trainer):
        log.error(RELAUNCH_UNDER_MULTIRUN.format(strategy=spec.trainer["strategy"]))
        raise SystemExit(2)  # before any cell starts ranks; stops the sweep
    interrupt.install()
    try:
        interrupt.check()  # an earlier cell of this sweep was asked to stop
        with interrupt.cell(), explained(tracking_uri(spec)):  # a server gone: one line
            result = run_cell(spec)
    except (interrupt.Terminated, SIGTERMException) as error:
        return terminated(name, folder, str(error))
    except Exception as error:
        if interrupt.received():  # the signal came, and some code turned it into this error
            return terminated(name, folder, interrupt.reason())
        bad_input = isinstance(error, bad_inputs)
        outcome = failed(name, folder, error, bad_input)
        if multirun:
            return outcome  # the other cells go on; SweepSummary fails the sweep at the end
        if bad_input:
            raise SystemExit(1) from None
        raise
    return finished(name, folder, result, multirun)


def failed(name: str, folder: Path, error: Exception, bad_input: bool) -> CellOutcome:
    """The cell failed with `error` (being handled): said, bad input in one line and a bug with
    its traceback, and its outcome FAILED saved."""
    if bad_input:  # not a bug: say what and how to fix it, without a traceback
        log.error("%s", error)
    else:
        log.exception("%s failed", name)
    outcome = CellOutcome(name, Status.failed, error=redact(f"{type(error).__name__}: {error}"))
    outcome.save(folder)
    return outcome


def finished(name: str, folder: Path, result: CellSummary, multirun: bool) -> CellOutcome:
    """A cell that ran: its line said and its outcome saved; a signal that came as it ended
    stops here (`stopping`)."""
    log.info("%s", redact(result.line()))  # a tracking URI's password is never logged
    if not multirun:  # a sweep says it once, at its end (SweepSummary)
        log.info("Browse runs: %s", browse_command(result.tracking_uri))
    outcome = CellOutcome.of(name, result)
    outcome.save(folder)
    if interrupt.received():  # it came as the cell ended: the cell is done, stop here
        log.error("%s %s, then the process was %s.", name, outcome.status, interrupt.reason())
        return stopping(outcome)
    return outcome


if __name__ == "__main__":
    main()
