"""A tracking store read and never written, for a plan (`plan=true`, benchmark.orchestration.plan):
which cells already FINISHED there (by their cell key), and how long cells like the planned ones
took (their history), without torch.

Nothing is created or changed: a SQLite file that is not there is an empty store (no file, no
migration), an experiment that is not there has no runs, and no stale run is ended.

The estimate scales history by the work. A FINISHED cell run logs its wall time (`wall_time_s`,
the whole cell: data, features, tuning, fit, test), its tuning's time and trial-epochs when it
tuned (`tune_s`, `tune_epochs_run`; a run that took another seed's values, `tune.reused_from`,
did not tune) and its training images (`n_train`). Its fit costs `wall_time_s - tune_s` seconds
for `n_train x epochs` (train image x epoch), its tuning `tune_s` for `n_train x trial-epochs`.
The rates of the runs like the planned cell (the same strategy, backbone, input, device, tuning
and precision; tuning let go first, then precision, then both, when no run matches) are pooled
(their seconds over their work: planned cells like history's add up to history's total), then
multiplied by the planned cell's work. Without a matching run the cell gets
DEFAULT_S_PER_IMAGE_EPOCH, said as unsupported.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run, ViewType

from benchmark.config.schema import TuneConfig
from benchmark.tracking import server
from benchmark.tracking.identity import CELL_KEY_TAG, DEBUG_TAG, HARNESS_TAG, KIND_TAG
from benchmark.tracking.store import check_sqlite

# Seconds per (train image x epoch) where no history matches: a stated guess, about what
# EfficientNet-Lite0 fine-tuning takes on a 2-core CPU in bf16 (results/grid: 0.045 s)...
DEFAULT_S_PER_IMAGE_EPOCH = 0.05
# ...and a head on cached features (freeze, linear_probe: the backbone runs once, the head's
# epochs are small matrix products). Measured on new stores, a busy 2-core CPU, a freeze and a
# linear_probe cell together (10 epochs): Hymenoptera (195 train images) 38.9 s, 0.0100 s per
# unit; Dogs vs. Cats (895) 86.6 s, 0.0048 (a cell's fixed start weighs more on a small set).
# Their geometric mean, 0.007, puts both within 0.5x-2x (0.70x and 1.45x).
DEFAULT_S_PER_FEATURE_EPOCH = 0.007


def default_rate(input_kind: str) -> float:
    """The guessed seconds per (train image x epoch) of a cell with no history like it."""
    cached = input_kind.startswith("features") or input_kind == "feature_views"
    return DEFAULT_S_PER_FEATURE_EPOCH if cached else DEFAULT_S_PER_IMAGE_EPOCH


# What a cell's time depends on, matched between the planned cell and its history: ALWAYS, and
# RELAXED as long as some run matches (tuning let go first, then precision, then both).
ALWAYS = ("strategy", "backbone", "input", "device")
RELAXED = ("precision", "tuned")
WORDS = {"precision": "precision", "tuned": "tuning"}
COLUMNS = (
    "run_id", "cell_key", "timed", "start_time", *ALWAYS, *RELAXED,
    "n_train", "epochs", "wall_time_s", "tune_s", "tune_epochs",
)  # fmt: skip


def _number(value: object) -> float | None:
    """A param's or metric's value as a number (params are strings: "10", "None")."""
    try:
        number = float(str(value))
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def backbone_name(name: str, model: str | None) -> str:
    """`backbone=timm` is many backbones: named by its model."""
    return f"timm:{model}" if name == "timm" and model not in (None, "None") else name


def device_kind(device: str) -> str:
    """`cpu`, or `gpu` for any accelerator (a run's `device` tag names its GPU)."""
    return "cpu" if device == "cpu" else "gpu"


def trial_epochs_of(params: Mapping[str, str]) -> float | None:
    """The trial-epochs a run's tuning could spend, from its params (runs that logged neither
    `tune_epochs_run` nor `tune_budget_epochs`): the cell's own rule, TuneConfig.budget_epochs."""
    trials, epochs = _number(params.get("tune.trials")), _number(params.get("trainer.max_epochs"))
    if not trials or not epochs:
        return None
    tune = TuneConfig(
        trials=int(trials),
        epochs=int(e) if (e := _number(params.get("tune.epochs"))) else None,
        epochs_fraction=_number(params.get("tune.epochs_fraction")),
        budget_fraction=_number(params.get("tune.budget_fraction")),
    )
    return tune.budget_epochs(int(epochs))


def run_row(run: Run) -> dict[str, object]:
    """A FINISHED run as the plan reads it: its cell key (what a launch skips, as
    store.finished_run finds it), and what the estimate reads (`timed`: a cell of the harness
    at its full budget, not debug)."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    timed = (
        tags.get(HARNESS_TAG) == "benchmark"
        and tags.get(KIND_TAG, "cell") == "cell"
        and tags.get(DEBUG_TAG) != "true"
    )
    tuned_itself = _number(metrics.get("tune_s")) and params.get("tune.reused_from") in (
        None,
        "None",
    )
    tune_epochs = None
    if tuned_itself:
        tune_epochs = (
            _number(metrics.get("tune_epochs_run"))
            or _number(metrics.get("tune_budget_epochs"))
            or trial_epochs_of(params)
        )
    trials = _number(params.get("tune.trials"))
    return {
        "run_id": run.info.run_id,
        "cell_key": tags.get(CELL_KEY_TAG),
        "timed": timed,
        "start_time": run.info.start_time,
        "strategy": params.get("strategy"),
        "backbone": backbone_name(str(params.get("backbone")), params.get("backbone.model")),
        "input": params.get("input"),
        "device": device_kind(tags.get("device", "cpu")),
        "tuned": bool(trials) and params.get("strategy.fit") != "lbfgs",
        "precision": params.get("trainer.precision"),
        "n_train": _number(params.get("n_train")),
        "epochs": _number(metrics.get("epochs_run")) or _number(params.get("trainer.max_epochs")),
        "wall_time_s": _number(metrics.get("wall_time_s")),
        "tune_s": _number(metrics.get("tune_s")) or 0.0,
        "tune_epochs": tune_epochs,
    }


def finished_runs(uri: str, experiment: str) -> pd.DataFrame:
    """The FINISHED runs of `experiment` in the store at `uri`, one row each (COLUMNS), read
    without writing anything: no store, or no such experiment, is no runs."""
    empty = pd.DataFrame(columns=list(COLUMNS))
    if uri.startswith("sqlite:///"):
        if not Path(uri.removeprefix("sqlite:///")).is_file():
            return empty
        check_sqlite(uri, write=False)  # someone else's database: one line, nothing written
        if Path(uri.removeprefix("sqlite:///")).stat().st_size == 0:
            return empty  # a new empty file: MLflow would migrate it
    server.check_reachable(uri)
    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return empty
    rows, token = [], None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            "attributes.status = 'FINISHED'",
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            page_token=token,
        )
        rows += [run_row(run) for run in page]
        token = page.token
        if not token:
            break
    return pd.DataFrame(rows, columns=list(COLUMNS)) if rows else empty


@dataclass(frozen=True)
class Work:
    """What a planned cell will compute, as the estimate scales it."""

    strategy: str
    backbone: str
    input: str
    device: str  # device_kind
    tuned: bool
    precision: str
    train_images: int  # per epoch
    epochs: int
    tune_epochs: int = 0  # trial-epochs of its own tuning (0: untuned, or another seed's values)

    def key(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in (*ALWAYS, *RELAXED)}


@dataclass(frozen=True)
class Estimate:
    seconds: float
    basis: str  # how many runs it comes from, and what was let go: the plan's column
    supported: bool  # False: no run matched, the default rate


@dataclass(frozen=True)
class Rate:
    seconds_per_unit: float
    runs: int
    relaxed: tuple[str, ...]

    def said(self) -> str:
        let_go = f", any {' or '.join(WORDS[r] for r in self.relaxed)}" if self.relaxed else ""
        return f"{self.runs} run{'s' if self.runs != 1 else ''}{let_go}"


class History:
    """The FINISHED cell runs an estimate comes from (`finished_runs` of a store): the timed
    ones with a wall time and training images logged."""

    def __init__(self, runs: pd.DataFrame, source: str = "") -> None:
        usable = runs[runs.timed.astype(bool)]
        usable = usable.dropna(subset=["wall_time_s", "n_train", "epochs", "strategy", "backbone"])
        usable = usable[(usable.n_train > 0) & (usable.epochs > 0)].copy()
        usable["fit_s"] = (usable.wall_time_s - usable.tune_s.fillna(0.0)).clip(lower=0.0)
        usable["fit_work"] = usable.n_train * usable.epochs
        usable["tune_work"] = usable.n_train * usable.tune_epochs.astype(float).fillna(0.0)
        self.runs, self.source = usable, source

    def per_strategy(self) -> Counter[str]:
        return Counter(self.runs.strategy.astype(str))

    def _rate(self, work: Work, seconds: str, units: str, relaxable: Sequence[str]) -> Rate | None:
        """Pooled seconds per unit of the runs like `work` in ALWAYS and in as many fields of
        `relaxable` as some run matches, the earlier ones kept first (RELAXED: all, then
        precision without tuning, then tuning without precision, then neither)."""
        runs = self.runs[self.runs[units] > 0]
        key = work.key()
        n = len(relaxable)
        for kept in (kept for k in range(n, -1, -1) for kept in combinations(relaxable, k)):
            like = runs
            for name in (*ALWAYS, *kept):
                like = like[like[name] == key[name]]
            if len(like):
                relaxed = tuple(n for n in reversed(relaxable) if n not in kept)
                return Rate(float(like[seconds].sum() / like[units].sum()), len(like), relaxed)
        return None

    def estimate(self, work: Work) -> Estimate:
        """The seconds `work` should take, and what that rests on."""
        fit = self._rate(work, "fit_s", "fit_work", RELAXED)
        supported = fit is not None
        per_unit = fit.seconds_per_unit if fit else default_rate(work.input)
        basis = fit.said() if fit else f"none: default {per_unit:g} s/image-epoch"
        seconds = per_unit * work.train_images * work.epochs
        if work.tune_epochs:
            tune = self._rate(work, "tune_s", "tune_work", ("precision",))
            if tune is not None:
                seconds += tune.seconds_per_unit * work.train_images * work.tune_epochs
                basis += f"; tuning {tune.said()}"
            else:  # a trial-epoch priced as an epoch of the cell's own fit
                seconds += per_unit * work.train_images * work.tune_epochs
                basis += "; tuning at the fit's rate"
        return Estimate(seconds, basis, supported)
