"""`tune.trials=K`: the cell's learning rate, weight decay and (where the backbone trains) the
backbone's rate factor searched on the validation split alone, before the cell's own fit.
`tune=fair` (conf/tune/fair.yaml) gives every strategy that trains the same search: the same
dimensions over the same ranges and the same budget in trial-epochs.

The trials (Optuna's TPE sampler, seeded with the cell's seed) each fit the cell's model from
the same starting weights for `tune.epochs` epochs (or `tune.epochs_fraction` of the cell's),
until the budget (`tune.budget_fraction` of the cell's epochs, in trial-epochs; else K trials of
full length) is spent or K trials ran: a pruned trial's unspent epochs go to further trials, so
every strategy of a cell spends the same trial-epochs. A trial's score is its best validation
accuracy so far; the pruner (Optuna's, through optuna-integration's
PyTorchLightningPruningCallback) compares that same score epoch by epoch and never prunes a
trial at its last epoch, and the choice is the best score among completed and pruned trials
alike (ties: the earlier trial), so no trial is dropped for a number the selection would keep.
The trials see data without the test split (its rows, or its cached features, removed). The
searched learning rate is the rate of what trains: a strategy's `ft_lr_factor` (lp_ft) does not
scale it. The cell then fits at the chosen values as usual; they are run params
(`tune.chosen.*`), the tuning's cost and budget are metrics (`tune_s`, `tune_budget_epochs`,
`tune_epochs_run`) and its trials a table artifact (`tune_trials.json`). Each seed tunes on its
own validation split by default, so an interval over seeds includes the tuning's own variance
(`tune.reuse_seed` takes another seed's choice instead).

The search can be followed and browsed: a line per trial as it ends, pruned ones too, and a
closing line with the choice and the trial-epochs spent of the budget; the Optuna study is kept
in the cell's output folder (STUDY_FILE, the study named after the cell: `optuna-dashboard
sqlite:///<output_dir>/optuna.db`), the same trials as an in-memory study gives (the sampler is
seeded, and the storage only records); and a `TrialObserver` (the cell's: each trial as an MLflow
child run of the cell's run) sees each trial start and end.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, SupportsFloat, SupportsInt, cast

import lightning as L
import numpy as np
import optuna
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import FrozenTrial, TrialState
from optuna_integration import PyTorchLightningPruningCallback
from scipy.stats import qmc

from benchmark.config.schema import Pruner, Startup, TuneConfig
from benchmark.config.spec import CellSpec
from benchmark.data.loading import ManifestDataModule
from benchmark.models.classifier import recipe_callbacks
from benchmark.models.features import FeatureDataModule
from benchmark.models.trainer import build_trainer
from benchmark.runtime import ranks
from benchmark.runtime.progress import duration
from benchmark.tracking import identity, store
from benchmark.tracking.resume import cell_identity

log = logging.getLogger("benchmark")

# The cell's Optuna study, in its output folder: `optuna-dashboard sqlite:///<that file>`.
STUDY_FILE = "optuna.db"


class TrialObserver(Protocol):
    """Sees each trial of `choose` start (and may add Lightning callbacks to its fit) and end:
    COMPLETE or PRUNED (`ended`), or raised (`failed`)."""

    def started(self, number: int, values: dict[str, float], epochs: int) -> list[Callback]: ...

    def ended(self, trial: FrozenTrial) -> None: ...

    def failed(self, number: int, error: BaseException) -> None: ...


@dataclass
class Tuned:
    values: dict[str, float]  # the chosen learning rate (and weight decay), by config key
    val_acc: float  # the best trial's validation accuracy
    trials: int
    seconds: float
    budget_epochs: int | None = None  # the trial-epochs the trials could spend
    study: str | None = None  # the Optuna study's storage URL (STUDY_FILE), when kept
    # One row per trial: number, the values tried, val_acc (its best epoch), state
    # (COMPLETE or PRUNED), epochs (how many it ran).
    table: list[dict[str, object]] = dataclasses.field(default_factory=list)
    reused_from: str | None = None  # tune.reuse_seed: the run that chose these values


class BestValAcc(Callback):
    """The best validation accuracy over a trial's epochs."""

    def __init__(self) -> None:
        self.value = float("-inf")

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if "val_acc" in trainer.callback_metrics and not trainer.sanity_checking:
            self.value = max(self.value, float(trainer.callback_metrics["val_acc"]))


