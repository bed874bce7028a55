"""What happened to each cell of a sweep, and the summary said once at its end.

Every cell leaves an `outcome.json` in its output folder (finished, skipped because an earlier
launch finished it, or failed with the error), whichever launcher ran it: the done-marker that a
subprocess launcher reads back. A failed cell does not stop the others; the sweep exits non-zero
at the end if any failed.

With `plan=true` the sweep's cells are planned instead, before any launcher starts one
(`plan_sweep`, benchmark.orchestration.plan), and the command exits.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from benchmark.config.spec import CellSpec, from_config
from benchmark.runtime import console, interrupt, ranks
from benchmark.runtime.progress import SweepProgress, duration, sweep_size
from benchmark.tracking import identity
from benchmark.tracking.result import CellSummary, Status

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

    from benchmark.orchestration.plan import Plan

log = logging.getLogger("benchmark")
OUTCOME_FILE = identity.OUTCOME_FILE
# The sweep whose summary this process says (its own process, whatever the launcher).
_summary: SweepSummary | None = None


def summarised_here() -> bool:
    """Whether a sweep's summary runs in this process, its cells too (Hydra's basic launcher):
    a cell stopped by a signal then returns its outcome, and the sweep stops once it counted it,
    saying what ran and what did not (`SweepSummary.stop`)."""
    return _summary is not None and _summary.progress is not None


@dataclass
class CellOutcome:
    cell: str
    status: Status  # given as its string too ("failed"), as outcome files hold it
    score: float | None = None  # the cell's headline: test_acc (max_val_acc under protocol=study)
    run_id: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # ValueError: not a cell's status

    @classmethod
    def of(cls, cell: str, summary: CellSummary) -> CellOutcome:
        """The outcome of a cell that ran, or was skipped as FINISHED earlier (its summary)."""
        return cls(cell, summary.status, summary.score, summary.run_id)

    def save(self, folder: Path) -> None:
        """A DDP cell's ranks share its folder: rank 0 speaks for the cell."""
        if not ranks.is_rank_zero():
            return
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{OUTCOME_FILE}.{os.getpid()}"  # a reader never sees half a file
        partial.write_text(json.dumps(asdict(self)))
        partial.replace(folder / OUTCOME_FILE)

    @staticmethod
    def load(folder: Path, cell: str) -> CellOutcome:
        """What the cell in `folder` reported; a cell killed before it could say is failed."""
        said = identity.read_outcome(folder)
        if said == {}:
            return CellOutcome(cell, Status.failed, error=f"ended without an outcome; see {folder}")
        error = f"its outcome file {folder / OUTCOME_FILE} is damaged; see {folder}"
        if said is None:  # damaged
            return CellOutcome(cell, Status.failed, error=error)
        try:  # the file's JSON values as they are (a missing or unknown field fails here)
            return CellOutcome(**cast(dict[str, Any], said))
        except (TypeError, ValueError):  # not an outcome's fields, or not a cell's status
            return CellOutcome(cell, Status.failed, error=error)


# ---------------------------------------------------------------- plan=true: the sweep's cells


def sweep_jobs(config: DictConfig) -> list[list[str]]:
    """The overrides of each job of the `-m` sweep, in the order the sweeper launches them
    (Hydra's basic sweeper: its `params`, then the command line's)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    target = str(config.hydra.sweeper.get("_target_", ""))
    if not target.endswith("BasicSweeper"):
        raise ValueError(
            f"plan=true expands a sweep as Hydra's basic sweeper does; hydra/sweeper is {target}."
        )
    params = config.hydra.sweeper.get("params") or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += [str(override) for override in config.hydra.overrides.task]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    (batch,) = BasicSweeper.split_arguments(parser.parse_overrides(arguments), None)
    return batch


def cells_in(config: DictConfig) -> int:
    """The cells of the `-m` sweep: its jobs as Hydra's basic sweeper expands them (a preset's
    `hydra.sweeper.params` too, e.g. experiment=smoke's), else its command line's."""
    try:
        return len(sweep_jobs(config))
    except ValueError:  # another sweeper: what the command line says
        return sweep_size(config.hydra.overrides.task)


@contextmanager
def as_current(config: DictConfig) -> Iterator[None]:
    """`config` as Hydra's current config while its cell is read (`${hydra:...}`)."""
    instance = HydraConfig.instance()
    saved = instance.cfg
    instance.set_config(config)
    try:
        yield
    finally:
        instance.cfg = saved


