"""`tune.trials=K`: the cell's learning rate (and, for a head on a frozen backbone, its weight
decay) searched on the validation split alone, before the cell's own fit.

Each of the K trials (Optuna's TPE sampler, seeded with the cell's seed) fits the cell's model
from the same starting weights for `tune.epochs` epochs (default: the cell's) and scores its
best validation accuracy. The trials see data without the test split at all (its rows, or its
cached features, removed), so no test image or label can reach the choice. The cell then fits at
the chosen values as usual; they are run params (`tune.chosen.*`), and the tuning's cost is a
metric (`tune_s`). Each seed tunes on its own validation split (a seed fixes that split), so an
interval over seeds includes the tuning's own variance.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import hydra
import lightning as L
import optuna
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.config.spec import CellSpec
from benchmark.data.loading import ManifestDataModule
from benchmark.models.classifier import StopOnSignal
from benchmark.models.features import FeatureSet

log = logging.getLogger("benchmark")


@dataclass
class Tuned:
    values: dict[str, float]  # the chosen learning rate (and weight decay), by config key
    val_acc: float  # the best trial's validation accuracy
    trials: int
    seconds: float


class BestValAcc(Callback):
    """The best validation accuracy over a trial's epochs."""

    def __init__(self) -> None:
        self.value = float("-inf")

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if "val_acc" in trainer.callback_metrics and not trainer.sanity_checking:
            self.value = max(self.value, float(trainer.callback_metrics["val_acc"]))


def without_test(datamodule: L.LightningDataModule) -> L.LightningDataModule:
    """The same data with the test split removed, for the trials."""
    trial = copy.copy(datamodule)
    if isinstance(datamodule, ManifestDataModule):
        trial.manifest = datamodule.manifest[datamodule.manifest.split != "test"]
    else:  # FeatureDataModule
        features: FeatureSet = datamodule.features
        targets = {**features.targets, "test": features.targets["test"][:0]}
        trial.features = replace(features, test=features.test[:0], targets=targets)
    return trial


LR_RANGE = (1e-4, 0.3)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)


def search_space(spec: CellSpec) -> dict[str, tuple[float, float]]:
    """Config key -> (low, high), sampled log-uniformly."""
    space = {"strategy.lr": tuple(spec.tune.lr_range or LR_RANGE)}
    if spec.head_only:  # a head alone, ever (not two_stage): its weight decay too
        space["optim.weight_decay"] = tuple(spec.tune.weight_decay_range or WEIGHT_DECAY_RANGE)
    return space


def choose(
    spec: CellSpec,
    datamodule: L.LightningDataModule,
    make_model: Callable[[CellSpec], L.LightningModule],
    **trainer_args: object,
) -> Tuned:
    """Run the trials on `datamodule` less its test split; the values of the best one.
    `trainer_args` override the cell's Trainer arguments (as the cell's own fit does)."""
    start = time.perf_counter()
    data = without_test(datamodule)
    space = search_space(spec)
    epochs = spec.tune.epochs or spec.max_epochs

    def objective(trial: optuna.Trial) -> float:
        values = {k: trial.suggest_float(k, lo, hi, log=True) for k, (lo, hi) in space.items()}
        trial_spec = with_values(spec, values)
        L.seed_everything(spec.seed, workers=True, verbose=False)
        best = BestValAcc()
        trainer: L.Trainer = hydra.utils.instantiate(
            spec.trainer,
            **trainer_args,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[best, StopOnSignal()],
        )
        trainer.fit(make_model(trial_spec), datamodule=data)
        log.info("tune trial %d: %s -> val_acc %.4f", trial.number, values, best.value)
        return best.value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=spec.seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(objective, n_trials=spec.tune.trials)
    return Tuned(
        dict(study.best_params), study.best_value, spec.tune.trials, time.perf_counter() - start
    )


def with_values(spec: CellSpec, values: dict[str, float]) -> CellSpec:
    """The cell with the chosen values set (`strategy.lr`, `optim.weight_decay`...)."""
    for key, value in values.items():
        group, name = key.split(".")
        changed = dataclasses.replace(getattr(spec, group), **{name: float(value)})
        spec = dataclasses.replace(spec, **{group: changed})
    return spec


def fresh_weights(module: torch.nn.Module) -> Callable[[], torch.nn.Module]:
    """A copy of `module` as it is now, for each trial (a fine-tuned trial changes weights)."""
    state = copy.deepcopy(module.state_dict())

    def restored() -> torch.nn.Module:
        module.load_state_dict(state)
        return module

    return restored
