"""`plan=true`: before a sweep starts, what it will do. Every cell of the sweep (or the one cell of
a single run): its name, whether the tracking store has it FINISHED already (the sweep then skips
it), its train / val / test images and its estimated time; then the totals and the basis of the
estimate. Nothing trains, no MLflow run opens and nothing is written to any store: the stores
are only read (benchmark.tracking.history), the data only scanned (its checks remembered in
paths.cache_dir, so a second plan is fast) and never downloaded.

The estimate comes from history, not a guess: the FINISHED runs of `tracking.history` (default:
the sweep's own store) like each cell, scaled by the cell's work (train images x epochs, plus
its tuning's trial-epochs); see benchmark.tracking.history.

Under `-m`, the harness's SweepSummary callback plans the whole sweep before any launcher starts
(benchmark.orchestration.sweep.plan_sweep: the jobs expanded and composed as Hydra's basic
sweeper and the launchers do, then typed): Hydra's basic launcher, `hydra/launcher=gpus` and
the SLURM launchers alike print one table and exit. This module takes the typed cells only.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from benchmark.config.rules import check
from benchmark.config.spec import CellSpec
from benchmark.data import DatasetError
from benchmark.data.manifest import Manifest, build_manifest
from benchmark.runtime.progress import duration
from benchmark.tracking import history, identity

DONE, TO_RUN, NOT_PLANNED = "done", "to run", "not planned"
# The cell's name says these; other keys that vary over the sweep are added to it.
NAMED = ("dataset", "colour", "strategy", "backbone", "seed")


@dataclass
class PlannedCell:
    label: str  # the cell's name, and the sweep's other varying overrides
    state: str = NOT_PLANNED
    splits: dict[str, int] = field(default_factory=dict)
    epochs: int | None = None
    estimate: history.Estimate | None = None
    run_id: str | None = None  # DONE: its FINISHED run
    note: str = ""
    error: str | None = None  # NOT_PLANNED: why
    device: str = ""


@dataclass
class Plan:
    cells: list[PlannedCell]
    store: str  # where done cells are looked up
    histories: dict[str, history.History]  # by store URI

    @property
    def to_run(self) -> list[PlannedCell]:
        return [c for c in self.cells if c.state == TO_RUN]

    @property
    def seconds(self) -> float:
        return sum(c.estimate.seconds for c in self.to_run if c.estimate is not None)

    @property
    def unsupported(self) -> list[PlannedCell]:
        return [c for c in self.to_run if c.estimate is not None and not c.estimate.supported]


# ---------------------------------------------------------------- the work of one cell


def images_per_epoch(spec: CellSpec, n_train: int) -> int:
    """The training images an epoch sees: all of them, or `trainer.limit_train_batches`' share
    (an int: that many batches; a float: that fraction)."""
    limit = spec.trainer.get("limit_train_batches")
    if isinstance(limit, bool) or limit is None:
        return n_train
    if isinstance(limit, int):
        return min(n_train, limit * spec.data.batch_size)
    if isinstance(limit, float) and limit < 1.0:
        return int(n_train * limit)
    return n_train


def epochs_of(spec: CellSpec, images: int) -> int:
    """`trainer.max_epochs`, raised to hold `protocol.min_steps` optimizer steps (MinSteps)."""
    epochs = spec.max_epochs
    if spec.protocol.min_steps and images:
        steps = math.ceil(images / spec.data.batch_size)
        epochs = max(epochs, math.ceil(spec.protocol.min_steps / steps))
    return epochs


def input_of(spec: CellSpec) -> str:
    """The run param `input` the cell will log: what its head trains on."""
    augmented = bool(spec.augment.transforms) and spec.strategy.train_augmentation
    return spec.input_kind(augmented).param(spec.speed.augmented_views)


def device_of(spec: CellSpec) -> str:
    from benchmark.models.precision import device_type

    return history.device_kind(device_type(str(spec.trainer.get("accelerator", "auto"))))


def tuning_budget(spec: CellSpec) -> int:
    """The trial-epochs a tuned cell's trials may spend: the rule the tuning itself reads
    (TuneConfig.budget_epochs), without importing Lightning and Optuna for it."""
    return spec.tune.budget_epochs(spec.max_epochs)


def work_of(spec: CellSpec, n_train: int, tune_epochs: int) -> history.Work:
    """`spec` resolved (precision)."""
    images = images_per_epoch(spec, n_train)
    return history.Work(
        strategy=spec.strategy.name,
        backbone=history.backbone_name(spec.backbone.name, spec.backbone.model),
        input=input_of(spec),
        device=device_of(spec),
        tuned=bool(spec.tune.trials) and not spec.probe,
        precision=str(spec.trainer.get("precision")),
        train_images=images,
        epochs=epochs_of(spec, images),
        tune_epochs=tune_epochs,
    )


# ---------------------------------------------------------------- planning the cells


class Planner:
    """Plans cells, reading each store and building each manifest once."""

    def __init__(self) -> None:
        self.manifests: dict[str, Manifest] = {}
        self.finished: dict[tuple[str, str], pd.DataFrame] = {}
        self.histories: dict[str, history.History] = {}

    def manifest(self, spec: CellSpec) -> Manifest:
        """The cell's images and splits, as the cell builds them (a cell of another colour or
        strategy shares them), without downloading anything that is not there."""
        offline = dataclasses.replace(spec.dataset, download=False)
        memo = json.dumps(
            [dataclasses.asdict(offline), spec.paths.data_root, spec.seed, spec.paths.cache_dir],
            sort_keys=True,
            default=str,
        )
        if memo not in self.manifests:
            self.manifests[memo] = build_manifest(
                offline, Path(spec.paths.data_root), spec.seed, spec.cache_dir
            )
        return self.manifests[memo]

    def key(self, spec: CellSpec) -> str:
        """The cell's key, as its own process computes it (benchmark.cell.run.plan)."""
        return identity.cell_key(spec, self.manifest(spec).sha256)

    def runs(self, uri: str, experiment: str) -> pd.DataFrame:
        if (uri, experiment) not in self.finished:
            self.finished[uri, experiment] = history.finished_runs(uri, experiment)
        return self.finished[uri, experiment]

    def done(self, spec: CellSpec, key: str) -> str | None:
        """The run id of the cell's latest FINISHED run in its store, if any."""
        runs = self.runs(identity.tracking_uri(spec), spec.tracking.experiment)
        mine = runs[runs.cell_key == key].sort_values("start_time")
        return None if mine.empty else str(mine.run_id.iloc[-1])

    def history(self, spec: CellSpec) -> history.History:
        uri = identity.store_uri(spec.tracking.history or spec.tracking.uri)
        if uri not in self.histories:
            runs = self.runs(uri, spec.tracking.experiment)
            self.histories[uri] = history.History(runs, uri)
        return self.histories[uri]

    def plan(self, specs: Sequence[CellSpec | Exception], labels: Sequence[str]) -> Plan:
        from benchmark.models import precision  # torch: after the config is known good

        cells: list[PlannedCell] = []
        resolved: list[tuple[CellSpec, Manifest, str] | None] = []
        for spec, label in zip(specs, labels, strict=True):
            cell = PlannedCell(label)
            cells.append(cell)
            resolved.append(None)
            if isinstance(spec, Exception):
                cell.error = one_line(spec)
                continue
            try:
                check(spec)  # every rule, as the cell's first step
                spec = precision.resolve(spec)  # `auto` -> what runs here, before the key
                manifest = self.manifest(spec)
                key = self.key(spec)
            except Exception as error:  # bad input: said in its row, the others go on
                cell.error = one_line(error)
                if isinstance(error, DatasetError) and spec.dataset.download:
                    cell.error += " (dataset.download=true: the cell itself tries to fetch it)"
                continue
            resolved[-1] = (spec, manifest, key)
            counts = manifest.frame.split.value_counts()
            cell.splits = {name: int(counts.get(name, 0)) for name in ("train", "val", "test")}
            cell.run_id = None if spec.rerun else self.done(spec, key)
            cell.state = DONE if cell.run_id else TO_RUN
        to_run = {r[2] for r, c in zip(resolved, cells, strict=True) if r and c.state == TO_RUN}
        for cell, planned in zip(cells, resolved, strict=True):
            if planned is None:
                continue
            spec, manifest, key = planned
            tune_epochs, cell.note = self.tuning(spec, to_run)
            work = work_of(spec, cell.splits["train"], tune_epochs)
            cell.epochs, cell.device = work.epochs, work.device
            cell.estimate = self.history(spec).estimate(work)
        stores = {identity.tracking_uri(s) for s in specs if isinstance(s, CellSpec)}
        said = ", ".join(sorted(identity.redact(uri) for uri in stores))
        return Plan(cells, said or identity.redact(identity.store_uri(None)), self.histories)

    def tuning(self, spec: CellSpec, to_run: set[str]) -> tuple[int, str]:
        """The trial-epochs the cell's own tuning may spend, and a note: none when it does not
        tune, or when it will take `tune.reuse_seed`'s values (that seed's cell FINISHED, or
        is in this plan)."""
        if not spec.tune.trials or spec.probe:
            return 0, ""
        donor = spec.tune.reuse_seed
        if donor is not None and donor != spec.seed:
            try:
                key = self.key(dataclasses.replace(spec, seed=donor))
            except Exception:  # the donor's data: said by the donor's own row
                key = None
            if key is not None and (key in to_run or self.done(spec, key)):
                return 0, f"tuning: seed {donor}'s values"
        return tuning_budget(spec), ""


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return identity.redact(text if len(text) < 300 else text[:297] + "...")


