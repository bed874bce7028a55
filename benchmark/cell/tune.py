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
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import SupportsFloat, SupportsInt, cast

import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from benchmark.config.schema import Pruner, TuneConfig
from benchmark.config.spec import CellSpec
from benchmark.data.loading import ManifestDataModule
from benchmark.models.classifier import recipe_callbacks
from benchmark.models.features import FeatureDataModule
from benchmark.models.trainer import build_trainer
from benchmark.tracking import identity, store
from benchmark.tracking.resume import cell_identity

log = logging.getLogger("benchmark")


@dataclass
class Tuned:
    values: dict[str, float]  # the chosen learning rate (and weight decay), by config key
    val_acc: float  # the best trial's validation accuracy
    trials: int
    seconds: float
    budget_epochs: int | None = None  # the trial-epochs the trials could spend
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


def low_high(bounds: Sequence[float]) -> tuple[float, float]:
    """A range as (low, high), from a config's [low, high] (the rules check it has two)."""
    low, high = bounds
    return low, high


def trial_epochs(spec: CellSpec) -> int:
    """A trial's epochs: tune.epochs, a share of the cell's (at least 2: one to compare after)
    or the cell's own."""
    if spec.tune.epochs_fraction:
        return max(2, round(spec.tune.epochs_fraction * spec.max_epochs))
    return spec.tune.epochs or spec.max_epochs


def budget_epochs(spec: CellSpec) -> int:
    """The trial-epochs all trials together may run: `tune.budget_fraction` of the cell's
    epochs (at least one trial's), else every trial at full length."""
    if spec.tune.budget_fraction:
        return max(trial_epochs(spec), round(spec.tune.budget_fraction * spec.max_epochs))
    return (spec.tune.trials or 0) * trial_epochs(spec)


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


def choose(
    spec: CellSpec,
    datamodule: L.LightningDataModule,
    make_model: Callable[[CellSpec], L.LightningModule],
    **trainer_args: object,
) -> Tuned:
    """Run the trials on `datamodule` less its test split until the budget of trial-epochs is
    spent (or `tune.trials` ran); the values of the best one. `trainer_args` override the
    cell's Trainer arguments (as the cell's own fit does)."""
    start = time.perf_counter()
    data = without_test(datamodule)
    space = search_space(spec)
    epochs, budget = trial_epochs(spec), budget_epochs(spec)

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in space.items()}
        # The last trial gets what the budget has left.
        length = min(epochs, budget - epochs_spent(trial.study))
        trial_spec = compressed(with_values(spec, values), length)
        L.seed_everything(spec.seed, workers=True, verbose=False)
        best = BestValAcc()
        # Reports the best val_acc so far each epoch (the table's epochs); prunes only with
        # tune.pruner set, never after the trial's last epoch.
        run = EpochsRun(trial, length)
        pruning = PyTorchLightningPruningCallback(run, "val_acc")  # type: ignore[arg-type]
        recipe = recipe_callbacks(trial_spec.strategy, trial_spec.optim)  # two_stage unfreezes
        trainer = build_trainer(
            spec.trainer,
            [best, *recipe, pruning],
            **trainer_args,
            max_epochs=length,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(make_model(trial_spec), datamodule=data)  # a pruned trial raises here
        log.info("tune trial %d: %s -> val_acc %.4f", trial.number, values, best.value)
        return best.value

    def stop_when_spent(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if epochs_spent(study) >= budget:
            study.stop()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = spec.tune.startup_trials
    sampler = (
        optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=startup)
        if startup
        else optuna.samplers.TPESampler(seed=spec.seed)
    )
    study = optuna.create_study(
        direction="maximize", sampler=sampler, pruner=pruner(spec.tune, epochs)
    )
    study.optimize(objective, n_trials=spec.tune.trials, callbacks=[stop_when_spent])
    table = trials_table(study)
    # The best score among completed and pruned trials alike; ties go to the earlier trial.
    chosen = max(table, key=choice_key)
    values = {k: float(cast(SupportsFloat, chosen[k])) for k in space}
    return Tuned(
        values,
        float(cast(SupportsFloat, chosen["val_acc"])),
        len(table),
        time.perf_counter() - start,
        table=table,
        budget_epochs=budget,
    )


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
