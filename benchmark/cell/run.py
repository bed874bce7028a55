"""One cell of the grid, start to end.

`run_cell` reads as the cell's story: its data (checked and split; the data's fingerprint is part
of the cell's identity), skipped if that very cell already FINISHED, otherwise one MLflow run in
which `compute_cell` does all the work and returns a `CellResult` that is then logged once: the
fit's `Fitted` (the Lightning epochs, or the linear probe), with what the cell around it adds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from mlflow.entities import Run
from torch import nn

from benchmark.cell import mlflow_run, resume, tune
from benchmark.cell.cost import CellCost
from benchmark.cell.probe import ProbeResult, fit_probe, linear_head
from benchmark.config.rules import check
from benchmark.config.spec import CellSpec, InputKind
from benchmark.data.cache import build_image_cache
from benchmark.data.loading import ManifestDataModule, SplitLoaders, build_augmentation
from benchmark.data.manifest import SHIFT, Manifest
from benchmark.models import precision
from benchmark.models.backbones import Backbone, create_backbone
from benchmark.models.classifier import (
    MinSteps,
    StartCandidate,
    TrainThroughput,
    TransferClassifier,
    make_model,
    progress_callbacks,
    recipe_callbacks,
    summary_callbacks,
)
from benchmark.models.convergence import Convergence
from benchmark.models.features import FeatureDataModule, FeatureSet, feature_set
from benchmark.models.resume import Checkpoints, LastCheckpoint, ResumeState
from benchmark.models.trainer import build_trainer
from benchmark.tracking import identity
from benchmark.tracking.result import CellResult, CellSummary, Fitted
from benchmark.tracking.resume import cell_identity, cell_lock, finished_earlier

log = logging.getLogger("benchmark")


def plan(spec: CellSpec) -> tuple[CellSpec, Manifest, str]:
    """The cell as it will run here (`trainer.precision=auto` resolved), its data and its key:
    the one preparation a cell's process and a launcher deciding to skip it both use."""
    check(spec)  # every rule, before any data is read or any run opened
    spec = precision.resolve(spec)  # `auto` -> what runs here, before the key is computed
    manifest, key = cell_identity(spec)
    return spec, manifest, key


def finished(spec: CellSpec) -> CellSummary | None:
    """The cell's FINISHED run, if the store has one (None too with `rerun=true`)."""
    spec, _, key = plan(spec)
    return None if spec.rerun else finished_earlier(spec, key)


def run_cell(spec: CellSpec, callbacks: Sequence[Callback] = ()) -> CellSummary:
    """The cell: its data, skipped if already FINISHED (unless `rerun=true`), else computed and
    logged in one MLflow run; an attempt of it that was cut off mid-fit is resumed from its last
    checkpoint (benchmark.cell.resume). `callbacks` are extra Lightning callbacks for the cell's
    Trainer."""
    spec, manifest, key = plan(spec)
    with cell_lock(spec, key):  # launched twice at once: computed once, the other waits
        if not spec.rerun and (done := finished_earlier(spec, key)) is not None:
            return done
        earlier = resume.Interrupted() if spec.probe else resume.interrupted(spec, key)
        attempt = earlier.attempt
        taken_over = attempt.run_id if attempt is not None else None
        with mlflow_run.cell_run(spec, key, manifest, taken_over) as run:
            result = compute_cell(spec, manifest, run, callbacks, Resuming(key, attempt))
            mlflow_run.log_result(spec, result)
        resume.forget(spec, key, earlier)  # FINISHED: the selected model is in its run
    uri = identity.tracking_uri(spec)
    return CellSummary.of(
        result.cell, run.info.run_id, uri, result.fitted.scores, result.wall_time_s
    )


@dataclass
class Resuming:
    """What a cell's fit needs to keep what a relaunch resumes from (its key; its cost, for the
    cell's seconds so far), and the interrupted attempt it takes over, if any."""

    key: str
    attempt: resume.Attempt | None = None
    cost: CellCost | None = None  # this launch's (compute_cell's)

    def seconds(self) -> float:
        """The cell's seconds so far: this launch's, and the attempts' before it."""
        earlier = self.attempt.seconds if self.attempt is not None else 0.0
        return earlier + (self.cost.seconds() if self.cost is not None else 0.0)


