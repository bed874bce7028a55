"""One cell of the grid, start to end.

`run_cell` reads as the cell's story: its data (checked and split; the data's fingerprint is part
of the cell's identity), skipped if that very cell already FINISHED, otherwise one MLflow run in
which `compute_cell` does all the work and returns a `CellResult` that is then logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from mlflow.entities import Run
from omegaconf import DictConfig
from torch import nn

from benchmark.cell import mlflow_run, tune
from benchmark.cell.cost import CellCost
from benchmark.cell.probe import fit_probe
from benchmark.config.rules import check
from benchmark.config.schema import Selection
from benchmark.data.cache import build_image_cache
from benchmark.data.loading import ManifestDataModule, build_augmentation
from benchmark.data.manifest import Manifest
from benchmark.models import precision
from benchmark.models.backbones import Backbone, create_backbone
from benchmark.models.classifier import (
    StopOnSignal,
    TrainThroughput,
    make_model,
    progress_callbacks,
    recipe_callbacks,
)
from benchmark.models.features import FeatureDataModule, FeatureSet, feature_set
from benchmark.tracking import identity
from benchmark.tracking.result import CellResult, CellSummary
from benchmark.tracking.resume import cell_identity, finished_earlier

log = logging.getLogger("benchmark")


def run_cell(cfg: DictConfig, callbacks: Sequence[Callback] = ()) -> CellSummary:
    """The cell: its data, skipped if already FINISHED (unless `rerun=true`), else computed and
    logged in one MLflow run. `callbacks` are extra Lightning callbacks for the cell's Trainer."""
    check(cfg)  # every value in its range, before any data is read or any run opened
    precision.resolve(cfg)  # `auto` -> what runs here, before the key is computed
    manifest, key = cell_identity(cfg)
    if not cfg.rerun and (done := finished_earlier(cfg, key)) is not None:
        return done
    with mlflow_run.cell_run(cfg, key, manifest) as run:
        result = compute_cell(cfg, manifest, run, callbacks)
        mlflow_run.log_result(cfg, result)
    name, score = result.headline
    return CellSummary(
        result.cell,
        run.info.run_id,
        identity.tracking_uri(cfg),
        score,
        result.scores.get("test_loss"),
        result.wall_time_s,
        score_name=name,
    )


@dataclass
class Fitted:
    """What fitting and testing gave, whichever way the head was fitted."""

    scores: dict[str, float]
    confusion: torch.Tensor
    device: str
    precision: str
    train_images_per_s: float | None = None
    checkpoint: str | None = None
    probe_val_acc: dict[float, float] | None = None
    probe_c: float | None = None
    tuned: tune.Tuned | None = None


def compute_cell(
    cfg: DictConfig, manifest: Manifest, run: Run, callbacks: Sequence[Callback] = ()
) -> CellResult:
    """Backbone, loaders, the frozen backbone's features when they can be cached, then the fit
    (Lightning epochs, or the linear probe) and the test of the checkpoint chosen on val."""
    cost = CellCost()
    L.seed_everything(cfg.seed, workers=True)
    backbone = create_backbone(
        cfg.backbone.name, cfg.backbone.weights_path, model=cfg.backbone.model
    )
    channels_last = use_channels_last(cfg)
    data, cache_s = image_data(cfg, protocol_splits(cfg, manifest.frame), backbone, channels_last)
    build_s = {"image_cache_build_s": cache_s} if cfg.speed.image_cache else {}
    kind = input_kind(cfg, bool(data.augmentation))
    features = None
    if kind.startswith("features"):
        views = cfg.speed.augmented_views if kind != "features" else 0
        features = cell_features(cfg, data, backbone, views, channels_last)
        build_s["feature_build_s"] = features.build_s
    if cfg.strategy.fit == "lbfgs":
        fitted = probe(cfg, features, data.classes)
    else:
        fitted = fit_and_test(cfg, data, backbone, features, run, channels_last, callbacks)
    return CellResult(
        cell=identity.cell_name(cfg),
        input=kind,
        scores=fitted.scores,
        classes=data.classes,
        confusion=fitted.confusion.tolist(),
        device=fitted.device,
        precision=fitted.precision,
        wall_time_s=cost.seconds(),
        peak_rss_mb=cost.peak_rss_mb(),
        peak_gpu_mem_mb=cost.peak_gpu_mem_mb(),
        train_images_per_s=fitted.train_images_per_s,
        build_s=build_s,
        checkpoint=fitted.checkpoint,
        probe_val_acc=fitted.probe_val_acc,
        probe_c=fitted.probe_c,
        tuned=fitted.tuned.values if fitted.tuned else None,
        tune_val_acc=fitted.tuned.val_acc if fitted.tuned else None,
        tune_s=fitted.tuned.seconds if fitted.tuned else None,
    )