# ---------------------------------------------------------------- the table


def render(plan: Plan) -> str:
    """The plan as the command prints it: one row a cell, then the totals and the basis."""
    rows = []
    for number, cell in enumerate(plan.cells):
        estimate = cell.estimate
        rows.append(
            [
                number,
                cell.label,
                cell.state,
                *(cell.splits.get(s, "") for s in ("train", "val", "test")),
                cell.epochs or "",
                duration(estimate.seconds) if estimate else "",
                ("" if estimate is None else estimate.basis)
                + (f"; {cell.note}" if cell.note else ""),
            ]
        )
    headers = ["#", "cell", "state", "train", "val", "test", "epochs", "estimate", "basis"]
    lines = [
        f"Plan of {len(plan.cells)} cell(s), nothing run (plan=true). done: FINISHED in "
        f"{plan.store} already (a launch skips it; rerun=true runs it again).",
        tabulate(rows, headers, tablefmt="simple", disable_numparse=True),
        "",
    ]
    to_run, done = plan.to_run, [c for c in plan.cells if c.state == DONE]
    devices = ", ".join(sorted({c.device for c in to_run})) or "-"
    lines.append(
        f"Cells to run: {len(to_run)}; done: {len(done)}; not planned: "
        f"{len(plan.cells) - len(to_run) - len(done)}. Estimated time of the cells to run: "
        f"{plan.seconds / 3600:.1f} h ({duration(plan.seconds)}), one cell at a time on "
        f"{devices} (N cells at once: about 1/N of it, if the cores allow)."
    )
    if unsupported := plan.unsupported:
        lines.append(
            f"Unsupported: {len(unsupported)} cell(s) have no history like them: timed at the "
            f"default {history.DEFAULT_S_PER_IMAGE_EPOCH:g} s per (train image x epoch) on "
            f"images, {history.DEFAULT_S_PER_FEATURE_EPOCH:g} s on cached features, a guess."
        )
    for uri, source in plan.histories.items():
        counts = source.per_strategy()
        per = ", ".join(f"{name} {n}" for name, n in sorted(counts.items())) or "none"
        lines.append(
            f"Basis: {sum(counts.values())} FINISHED cell run(s) in {identity.redact(uri)} "
            f"(per strategy: {per}). A cell's time = the pooled seconds per (train image x "
            "epoch) of the runs with its strategy, backbone, input and device, and its tuning "
            "and precision while some run has them (the basis column says which were let go), "
            "x its train images x epochs; a tuned cell adds its tuning budget (trial-epochs, "
            "tune_budget_epochs) at the seconds per (train image x trial-epoch) that tuning "
            "took (tune_s / tune_epochs_run). Another store's history: tracking.history=URI."
        )
    errors = [(n, c) for n, c in enumerate(plan.cells) if c.state == NOT_PLANNED]
    for number, cell in errors:
        lines.append(f"Not planned: #{number} {cell.label}: {cell.error}")
    return "\n".join(lines)


# ---------------------------------------------------------------- a sweep


def labels_of(specs: Sequence[CellSpec | Exception], jobs: Sequence[Sequence[str]]) -> list[str]:
    """Each cell's name, with the sweep's other varying overrides (tune=fair, strategy.lr=...)."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    varying = {k for k, v in values.items() if len(v) > 1 and k.lstrip("+~") not in NAMED}
    labels = []
    for spec, job in zip(specs, jobs, strict=True):
        extra = [o for o in job if o.partition("=")[0] in varying]
        name = spec.name if isinstance(spec, CellSpec) else " ".join(job)
        labels.append(" ".join([name, *extra]))
    return labels


def plan_cell(spec: CellSpec) -> Plan:
    """The plan of a single run's cell."""
    return Planner().plan([spec], [spec.name])


def say(plan: Plan) -> int:
    """Print the plan; the command's exit status: 0 when every cell could be planned, 1
    otherwise (each reason is in the plan)."""
    print(render(plan), flush=True)
    return int(any(c.state == NOT_PLANNED for c in plan.cells))