def without_test(datamodule: L.LightningDataModule) -> L.LightningDataModule:
    """The same data with the test split removed, for the trials."""
    if isinstance(datamodule, ManifestDataModule):
        images = copy.copy(datamodule)
        images.manifest = datamodule.manifest[datamodule.manifest.split != "test"]
        return images
    if isinstance(datamodule, FeatureDataModule):
        features = datamodule.features
        targets = {**features.targets, "test": features.targets["test"][:0]}
        cached = copy.copy(datamodule)
        cached.features = replace(features, test=features.test[:0], targets=targets)
        return cached
    raise TypeError(f"Tuning reads images or cached features, not a {type(datamodule).__name__}.")


LR_RANGE = (1e-4, 0.3)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)


def search_space(spec: CellSpec) -> dict[str, tuple[float, float]]:
    """Config key -> (low, high), sampled log-uniformly: the learning rate and the weight decay
    for every strategy alike, and the backbone's rate factor where the backbone trains."""
    space = {
        "strategy.lr": low_high(spec.tune.lr_range or LR_RANGE),
        "optim.weight_decay": low_high(spec.tune.weight_decay_range or WEIGHT_DECAY_RANGE),
    }
    if not spec.head_only and spec.tune.backbone_lr_factor_range:  # how fast, against the head
        space[spec.backbone_lr_factor_key] = low_high(spec.tune.backbone_lr_factor_range)
    return space


def recipe(spec: CellSpec, space: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The values the cell runs with untuned, for each searched key, clipped into its range:
    `strategy.lr` as the rate of what trains (times lp_ft's `ft_lr_factor`, as the search
    means it, see `with_values`)."""
    values = {}
    for key, (low, high) in space.items():
        group, name = key.split(".")
        value = float(getattr(getattr(spec, group), name))
        if key == "strategy.lr":
            value *= spec.strategy.ft_lr_factor or 1.0
        values[key] = min(max(value, low), high)
    return values


def sobol(space: dict[str, tuple[float, float]], count: int, seed: int) -> list[dict[str, float]]:
    """`count` points of a scrambled Sobol sequence seeded by `seed`, log-uniform in each range
    (scipy.stats.qmc; its balance warning for a count that is not a power of 2 is moot here:
    the points are a start, not an integration rule)."""
    if count < 1:
        return []
    sampler = qmc.Sobol(d=len(space), scramble=True, seed=seed)
    unit = sampler.random_base2(int(np.ceil(np.log2(count))))[:count]
    low = np.log([lo for lo, _ in space.values()])
    high = np.log([hi for _, hi in space.values()])
    points = np.exp(qmc.scale(unit, low, high))
    return [dict(zip(space, map(float, point), strict=True)) for point in points]


def first_trials(spec: CellSpec, space: dict[str, tuple[float, float]]) -> list[dict[str, float]]:
    """The trials placed before the sampler: the recipe (tune.recipe_first), then
    `tune.startup_trials` Sobol points (tune.startup=sobol); none by default."""
    placed = [recipe(spec, space)] if spec.tune.recipe_first else []
    if spec.tune.startup == Startup.sobol and spec.tune.startup_trials:
        placed += sobol(space, spec.tune.startup_trials, spec.seed)
    return placed


def low_high(bounds: Sequence[float]) -> tuple[float, float]:
    """A range as (low, high), from a config's [low, high] (the rules check it has two)."""
    low, high = bounds
    return low, high


def trial_epochs(spec: CellSpec) -> int:
    """A trial's epochs (TuneConfig.trial_epochs of the cell's)."""
    return spec.tune.trial_epochs(spec.max_epochs)


def budget_epochs(spec: CellSpec) -> int:
    """The trial-epochs all trials together may run (TuneConfig.budget_epochs)."""
    return spec.tune.budget_epochs(spec.max_epochs)


def compressed(spec: CellSpec, epochs: int) -> CellSpec:
    """The cell's recipe over a trial's `epochs`: two_stage unfreezes at the same share of them
    (else a trial of half the epochs would never unfreeze, nor test the rate it searches)."""
    at = spec.strategy.unfreeze_at_epoch
    if at is None or epochs == spec.max_epochs:
        return spec
    moved = max(1, min(epochs - 1, round(at * epochs / spec.max_epochs)))
    return replace(spec, strategy=replace(spec.strategy, unfreeze_at_epoch=moved))


class EpochsRun:
    """The trial as the pruning callback sees it: its steps counted in epochs run (1 after the
    first epoch) rather than Lightning's 0-based epoch index, so the pruner's `min_resource`
    (tune.min_epochs) is a number of epochs; its value the best validation accuracy so far (the
    score the choice reads, so a trial is never pruned for a worse epoch after a good one); and
    never pruned after its last epoch (it ran them all: it is complete). Everything else is the
    trial's."""

    def __init__(self, trial: optuna.Trial, epochs: int) -> None:
        self._trial, self.epochs = trial, epochs
        self.best, self.step = float("-inf"), 0

    def report(self, value: float, step: int) -> None:
        self.best, self.step = max(self.best, value), step + 1
        self._trial.report(self.best, self.step)

    def should_prune(self) -> bool:
        return self.step < self.epochs and self._trial.should_prune()

    def __getattr__(self, name: str) -> object:
        return getattr(self._trial, name)


def pruner(tune: TuneConfig, epochs: int) -> optuna.pruners.BasePruner:
    """Optuna's pruner for `tune.pruner` (its resource: epochs run, see EpochsRun)."""
    low, factor = tune.min_epochs or 1, tune.reduction_factor or 3
    if tune.pruner == Pruner.successive_halving:
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=low, reduction_factor=factor)
    if tune.pruner == Pruner.hyperband:
        return optuna.pruners.HyperbandPruner(
            min_resource=low, max_resource=epochs, reduction_factor=factor
        )
    return optuna.pruners.NopPruner()