class JobConfigs:
    """Each job's config as the launcher loads it (`load_sweep_config`), composed once per set
    of config-group choices: a job's plain values (seed=3, dataset.classes=null) are then set
    on a copy as Hydra sets them after composing (a sweep of 90 cells composes 18 times)."""

    def __init__(self, config: DictConfig) -> None:
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.config = config
        self.loader = GlobalHydra.instance().config_loader()
        self.parser = OverridesParser.create(config_loader=self.loader)
        self.composed: dict[tuple[str, ...], DictConfig] = {}

    def is_group(self, override: Override) -> bool:
        repository = getattr(self.loader, "repository", None)
        if override.package is not None or repository is None:
            return True
        return bool(repository.group_exists(override.key_or_group))

    def load(self, overrides: list[str]) -> DictConfig:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl

        parsed = self.parser.parse_overrides(overrides)
        groups = tuple(str(o.input_line) for o in parsed if self.is_group(o))
        values = [o for o in parsed if not self.is_group(o)]
        if groups not in self.composed:
            self.composed[groups] = self.loader.load_sweep_config(self.config, list(groups))
        job = copy.deepcopy(self.composed[groups])
        ConfigLoaderImpl._apply_overrides_to_config(values, job)
        return job

    def spec(self, overrides: list[str], index: int) -> CellSpec:
        """The cell of one job of the sweep, as the launcher would prepare it (its folder
        named, not created)."""
        job = self.load(overrides)
        with open_dict(job):
            job.hydra.job.id = job.hydra.job.num = index
            folder = Path(str(job.hydra.sweep.dir)).resolve() / str(job.hydra.sweep.subdir)
            job.hydra.runtime.output_dir = str(folder)
        with as_current(job):
            return from_config(job)


def plan_sweep(config: DictConfig) -> Plan:
    """The plan of the `-m` sweep whose (multirun) config this is: each job's cell, typed, then
    planned (benchmark.orchestration.plan)."""
    from benchmark.orchestration.plan import Planner, labels_of  # mlflow, torch: only here

    jobs, configs = sweep_jobs(config), JobConfigs(config)
    specs: list[CellSpec | Exception] = []
    for index, job in enumerate(jobs):
        try:
            specs.append(configs.spec(job, index))
        except Exception as error:  # composition or typing: said in its row
            specs.append(error)
    return Planner().plan(specs, labels_of(specs, jobs))


def planned(config: DictConfig) -> NoReturn:
    """`plan=true`: the plan of the whole sweep, printed (benchmark.orchestration.plan), then the
    command exits: no cell starts, no run opens (the sweep's parent run included)."""
    from benchmark.orchestration.plan import say
    from benchmark.tracking.server import TrackingUnreachable
    from benchmark.tracking.store import StoreError

    identity.use_credentials(config.tracking.get("history"))  # the store timing the cells
    try:
        code = say(plan_sweep(config))
    except (TrackingUnreachable, StoreError, ValueError) as error:  # one line, no traceback
        log.error("%s", identity.redact(str(error)))
        code = 1
    raise SystemExit(code)