def protocol_splits(cfg: DictConfig, frame: pd.DataFrame) -> pd.DataFrame:
    """The splits the cell's loaders read. protocol=study (selection max_eval) has no validation
    split of its own: the evaluation (test) split is read as validation after every epoch."""
    if cfg.protocol.selection != Selection.max_eval:
        return frame
    return pd.concat([frame, frame[frame.split == "test"].assign(split="val")], ignore_index=True)


def use_channels_last(cfg: DictConfig) -> bool:
    """Channels-last memory format for the model and its batches, when asked (the default): on
    a GPU and on the CPU, whose convolution kernels are faster in it too."""
    return bool(cfg.speed.channels_last)


def input_kind(cfg: DictConfig, augmented: bool) -> str:
    """What the head trains on: `features` (extracted once), `features:Kviews` (K augmented
    views cached) or `images` (the backbone runs every epoch); a run param."""
    strategy, speed = cfg.strategy, cfg.speed
    frozen = (
        strategy.trainable_stages == 0
        and strategy.bn == "eval"
        and strategy.unfreeze_at_epoch is None
    )
    # DDP's ranks would each extract the features; a frozen backbone's head needs no DDP.
    distributed = "ddp" in str(cfg.trainer.get("strategy", "")).lower()
    if strategy.fit == "lbfgs":
        if not frozen or distributed:
            raise ValueError(
                "strategy.fit=lbfgs fits on one device's features of a frozen backbone: use "
                "trainable_stages=0 and a single-device trainer (not trainer=ddp)."
            )
        return "features"
    if not (frozen and speed.feature_cache) or distributed:
        return "images"
    if not augmented:
        return "features"
    return f"features:{speed.augmented_views}views" if speed.augmented_views else "images"


def image_data(
    cfg: DictConfig, manifest: pd.DataFrame, backbone: Backbone, channels_last: bool = False
) -> tuple[ManifestDataModule, float]:
    """The image loaders, reading the decoded image cache when `speed.image_cache` is on, and
    the seconds spent building that cache (0: it was there)."""
    cache, build_s = None, 0.0
    if cfg.speed.image_cache:
        cache, build_s = build_image_cache(
            manifest.path.unique().tolist(), backbone.preprocess, Path(cfg.paths.cache_dir)
        )
    augmentation = build_augmentation(cfg.augment.transforms, backbone.preprocess)
    if augmentation and not cfg.strategy.train_augmentation:
        log.info(
            "strategy=%s trains without augmentation: augment=%s is not applied "
            "(strategy.train_augmentation=true applies it).",
            cfg.strategy.name,
            cfg.augment.name,
        )
        augmentation = []
    data = ManifestDataModule(
        manifest,
        backbone.preprocess,
        cfg.colour.grayscale,
        cfg.data.batch_size,
        cfg.data.num_workers,
        augmentation,
        cache=cache,
        channels_last=channels_last,
    )
    return data, build_s


def cell_features(
    cfg: DictConfig,
    data: ManifestDataModule,
    backbone: Backbone,
    views: int,
    channels_last: bool = False,
) -> FeatureSet:
    """The frozen backbone's features, extracted on the cell's accelerator and precision, in
    the memory format its batches come in."""
    if channels_last:  # as the loaders send the batches (image_data)
        backbone.model.to(memory_format=torch.channels_last)
    extractor: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        devices=1,
        strategy="auto",
        logger=False,
        callbacks=[
            StopOnSignal(),
            *progress_callbacks(cfg.trainer.get("enable_progress_bar", True)),
        ],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    identity_ = {
        "grayscale": cfg.colour.grayscale,
        "preprocess": asdict(backbone.preprocess),
        "precision": str(cfg.trainer.precision),
        "image_cache": cfg.speed.image_cache,
        "channels_last": channels_last,
    }
    cache_dir = Path(cfg.paths.cache_dir)
    return feature_set(data, backbone.model, extractor, cache_dir, identity_, views, cfg.seed)