def trials_table(study: optuna.Study) -> list[dict[str, object]]:
    """Every finished trial: its number, values, best val_acc, state and epochs run."""
    rows = []
    for trial in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        seen = trial.intermediate_values  # by epochs run: 1, 2, ..., each the best so far
        best = max(seen.values(), default=trial.value)
        rows.append(
            {
                "number": trial.number,
                **trial.params,
                "val_acc": best,
                "state": trial.state.name,
                "epochs": len(seen),
            }
        )
    return rows


def choice_key(row: dict[str, object]) -> tuple[float, int]:
    """A trial's place in the choice (trials_table's row): its best val_acc, then the earlier
    trial."""
    return cast(float, row["val_acc"]), -int(cast(SupportsInt, row["number"]))


def epochs_spent(study: optuna.Study) -> int:
    """Trial-epochs run so far: each trial reports once per epoch it validated (EpochsRun), the
    last epoch of a pruned trial too."""
    return sum(len(trial.intermediate_values) for trial in study.trials)


def study_storage(spec: CellSpec) -> optuna.storages.RDBStorage | None:
    """Where the cell's study is kept: STUDY_FILE in its output folder (a SQLite file Optuna
    creates), or None (in memory) on a DDP rank other than 0, which must not touch rank 0's."""
    if not ranks.is_rank_zero():
        return None
    folder = spec.output_dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(f"sqlite:///{folder / STUDY_FILE}")


def restart(name: str, storage: optuna.storages.RDBStorage) -> None:
    """A study of this cell already in its folder (a launch stopped mid-tuning, or a cell run
    again) is deleted, and said when it holds trials: the tuning restarts from its first trial
    rather than resuming, so the choice is the one an uninterrupted launch makes (TPE's next
    suggestion depends on its seeded state and on every trial before). The earlier trials stay
    as the child runs of that launch's run."""
    try:
        earlier = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return
    trials = earlier.get_trials(deepcopy=False)
    optuna.delete_study(study_name=name, storage=storage)
    if trials:
        ended = sum(t.state.is_finished() for t in trials)
        log.warning(
            "tune: an earlier launch of this cell left %d trial(s) (%d ended) in its study; "
            "the tuning restarts from its first trial (it is not resumed: the choice is the "
            "one an uninterrupted launch makes).",
            len(trials),
            ended,
        )


def said(values: dict[str, float]) -> str:
    """`strategy.lr=0.0123, optim.weight_decay=3.2e-05`."""
    return ", ".join(f"{key}={value:.3g}" for key, value in values.items())


def trial_line(trial: FrozenTrial, trials: int | None, spent: int, budget: int) -> str:
    """A trial as it ends: `trial 3/16 pruned at epoch 1: val_acc 0.4100 (...); 7/18
    trial-epochs`, or `trial 2/16: val_acc 0.8125 after 3 epochs (...); ...`."""
    seen = trial.intermediate_values  # the best val_acc so far, after each epoch run
    best = max(seen.values(), default=trial.value if trial.value is not None else float("nan"))
    of = f"{trial.number + 1}/{trials}" if trials else str(trial.number + 1)
    values = said({k: float(v) for k, v in trial.params.items()})
    if trial.state == TrialState.PRUNED:
        head = f"trial {of} pruned at epoch {len(seen)}: val_acc {best:.4f}"
    else:
        head = f"trial {of}: val_acc {best:.4f} after {len(seen)} epoch(s)"
    return f"{head} ({values}); {spent}/{budget} trial-epochs"