def compute_cell(
    spec: CellSpec,
    manifest: Manifest,
    run: Run,
    callbacks: Sequence[Callback] = (),
    resuming: Resuming | None = None,
) -> CellResult:
    """Backbone, loaders, the frozen backbone's features when they can be cached, then the fit
    (Lightning epochs, or the linear probe) and the test of the checkpoint chosen on val.
    `resuming`: the fit keeps what a relaunch resumes from, and takes over its attempt."""
    cost = CellCost()
    if resuming is not None:
        resuming.cost = cost
    L.seed_everything(spec.seed, workers=True)
    backbone = create_backbone(
        spec.backbone.name, spec.backbone.weights_path, model=spec.backbone.model
    )
    channels_last = spec.speed.channels_last  # faster convolutions on a GPU and the CPU alike
    data, cache_s = image_data(spec, protocol_splits(spec, manifest.frame), backbone, channels_last)
    build_s = {"image_cache_build_s": cache_s} if spec.speed.image_cache else {}
    kind = spec.input_kind(bool(data.augmentation))
    features = None
    if kind is not InputKind.images:
        views = spec.speed.augmented_views if kind is InputKind.feature_views else 0
        features = cell_features(spec, data, backbone, views, channels_last)
        build_s["feature_build_s"] = features.build_s
    lp = None
    if spec.probe_head:  # LP-FT: the linear probe on the frozen backbone's features first
        lp, build_s["feature_build_s"] = probe_first(spec, data, backbone, channels_last)
    if spec.probe:
        if features is None:  # input_kind gives a probe the features, always
            raise RuntimeError(f"{spec.name}: the linear probe has no features to fit on.")
        fitted = probe(spec, features, data.classes)
    else:
        fitted = fit_and_test(
            spec, data, backbone, features, run, channels_last, callbacks, lp, resuming
        )
    return CellResult(
        cell=spec.name,
        input=kind.param(spec.speed.augmented_views),
        classes=data.classes,
        fitted=fitted,
        wall_time_s=cost.seconds() + fitted.earlier_s,
        peak_rss_mb=cost.peak_rss_mb(),
        peak_gpu_mem_mb=cost.peak_gpu_mem_mb(),
        build_s=build_s,
        test_predictions=test_predictions(manifest, data.classes, fitted.test_predicted),
        shift_predictions=test_predictions(manifest, data.classes, fitted.shift_predicted, SHIFT),
    )


def test_predictions(
    manifest: Manifest, classes: list[str], predicted: list[int] | None, split: str = "test"
) -> dict[str, list[str]] | None:
    """Each test image's path (relative to the dataset's root), true and predicted class, in the
    test split's order (the order its loader and its cached features keep)."""
    test = manifest.relative_frame()[manifest.frame.split == split]
    if predicted is None or len(predicted) != len(test):
        return None
    return {
        "path": test.path.tolist(),
        "label": test.label.tolist(),
        "predicted": [classes[i] for i in predicted],
    }