def probe(cfg: DictConfig, features: FeatureSet, classes: list[str]) -> Fitted:
    """strategy=linear_probe: scikit-learn on the CPU, in float64."""
    result = fit_probe(features, list(cfg.strategy.probe_c), len(classes))
    return Fitted(
        scores={
            "test_acc": result.test_acc,
            "test_loss": result.test_loss,
            "best_val_acc": result.val_acc,
        },
        confusion=result.confusion,
        device="cpu",
        precision="64 (scikit-learn)",
        probe_val_acc=result.val_acc_by_c,
        probe_c=result.c,
    )


def fit_and_test(
    cfg: DictConfig,
    data: ManifestDataModule,
    backbone: Backbone,
    features: FeatureSet | None,
    run: Run,
    channels_last: bool,
    callbacks: Sequence[Callback] = (),
) -> Fitted:
    """Lightning epochs on the images, or on cached features (then the model is the head
    alone); the best-validation checkpoint is tested. Seeded here, so that a cache miss (which
    draws random numbers while extracting) and a hit train the same head."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule: L.LightningDataModule = data
    fitted_on = backbone
    if features is not None:  # the model is the head alone
        fitted_on = Backbone(nn.Identity(), features.num_features, backbone.preprocess, [])
        datamodule = FeatureDataModule(features, data.classes, cfg.data.batch_size, cfg.seed)
    # A head on cached features is a few small matrix products: autocast would only add casts
    # (bf16 took 1.5 s against 0.85 s for a Hymenoptera head), so it trains in float32; the
    # features were extracted at the cell's precision.
    head = {"precision": "32-true"} if features is not None else {}

    def build(model_cfg: DictConfig) -> L.LightningModule:
        model = make_model(model_cfg, fitted_on, len(data.classes))
        return model.to(memory_format=torch.channels_last) if channels_last else model

    tuned = None
    if cfg.tune.trials:  # on the validation split, from the same starting weights each trial
        restore = tune.fresh_weights(fitted_on.model)
        tuned = tune.choose(cfg, datamodule, lambda c: (restore(), build(c))[1], **head)
        restore()
        cfg = tune.with_values(cfg, tuned.values)
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    model = build(cfg)
    checkpoint = ModelCheckpoint(
        dirpath=Path(cfg.paths.output_dir) / "checkpoints",
        monitor="val_acc",
        mode="max",
        save_top_k=1,
        save_weights_only=True,
        filename="best-{epoch}-{val_acc:.4f}",
    )
    throughput = TrainThroughput()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        **head,
        callbacks=[
            checkpoint,
            throughput,
            StopOnSignal(),
            *recipe_callbacks(cfg),
            *progress_callbacks(cfg.trainer.get("enable_progress_bar", True)),
            *callbacks,
        ],
        logger=mlflow_run.lightning_loggers(cfg, run),
        default_root_dir=cfg.paths.output_dir,
    )
    fitted = torch.compile(model) if cfg.speed.compile else model
    trainer.fit(fitted, datamodule=datamodule)
    trainer.test(fitted, datamodule=datamodule, ckpt_path="best")
    # Logged to the progress bar and callbacks only (logger=False): the result logs them once.
    scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test_")}
    scores["best_val_acc"] = float(checkpoint.best_model_score)
    if cfg.protocol.selection == Selection.max_eval:
        # Validation was the evaluation split itself: its best epoch is the study's number,
        # named as such; the test pass above only gave that epoch's confusion matrix.
        scores = {"max_val_acc": scores["best_val_acc"]}
    device = trainer.strategy.root_device
    precision = str(trainer.precision)
    if features is not None and precision != str(cfg.trainer.precision):
        precision = f"{cfg.trainer.precision} (features), {precision} (head)"
    return Fitted(
        scores=scores,
        confusion=model.test_confusion,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        precision=precision,
        train_images_per_s=throughput.images_per_s,
        checkpoint=checkpoint.best_model_path or None,
        tuned=tuned,
    )