def closing_line(tuned: Tuned, budget: int) -> str:
    """The choice, the trials completed and pruned, and the trial-epochs spent of the budget."""
    states = [row.get("state") for row in tuned.table]
    spent = sum(int(cast(SupportsInt, row.get("epochs", 0))) for row in tuned.table)
    best = max(tuned.table, key=choice_key)
    return (
        f"tuned: {said(tuned.values)} (trial {int(cast(SupportsInt, best['number'])) + 1}, "
        f"val_acc {tuned.val_acc:.4f}); {len(states)} trials: "
        f"{states.count('COMPLETE')} completed, {states.count('PRUNED')} pruned; "
        f"{spent}/{budget} trial-epochs of the budget; {duration(tuned.seconds)}"
    )


@dataclass
class TrialSearch:
    """A cell's trials as Optuna runs them: the objective (one trial's fit on the data without
    its test split) and the callbacks that say each trial as it ends and stop the study once the
    budget of trial-epochs is spent."""

    spec: CellSpec
    data: L.LightningDataModule  # the cell's data less its test split
    space: dict[str, tuple[float, float]]
    make_model: Callable[[CellSpec], L.LightningModule]
    observer: TrialObserver | None
    trainer_args: dict[str, object]  # overrides of the cell's Trainer arguments
    epochs: int  # a trial's epochs
    budget: int  # the trial-epochs all trials together may run

    def objective(self, trial: optuna.Trial) -> float:
        """Fit one trial at the values it suggests; its best val_acc (a pruned trial raises)."""
        spec, observer = self.spec, self.observer
        values = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in self.space.items()}
        # The last trial gets what the budget has left.
        length = min(self.epochs, self.budget - epochs_spent(trial.study))
        trial_spec = compressed(with_values(spec, values), length)
        L.seed_everything(spec.seed, workers=True, verbose=False)
        best = BestValAcc()
        trainer = self.trainer(trial, trial_spec, values, length, best)
        try:  # a pruned trial raises in its fit
            trainer.fit(self.make_model(trial_spec), datamodule=self.data)
        except optuna.TrialPruned:
            raise  # said and observed as it ends (`ended`)
        except BaseException as error:
            if observer:
                observer.failed(trial.number, error)
            raise
        return best.value

    def trainer(
        self,
        trial: optuna.Trial,
        trial_spec: CellSpec,
        values: dict[str, float],
        length: int,
        best: BestValAcc,
    ) -> L.Trainer:
        """The trial's Trainer over `length` epochs: `best` and the pruning callback watch its
        validation, the recipe's callbacks (two_stage unfreezes) and the observer's run."""
        # Reports the best val_acc so far each epoch (the table's epochs); prunes only with
        # tune.pruner set, never after the trial's last epoch.
        run = EpochsRun(trial, length)
        pruning = PyTorchLightningPruningCallback(run, "val_acc")  # type: ignore[arg-type]
        recipe = recipe_callbacks(trial_spec.strategy, trial_spec.optim)  # two_stage unfreezes
        observer = self.observer
        watching = observer.started(trial.number, values, length) if observer else []
        return build_trainer(
            self.spec.trainer,
            [best, *recipe, pruning, *watching],
            **self.trainer_args,
            max_epochs=length,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    def ended(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial ended (COMPLETE or PRUNED): said in a line, and seen by the observer."""
        log.info("%s", trial_line(trial, self.spec.tune.trials, epochs_spent(study), self.budget))
        if self.observer:
            self.observer.ended(trial)

    def stop_when_spent(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """The study stops once the budget of trial-epochs is spent."""
        if epochs_spent(study) >= self.budget:
            study.stop()


def tpe_sampler(spec: CellSpec) -> optuna.samplers.TPESampler:
    """Optuna's TPE sampler, seeded with the cell's seed; with `tune.startup_trials` set it
    models the trials from after those (the recipe, placed first, counted among them)."""
    startup = spec.tune.startup_trials
    if startup and spec.tune.recipe_first and spec.tune.startup == Startup.sobol:
        startup += 1  # TPE models the trials from there on: the recipe is one of its points
    return (
        optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)
        if startup
        else optuna.samplers.TPESampler(seed=spec.seed)
    )


def run_study(spec: CellSpec, search: TrialSearch) -> tuple[list[dict[str, object]], str | None]:
    """The cell's Optuna study run: the trials placed first, then the sampler's, until the
    budget is spent or `tune.trials` ran. Its trials table, and the study's storage URL when it
    is kept (STUDY_FILE), else None."""
    quiet = optuna.logging.INFO if spec.verbose else optuna.logging.WARNING
    optuna.logging.set_verbosity(quiet)  # verbose: Optuna's own line per trial too
    placed = first_trials(spec, search.space)
    sampler = tpe_sampler(spec)
    storage = study_storage(spec)
    if storage is not None:  # a relaunch into the same folder replaces the cell's study
        restart(spec.name, storage)
    try:
        study = optuna.create_study(
            direction="maximize",
            sampler=sampler,
            pruner=pruner(spec.tune, search.epochs),
            storage=storage,
            study_name=spec.name,
        )
        for values in placed:  # the sampler's own suggestions come after these
            study.enqueue_trial(values)
        study.optimize(
            search.objective,
            n_trials=spec.tune.trials,
            callbacks=[search.ended, search.stop_when_spent],
        )
        table = trials_table(study)
    finally:
        if storage is not None:
            storage.engine.dispose()  # the file's connections closed: it can be copied, moved
    return table, None if storage is None else storage.url


def choose(
    spec: CellSpec,
    datamodule: L.LightningDataModule,
    make_model: Callable[[CellSpec], L.LightningModule],
    observer: TrialObserver | None = None,
    **trainer_args: object,
) -> Tuned:
    """Run the trials on `datamodule` less its test split until the budget of trial-epochs is
    spent (or `tune.trials` ran); the values of the best one. Each trial is said as it ends,
    and `observer` sees it start and end. `trainer_args` override the cell's Trainer arguments
    (as the cell's own fit does)."""
    start = time.perf_counter()
    data = without_test(datamodule)
    space = search_space(spec)
    epochs, budget = trial_epochs(spec), budget_epochs(spec)
    search = TrialSearch(spec, data, space, make_model, observer, trainer_args, epochs, budget)
    table, study = run_study(spec, search)
    # The best score among completed and pruned trials alike; ties go to the earlier trial.
    chosen = max(table, key=choice_key)
    values = {k: float(cast(SupportsFloat, chosen[k])) for k in space}
    tuned = Tuned(
        values,
        float(cast(SupportsFloat, chosen["val_acc"])),
        len(table),
        time.perf_counter() - start,
        table=table,
        budget_epochs=budget,
        study=study,
    )
    log.info("%s", closing_line(tuned, budget))
    if tuned.study:
        log.info("tune: the study is kept: optuna-dashboard %s", tuned.study)
    return tuned


def reused(spec: CellSpec) -> Tuned | None:
    """`tune.reuse_seed`: the values that the FINISHED cell of that seed (this config otherwise)
    chose on its validation split, or None (this cell then tunes itself): when no such seed is
    set, when this cell is that seed's, or when the store has no such run yet."""
    seed = spec.tune.reuse_seed
    if seed is None or seed == spec.seed:
        return None
    _, key = cell_identity(replace(spec, seed=seed))
    run = store.finished_run(identity.tracking_uri(spec), spec.tracking.experiment, key)
    prefix = "tune.chosen."
    values = {
        name.removeprefix(prefix): float(value)
        for name, value in (run.data.params.items() if run else ())
        if name.startswith(prefix)
    }
    if run is None or not values:
        log.warning(
            "%s: tune.reuse_seed=%d, but seed %d's tuned cell has not FINISHED in this store: "
            "this cell tunes on its own validation split.",
            spec.name,
            seed,
            seed,
        )
        return None
    log.info("%s: the values seed %d chose (run %s): %s", spec.name, seed, run.info.run_id, values)
    val_acc = run.data.metrics.get("tune_best_val_acc", float("nan"))
    return Tuned(values, val_acc, spec.tune.trials or 0, 0.0, reused_from=run.info.run_id)


def with_values(spec: CellSpec, values: dict[str, float]) -> CellSpec:
    """The cell with the chosen values set (`strategy.lr`, `optim.weight_decay`...). A chosen
    `strategy.lr` is the rate of what trains: the strategy's `ft_lr_factor` no longer scales it
    (else lp_ft's searched rates would be a tenth of every other strategy's)."""
    for key, value in values.items():
        group, name = key.split(".")
        changed = dataclasses.replace(getattr(spec, group), **{name: float(value)})
        spec = dataclasses.replace(spec, **{group: changed})
    if "strategy.lr" in values and spec.strategy.ft_lr_factor is not None:
        spec = dataclasses.replace(spec, strategy=replace(spec.strategy, ft_lr_factor=None))
    return spec


def fresh_weights(module: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A copy of `module` as it is now, for each trial (a fine-tuned trial changes weights)."""
    state = copy.deepcopy(module.state_dict())

    def restored() -> torch.nn.Module:
        module.load_state_dict(state)
        return module

    return restored