class SweepSummary(Callback):
    """A Hydra callback: opens the sweep's parent MLflow run (the cells are its children, in this
    process or in others), counts each cell's outcome as it ends, summarises at the sweep's end
    and ends the parent run FINISHED, or FAILED if a cell failed."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.failed: list[str] = []
        self.parent: tuple[str, str] | None = None  # (tracking URI, run id)
        self.progress: SweepProgress | None = None
        self.here: dict[str, float] = {}  # cells started in this process: their start time
        self.closed = False  # the parent run ended and the summary said

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _summary
        identity.use_credentials(config.tracking.uri)  # the launcher and the cells inherit them
        if config.get("plan"):  # the sweep's plan instead, before any launcher starts a cell
            planned(config)
        from benchmark.tracking import store

        console.setup(bool(config.get("verbose", False)))  # before the store says anything
        sweep_dir = str(Path(config.hydra.sweep.dir).resolve())
        os.environ[identity.SWEEP_ENV] = sweep_dir
        self.progress = SweepProgress(cells_in(config))
        _summary = self
        # Whatever ends this process before the sweep's end (an error past a cell, a second
        # Ctrl-C), its parent run is not left RUNNING and what ran is said.
        atexit.register(self.ended_early)
        uri = identity.store_uri(config.tracking.uri)
        try:
            run_id = store.start_sweep_run(uri, config.tracking.experiment, sweep_dir)
        except Exception as error:  # the cells will say what is wrong with the store
            log.warning(
                "No parent run for the sweep in %s: %s",
                identity.redact(uri),
                identity.redact(str(error)),
            )
            return
        os.environ[identity.PARENT_RUN_ENV] = run_id
        self.parent = (uri, run_id)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A cell of the sweep starts in this process (Hydra's basic launcher): `cell k/N`,
        elapsed and time left. Launchers that start cells elsewhere say so themselves. A signal
        that came between two cells stops the sweep here, before the next one starts."""
        if self.progress is None:
            return  # a single run, or a cell process started by a launcher
        if interrupt.received():
            self.stop()
        overrides = " ".join(config.hydra.overrides.task)
        self.here[overrides] = time.monotonic()
        position, state = self.progress.start(), self.progress.status()
        log.info("cell %s starts [%s]: %s", position, state, overrides)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        overrides = " ".join(job_return.overrides or [])
        if job_return.status == JobStatus.FAILED:  # raised past the task function
            outcome = CellOutcome(overrides, Status.failed, error=str(job_return._return_value))
        else:
            outcome = job_return.return_value
        failed = outcome.status == Status.failed
        stopped = failed and outcome.error == interrupt.reason() != ""
        self.outcomes["interrupted" if stopped else outcome.status] += 1
        if failed and not stopped:
            self.failed.append(f"{overrides}: {outcome.error}")
        if self.progress is not None and (started := self.here.pop(overrides, None)):
            took = duration(time.monotonic() - started)
            state = self.progress.done(skipped=outcome.status == Status.skipped)
            log.info("cell %s after %s [%s]: %s", outcome.status, took, state, overrides)
        if self.progress is not None and interrupt.received():
            self.stop()

    def stop(self) -> NoReturn:
        """A signal (Ctrl-C, SIGTERM) stops the sweep between two cells: the cells not started
        are not run, the parent run ends KILLED with the counts, the summary says what to do,
        and the process exits 128 + the signal."""
        self.close("KILLED", f"stopped ({interrupt.reason()})")
        raise SystemExit(interrupt.exit_code())

    def ended_early(self) -> None:
        """At the process's exit, if the sweep did not reach its end (on_multirun_end) nor stop
        on a signal: the parent run FAILED (KILLED after a signal), and what ran said."""
        if self.closed or self.progress is None:
            return
        signalled = interrupt.received() is not None
        why = f"stopped ({interrupt.reason()})" if signalled else "ended before its last cell"
        self.close("KILLED" if signalled else "FAILED", why)

    def end_parent(self, counts: dict[str, int], status: str | None = None) -> None:
        """The sweep's parent run ended with `counts` (store.end_sweep_run: FINISHED, FAILED or
        `status`); a store that is down is a warning, never a hidden summary."""
        if self.parent is None:
            return
        from benchmark.tracking import store

        try:
            store.end_sweep_run(*self.parent, counts, status=status)
        except Exception as error:
            log.warning("The sweep's run %s could not be ended: %s", self.parent[1], error)

    def close(self, status: str, why: str) -> None:
        """End the parent run `status` with the counts (cells started here and never ended are
        `interrupted`, the rest `not run`) and say them, with the relaunch that runs the rest."""
        self.closed = True
        assert self.progress is not None
        counts = Counter(self.outcomes)
        counts["interrupted"] += len(self.here)
        counts["not_run"] = self.progress.total - sum(counts.values())
        self.end_parent(dict(counts), status)
        said = ", ".join(
            f"{n} {state.replace('_', ' ')}"
            for state in (*Status, "interrupted", "not_run")
            if (n := counts[state])
        )
        log.error(
            "Sweep %s after %d of %d cells: %s. Relaunch the same command to run the rest "
            "(finished cells are skipped).",
            why,
            self.progress.finished + len(self.here),
            self.progress.total,
            said,
        )
        for failure in self.failed:
            log.error("Failed: %s", failure)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self.closed = True
        if not self.outcomes:  # e.g. stock submitit launchers: the cells ended elsewhere
            log.warning(
                "Sweep done: no cell reported its outcome to this process; each cell's %s is in "
                "its folder under %s (hydra/launcher=slurm or slurm_local report them here).",
                OUTCOME_FILE,
                config.hydra.sweep.dir,
            )
            return
        self.end_parent(dict(self.outcomes))
        counts = ", ".join(f"{self.outcomes[state]} {state}" for state in Status)
        log.info("Sweep done: %d cells: %s.", sum(self.outcomes.values()), counts)
        if self.outcomes[Status.finished] or self.outcomes[Status.skipped]:  # once, not per cell
            uri = self.parent[0] if self.parent else identity.store_uri(config.tracking.uri)
            log.info("Browse runs: %s", identity.browse_command(uri))
        for failure in self.failed:
            log.error("Failed: %s", failure)
        if signum := interrupt.received():  # it came after the last cell had started
            log.error("The sweep was terminated by signal %d; relaunch it to run the rest.", signum)
            raise SystemExit(128 + signum)
        if self.failed:
            raise SystemExit(1)