def protocol_splits(spec: CellSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """The splits the cell's loaders read. protocol=study (selection max_eval) has no validation
    split of its own: the evaluation (test) split is read as validation after every epoch."""
    if not spec.max_eval:
        return frame
    return pd.concat([frame, frame[frame.split == "test"].assign(split="val")], ignore_index=True)


def image_data(
    spec: CellSpec, manifest: pd.DataFrame, backbone: Backbone, channels_last: bool = False
) -> tuple[ManifestDataModule, float]:
    """The image loaders, reading the decoded image cache when `speed.image_cache` is on, and
    the seconds spent building that cache (0: it was there)."""
    cache, build_s = None, 0.0
    if spec.speed.image_cache:
        cache, build_s = build_image_cache(
            manifest.path.unique().tolist(), backbone.preprocess, spec.cache_dir
        )
    augmentation = build_augmentation(spec.augment.transforms, backbone.preprocess)
    if augmentation and not spec.strategy.train_augmentation:
        log.info(
            "strategy=%s trains without augmentation: augment=%s is not applied "
            "(strategy.train_augmentation=true applies it).",
            spec.strategy.name,
            spec.augment.name,
        )
        augmentation = []
    data = ManifestDataModule(
        manifest,
        backbone.preprocess,
        spec.colour.grayscale,
        spec.data.batch_size,
        spec.data.num_workers,
        augmentation,
        cache=cache,
        channels_last=channels_last,
    )
    return data, build_s


def cell_features(
    spec: CellSpec,
    data: ManifestDataModule,
    backbone: Backbone,
    views: int,
    channels_last: bool = False,
) -> FeatureSet:
    """The frozen backbone's features, extracted on the cell's accelerator and precision, in
    the memory format its batches come in."""
    if channels_last:  # as the loaders send the batches (image_data)
        backbone.model.to(memory_format=torch.channels_last)
    extractor = build_trainer(
        spec.trainer,
        progress_callbacks(spec.progress_bar),
        devices=1,
        strategy="auto",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    identity_ = {
        "grayscale": spec.colour.grayscale,
        "preprocess": asdict(backbone.preprocess),
        "precision": str(spec.trainer["precision"]),
        "image_cache": spec.speed.image_cache,
        "channels_last": channels_last,
    }
    cache_dir = spec.cache_dir
    return feature_set(data, backbone.model, extractor, cache_dir, identity_, views, spec.seed)


def probe(spec: CellSpec, features: FeatureSet, classes: list[str]) -> Fitted:
    """strategy=linear_probe: scikit-learn on the CPU, in float64."""
    result = fit_probe(features, list(spec.strategy.probe_c), len(classes))
    shift = {}
    if result.shift_acc is not None and result.shift_loss is not None:
        shift = {"shift_test_acc": result.shift_acc, "shift_test_loss": result.shift_loss}
    return Fitted(
        scores={
            "test_acc": result.test_acc,
            "test_loss": result.test_loss,
            "best_val_acc": result.val_acc,
            **shift,
        },
        confusion=result.confusion.tolist(),
        device="cpu",
        precision="64 (scikit-learn)",
        probe_val_acc=result.val_acc_by_c,
        probe_c=result.c,
        optimizer_steps=result.iterations,
        test_predicted=result.test_predicted,
        shift_predicted=result.shift_predicted,
    )


def probe_first(
    spec: CellSpec, data: ManifestDataModule, backbone: Backbone, channels_last: bool
) -> tuple[ProbeResult, float]:
    """LP-FT's first stage: the linear probe (linear_probe's fit, C chosen on val) on the
    backbone's features of the unaugmented images (extracted once and cached, as for freeze),
    and the seconds the extraction took."""
    features = cell_features(spec, data, backbone, 0, channels_last)
    result = fit_probe(features, list(spec.strategy.probe_c), len(data.classes))
    log.info(
        "%s: linear probe first: C=%g, val_acc %.4f; fine-tuning from it",
        spec.name,
        result.c,
        result.val_acc,
    )
    return result, features.build_s


@dataclass
class FitInputs:
    """What a fit (the cell's own, or a tuning trial) works on: the data module (images, or the
    cached features with the head alone as the model), how to build the model for a cell's
    values, and the Trainer arguments the cell's config does not give."""

    datamodule: L.LightningDataModule
    build: Callable[[CellSpec], TransferClassifier]
    fitted_on: Backbone
    trainer_args: dict[str, Any]


def fit_inputs(
    spec: CellSpec,
    data: ManifestDataModule,
    backbone: Backbone,
    features: FeatureSet | None,
    channels_last: bool,
    lp: ProbeResult | None,
) -> FitInputs:
    """Images and the whole model, or cached features and the head alone; `lp`: the probe the
    head starts from (LP-FT), in every tuning trial too."""
    datamodule: L.LightningDataModule = data
    fitted_on = backbone
    trainer_args: dict[str, Any] = {}
    if features is not None:  # the model is the head alone
        fitted_on = Backbone(nn.Identity(), features.num_features, backbone.preprocess, [])
        datamodule = FeatureDataModule(features, data.classes, spec.data.batch_size, spec.seed)
        # A head on cached features is a few small matrix products: autocast would only add
        # casts (bf16 took 1.5 s against 0.85 s for a Hymenoptera head), so it trains in
        # float32; the features were extracted at the cell's precision.
        trainer_args["precision"] = "32-true"
    fitted_head = linear_head(lp.model, len(data.classes)) if lp is not None else None

    def build(cell: CellSpec) -> TransferClassifier:
        model = make_model(cell.strategy, cell.head, cell.optim, fitted_on, len(data.classes))
        if fitted_head is not None:  # the rules guarantee a linear head
            model.head[-1].load_state_dict(fitted_head)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    return FitInputs(datamodule, build, fitted_on, trainer_args)


def tuned_values(spec: CellSpec, inputs: FitInputs, run: Run) -> tune.Tuned | None:
    """tune.trials' choice on validation, each trial from the same starting weights and logged
    as a child run of the cell's `run` (or tune.reuse_seed's choice); None for an untuned
    cell."""
    if not spec.tune.trials:
        return None
    tuned = tune.reused(spec)
    if tuned is None:
        restore = tune.fresh_weights(inputs.fitted_on.model)
        tuned = tune.choose(
            spec,
            inputs.datamodule,
            lambda c: (restore(), inputs.build(c))[1],
            observer=mlflow_run.TrialRuns(spec, run),
            **inputs.trainer_args,
        )
        restore()
    return tuned


@dataclass
class Chosen:
    """The checkpoint chosen on validation (the start when no epoch beat it) and the fit's
    convergence metrics."""

    checkpoint: str
    best_val_acc: float
    convergence: dict[str, float]


def select(
    checkpoint: ModelCheckpoint, start: StartCandidate, convergence: Convergence, trainer: L.Trainer
) -> Chosen:
    """The best epoch's checkpoint, or the start's when it scored at least as well (ties: the
    start, the earlier candidate)."""
    best = None if checkpoint.best_model_score is None else float(checkpoint.best_model_score)
    start_won = start.wins(best)
    converged = convergence.metrics(trainer, start_won) | start.scores
    if start_won:
        return Chosen(str(start.path), start.scores["start_val_acc"], converged)
    if best is None:
        raise RuntimeError("no epoch was validated: nothing to choose a checkpoint from")
    return Chosen(checkpoint.best_model_path, best, converged)


@dataclass
class Watchers:
    """The callbacks of a cell's fit whose state the cell reads after it: the best epoch's
    checkpoint, the start as a candidate, throughput and convergence."""

    checkpoint: Checkpoints
    start: StartCandidate
    throughput: TrainThroughput
    convergence: Convergence

    @classmethod
    def in_folder(cls, folder: Path) -> Watchers:
        checkpoint = Checkpoints(
            dirpath=folder,
            monitor="val_acc",
            mode="max",
            save_top_k=1,
            save_weights_only=True,
            filename="best-{epoch}-{val_acc:.4f}",
        )
        # The start is a candidate too (held-out selection; the study's max over epochs is not).
        return cls(
            checkpoint, StartCandidate(folder / "start.ckpt"), TrainThroughput(), Convergence()
        )


def values_to_fit(
    spec: CellSpec, inputs: FitInputs, run: Run, attempt: resume.Attempt | None
) -> tune.Tuned | None:
    """What the cell fits with: an interrupted attempt's tuned values (not tuned again), else
    its tuning's choice (None for an untuned cell)."""
    if attempt is not None and attempt.tuned is not None and spec.tune.trials:
        log.info("%s: the values its tuning chose: %s", spec.name, tune.said(attempt.tuned.values))
        return attempt.tuned
    return tuned_values(spec, inputs, run)


def kept_for_resume(
    spec: CellSpec, resuming: Resuming | None, run: Run, tuned: tune.Tuned | None, folder: Path
) -> list[Callback]:
    """With `resuming`: the state file written now, and the callbacks that keep the last
    checkpoint in `folder` while the cell fits (what a relaunch resumes from)."""
    if resuming is None:
        return []
    run_id = run.info.run_id
    resume.keep(spec, resuming.key, run_id, tuned, resuming.attempt, resuming.seconds())
    return [LastCheckpoint(folder), ResumeState(resuming.key, run_id, resuming.seconds)]


def cell_trainer(
    spec: CellSpec,
    inputs: FitInputs,
    watchers: Watchers,
    run: Run,
    extra: Sequence[Callback],
    resumed: bool,
) -> L.Trainer:
    """The cell's Trainer: its recipe's, progress and summary callbacks, the `watchers`,
    `extra` ones, and its loggers. A resumed fit runs no sanity check (its start's score and
    checkpoint are kept already, and its random state restored: a sanity check would draw
    numbers the uninterrupted fit drew before its first epoch)."""
    budget = {"min_steps": spec.protocol.min_steps} if spec.protocol.min_steps else {}
    candidates = {} if spec.max_eval or resumed else {"num_sanity_val_steps": -1}
    loggers = mlflow_run.lightning_loggers(spec, run)
    # The learning rate of each parameter group per epoch (lr-SGD, lr-SGD/pg1: the backbone's),
    # a curve in the run's metrics; it reads the schedulers and changes nothing they do.
    rates = [LearningRateMonitor(logging_interval="epoch")] if loggers else []
    return build_trainer(
        spec.trainer,
        [
            MinSteps(),
            *([] if spec.max_eval else [watchers.start]),
            watchers.checkpoint,
            watchers.throughput,
            watchers.convergence,
            *recipe_callbacks(spec.strategy, spec.optim),
            *progress_callbacks(spec.progress_bar),
            *summary_callbacks(bool(spec.trainer.get("enable_model_summary", True)), spec.verbose),
            *rates,
            *mlflow_run.more_callbacks(spec),
            *extra,
        ],
        **inputs.trainer_args,
        **budget,
        **candidates,
        logger=loggers,
        default_root_dir=spec.paths.output_dir,
    )


@dataclass
class Tested:
    """The test pass of the chosen checkpoint (and of the shift test set, if any)."""

    scores: dict[str, float]
    confusion: list[list[int]]
    predicted: list[int] | None
    shift_predicted: list[int] | None


def test_chosen(
    spec: CellSpec,
    data: ManifestDataModule,
    inputs: FitInputs,
    trainer: L.Trainer,
    fitted: L.LightningModule,
    model: TransferClassifier,
    chosen: Chosen,
    lp: ProbeResult | None,
) -> Tested:
    """The chosen checkpoint tested once (and on the shift set), with the scores the cell
    reports: best_val_acc, the probe's for LP-FT, or the study's max_val_acc."""
    trainer.test(fitted, datamodule=inputs.datamodule, ckpt_path=chosen.checkpoint)
    if model.test_confusion is None:  # the test epoch's end computes it
        raise RuntimeError(f"{spec.name}: the test pass left no confusion matrix.")
    # Logged to the progress bar and callbacks only (logger=False): the result logs them once.
    scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")}
    confusion, predicted = model.test_confusion, predictions(model, trainer)
    shift = None
    if not spec.max_eval and (data.manifest.split == SHIFT).any():
        shift = shift_test(trainer, fitted, model, inputs.datamodule, chosen.checkpoint)
        scores |= shift[0]
    scores["best_val_acc"] = chosen.best_val_acc
    if lp is not None:  # the probe LP-FT started from, on the same validation split
        scores |= {"lp_val_acc": lp.val_acc, "lp_val_loss": lp.val_loss}
    if spec.max_eval:
        # Validation was the evaluation split itself: its best epoch is the study's number,
        # named as such; the test pass above only gave that epoch's confusion matrix.
        scores = {"max_val_acc": scores["best_val_acc"]}
    return Tested(scores, confusion.tolist(), predicted, shift[1] if shift else None)


def ran_at(spec: CellSpec, trainer: L.Trainer, on_features: bool) -> tuple[str, str]:
    """The device (a GPU's name) and the precision the fit ran at."""
    device = trainer.strategy.root_device
    precision = str(trainer.precision)
    if on_features and precision != str(spec.trainer["precision"]):
        precision = f"{spec.trainer['precision']} (features), {precision} (head)"
    return (torch.cuda.get_device_name(device) if device.type == "cuda" else device.type), precision


def fit_and_test(
    spec: CellSpec,
    data: ManifestDataModule,
    backbone: Backbone,
    features: FeatureSet | None,
    run: Run,
    channels_last: bool,
    callbacks: Sequence[Callback] = (),
    lp: ProbeResult | None = None,
    resuming: Resuming | None = None,
) -> Fitted:
    """Tune (tune.trials), fit (Lightning epochs on the images, or on cached features: then the
    model is the head alone), select on validation (the start a candidate), test once.
    `resuming`: keep a last checkpoint while fitting, and take over an interrupted attempt (its
    tuning's choice; its fit from its last checkpoint)."""
    inputs = fit_inputs(spec, data, backbone, features, channels_last, lp)
    attempt = resuming.attempt if resuming is not None else None
    tuned = values_to_fit(spec, inputs, run, attempt)
    if tuned is not None:
        spec = tune.with_values(spec, tuned.values)
    # Seeded here, once: a cache miss (which draws random numbers while extracting) and a hit,
    # a tuned cell and an untuned one, start their fit from the same random state.
    L.seed_everything(spec.seed, workers=True, verbose=False)
    model = inputs.build(spec)
    folder = resume.folder(spec)
    watchers = Watchers.in_folder(folder)
    resumed = attempt.checkpoint if attempt is not None else None
    kept = kept_for_resume(spec, resuming, run, tuned, folder)
    trainer = cell_trainer(spec, inputs, watchers, run, [*kept, *callbacks], bool(resumed))
    # torch.compile wraps the model in an OptimizedModule (typed as a plain callable), which
    # Trainer.fit and .test take in place of the LightningModule (Lightning unwraps it); the
    # results are read from `model` itself.
    fitted = cast(L.LightningModule, torch.compile(model)) if spec.speed.compile else model
    if attempt is not None and resumed is not None:  # its curves so far, into this run
        mlflow_run.copy_curves(
            spec, run, attempt.run_id, attempt.epochs, attempt.steps, attempt.curves,
            attempt.time_ms,
        )  # fmt: skip
    trainer.fit(fitted, datamodule=inputs.datamodule, ckpt_path=resumed)
    # Chosen before the test adds metrics.
    chosen = select(watchers.checkpoint, watchers.start, watchers.convergence, trainer)
    tested = test_chosen(spec, data, inputs, trainer, fitted, model, chosen, lp)
    device, precision = ran_at(spec, trainer, features is not None)
    return Fitted(
        scores=tested.scores,
        confusion=tested.confusion,
        device=device,
        precision=precision,
        train_images_per_s=watchers.throughput.images_per_s,
        checkpoint=chosen.checkpoint or None,
        test_predicted=tested.predicted,
        shift_predicted=tested.shift_predicted,
        tuned=tuned,
        optimizer_steps=trainer.global_step,
        probe_val_acc=lp.val_acc_by_c if lp is not None else None,
        probe_c=lp.c if lp is not None else None,
        convergence=chosen.convergence,
        resumed_at_epoch=None if attempt is None else attempt.epochs,
        earlier_s=0.0 if attempt is None else attempt.seconds,
    )


def predictions(model: TransferClassifier, trainer: L.Trainer) -> list[int] | None:
    """The last test pass's predicted class per image, in the split's order (None when it ran
    on several devices: each saw a share)."""
    if not model.test_predicted or trainer.world_size != 1:
        return None
    return torch.cat(model.test_predicted).tolist()


def shift_test(
    trainer: L.Trainer,
    fitted: L.LightningModule,
    model: TransferClassifier,
    datamodule: L.LightningDataModule,
    checkpoint: str,
) -> tuple[dict[str, float], list[int] | None]:
    """The chosen checkpoint tested again, on the `shift` split (dataset.shift_test): its
    scores named shift_test_*, and its predictions. One more test pass, not another fit."""
    loaders = cast(SplitLoaders, datamodule)
    loaders.test_split = SHIFT
    try:
        trainer.test(fitted, datamodule=datamodule, ckpt_path=checkpoint)
    finally:
        loaders.test_split = "test"
    scores = {
        f"shift_{k}": float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")
    }
    return scores, predictions(model, trainer)
