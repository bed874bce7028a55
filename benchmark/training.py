"""One cell of the grid as a Lightning run: fit with checkpoint selection on validation accuracy,
then test the selected checkpoint on the held-out split."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import BaseFinetuning, Callback, EarlyStopping, ModelCheckpoint
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from benchmark import tracking
from benchmark.config import OptimConfig
from benchmark.data import ManifestDataModule, build_augmentation, build_manifest
from benchmark.data.cache import build_image_cache
from benchmark.features import FeatureDataModule, FeatureSet, feature_set
from benchmark.models import Backbone, create_backbone, stage_of, trainable_from
from benchmark.probe import fit_probe

log = logging.getLogger("benchmark")


def build_head(
    num_features: int, num_classes: int, hidden: list[int], batchnorm: bool, dropout: float
) -> nn.Sequential:
    """Linear-[BN]-ReLU-Dropout per hidden width, then the classifier (no hidden: linear)."""
    layers: list[nn.Module] = []
    width = num_features
    for size in hidden:
        layers += [
            nn.Linear(width, size),
            *([nn.BatchNorm1d(size)] if batchnorm else []),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        ]
        width = size
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


class TransferClassifier(L.LightningModule):
    """A pretrained backbone and a new head; the strategy decides which backbone stages train.

    Stages below `frozen_below` get no gradients; with `bn="eval"` their BatchNorm and dropout
    layers also stay in eval mode while the module trains, so ImageNet statistics never drift
    (a wholly frozen backbone runs exactly as at inference, as its cached features did).
    `bn="train"` lets them drift, as the study's "freeze" did.
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: list[list[str]],
        num_features: int,
        num_classes: int,
        trainable_stages: int | None = None,
        bn: str = "eval",
        lr: float = 1e-3,
        optim: dict | None = None,
        head_hidden: list[int] | tuple[int, ...] = (),
        head_batchnorm: bool = False,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if bn not in ("eval", "train"):
            raise ValueError(f"strategy.bn={bn!r}: use eval or train.")
        self.save_hyperparameters(ignore=["backbone"], logger=False)
        self.optim = {**asdict(OptimConfig()), **(optim or {})}
        self.backbone = backbone
        self.head = build_head(
            num_features, num_classes, list(head_hidden), head_batchnorm, head_dropout
        )
        self.freeze_below(trainable_from(stages, trainable_stages))
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: torch.Tensor | None = None  # rows: true class, columns: predicted
        # ModuleDict keys may not shadow Module methods such as train().
        self.accuracy = nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train", "val", "test")
            }
        )

    def freeze_below(self, stage: int) -> None:
        """Stages below `stage` (0: the stem) stop training; the others train."""
        self.frozen_below = stage
        for name, parameter in self.backbone.named_parameters():
            parameter.requires_grad = stage_of(name, self.hparams.stages) >= stage
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if not (mode and self.hparams.bn == "eval"):
            return self
        if self.frozen_below > len(self.hparams.stages):  # nothing trains: run as at inference
            self.backbone.eval()
            return self
        for name, module in self.backbone.named_modules():
            frozen = stage_of(name, self.hparams.stages) < self.frozen_below
            if frozen and isinstance(module, nn.modules.batchnorm._BatchNorm | nn.Dropout):
                module.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self._step(batch, "test")
        images, targets = batch
        self.confusion.update(self(images).argmax(1), targets)

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.confusion.compute().cpu()
        self.confusion.reset()

    def configure_optimizers(self) -> dict:
        """The head at lr, the backbone at lr x backbone_lr_factor (discriminative rates)."""
        optim = self.optim
        lr = self.hparams.lr * optim["lr_factor"]
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(self.head.parameters()), "lr": lr}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * optim["backbone_lr_factor"]})
        if optim["optimizer"] == "sgd":
            optimizer = torch.optim.SGD(
                groups, lr=lr, momentum=optim["momentum"], weight_decay=optim["weight_decay"]
            )
        elif optim["optimizer"] == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=optim["weight_decay"])
        else:
            raise ValueError(f"optim.optimizer={optim['optimizer']!r}: use sgd or adamw.")
        return {"optimizer": optimizer, "lr_scheduler": self._schedule(optimizer)}

    def _schedule(self, optimizer: torch.optim.Optimizer) -> LRScheduler:
        schedules = torch.optim.lr_scheduler
        optim, epochs = self.optim, max(1, self.trainer.max_epochs or 1)
        if optim["scheduler"] == "step":
            return schedules.StepLR(optimizer, optim["step_size"], optim["gamma"])
        if optim["scheduler"] == "constant":
            return schedules.ConstantLR(optimizer, factor=1.0)
        if optim["scheduler"] != "cosine":
            raise ValueError(
                f"optim.scheduler={optim['scheduler']!r}: use cosine, step or constant."
            )
        warmup = min(optim["warmup_epochs"], epochs - 1)
        cosine = schedules.CosineAnnealingLR(optimizer, T_max=epochs - warmup)
        if not warmup:
            return cosine
        ramp = schedules.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
        return schedules.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.optim["label_smoothing"])
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, targets)
        # Under DDP each rank sees a shard: the loss is averaged over the ranks (sync_dist), the
        # accuracy metric object gathers its counts across ranks itself.
        self.log(
            f"{stage}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=stage != "train",
            sync_dist=True,
        )
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss


class StagedUnfreeze(BaseFinetuning):
    """two_stage: at `epoch`, the top `stages` backbone stages (None: all) start training in a
    param group of their own at `lr`, the Keras recipe's lower fine-tuning rate."""

    def __init__(self, epoch: int, stages: int | None, lr: float) -> None:
        super().__init__()
        self.epoch, self.stages, self.lr = epoch, stages, lr

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """The module froze its backbone already, from strategy.trainable_stages."""

    def finetune_function(
        self, pl_module: TransferClassifier, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        if epoch != self.epoch:
            return
        stages = pl_module.hparams.stages
        floor = trainable_from(stages, self.stages)
        names = [name for stage in stages[max(0, floor - 1) :] for name in stage]
        modules = (
            [pl_module.backbone]
            if floor == 0
            else [pl_module.backbone.get_submodule(name) for name in names]
        )
        self.unfreeze_and_add_param_group(modules, optimizer, lr=self.lr, train_bn=True)
        pl_module.freeze_below(floor)


class TrainThroughput(Callback):
    """Images per second in the training loop proper (validation excluded), for the cost table."""

    def __init__(self) -> None:
        self.images, self.seconds, self._started = 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: object,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
    ) -> None:
        self.images += len(batch[1]) * trainer.world_size  # every DDP rank trains a batch

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._started

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


@dataclass
class CellResult:
    cell: str
    test_acc: float
    test_loss: float
    wall_s: float
    run_id: str
    tracking_uri: str
    skipped: bool = False  # already FINISHED in an earlier run: not run again

    def summary(self) -> str:
        if self.skipped:
            return (
                f"{self.cell}: skipped, FINISHED earlier in MLflow run {self.run_id} "
                f"(test_acc={self.test_acc:.4f}); rerun=true runs it again"
            )
        return (
            f"{self.cell}: test_acc={self.test_acc:.4f} test_loss={self.test_loss:.4f} "
            f"wall={self.wall_s:.1f}s | MLflow run {self.run_id} in {self.tracking_uri}"
        )


def cell_name(cfg: DictConfig) -> str:
    return (
        f"{cfg.dataset.name}/{cfg.colour.name}/{cfg.strategy.name}/"
        f"{cfg.backbone.name}/seed={cfg.seed}"
    )


def make_model(cfg: DictConfig, backbone: Backbone, num_classes: int) -> TransferClassifier:
    strategy, head = cfg.strategy, cfg.head
    return TransferClassifier(
        backbone.model,
        backbone.stages,
        backbone.num_features,
        num_classes,
        trainable_stages=strategy.trainable_stages,
        bn=strategy.bn,
        lr=strategy.lr,
        optim=OmegaConf.to_container(cfg.optim),
        head_hidden=list(head.hidden),
        head_batchnorm=head.batchnorm,
        head_dropout=head.dropout,
    )


def recipe_callbacks(cfg: DictConfig) -> list[Callback]:
    """Early stopping and the two-stage unfreezing, when the config asks for them."""
    callbacks: list[Callback] = []
    if cfg.optim.early_stopping_patience is not None:
        patience = cfg.optim.early_stopping_patience
        callbacks.append(EarlyStopping("val_acc", mode="max", patience=patience))
    strategy = cfg.strategy
    if strategy.unfreeze_at_epoch is not None:
        lr = strategy.lr * strategy.unfreeze_lr_factor
        callbacks.append(StagedUnfreeze(strategy.unfreeze_at_epoch, strategy.unfreeze_stages, lr))
    return callbacks


def input_kind(cfg: DictConfig, augmented: bool) -> str:
    """What the head trains on: `features` (extracted once), `features:Kviews` (K augmented
    views cached) or `images` (the backbone runs every epoch); a run param."""
    strategy, speed = cfg.strategy, cfg.speed
    frozen = (
        strategy.trainable_stages == 0
        and strategy.bn == "eval"
        and strategy.unfreeze_at_epoch is None
    )
    if strategy.fit not in ("sgd", "lbfgs"):
        raise ValueError(f"strategy.fit={strategy.fit!r}: use sgd or lbfgs.")
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


def run_cell(cfg: DictConfig) -> CellResult:
    """Prepare, fit, select on validation, test; everything inside one MLflow run. A cell that
    already FINISHED (same config hash) is skipped unless `rerun=true`."""
    start = time.perf_counter()
    if not cfg.rerun and (done := tracking.finished_run(cfg)) is not None:
        metrics = done.data.metrics
        return CellResult(
            cell_name(cfg),
            metrics["test_acc"],
            metrics["test_loss"],
            0.0,
            done.info.run_id,
            tracking.tracking_uri(cfg),
            skipped=True,
        )
    L.seed_everything(cfg.seed, workers=True)
    with tracking.cell_run(cfg, cell_name(cfg)) as run:
        manifest = build_manifest(
            cfg.dataset, Path(cfg.paths.data_root), cfg.seed, Path(cfg.paths.cache_dir)
        )
        tracking.log_manifest(manifest)
        backbone = create_backbone(cfg.backbone.name, cfg.backbone.weights_path)
        data = image_data(cfg, manifest.frame, backbone)
        kind = input_kind(cfg, bool(data.augmentation))
        tracking.log_input(kind)
        features = None
        if kind.startswith("features"):
            views = cfg.speed.augmented_views if kind != "features" else 0
            features = cell_features(cfg, data, backbone, views)
            tracking.log_build("feature_build_s", features.build_s)
        if cfg.strategy.fit == "lbfgs":
            probe = fit_probe(features, list(cfg.strategy.probe_c), len(data.classes))
            tracking.log_probe(probe)
            scores = {"test_acc": probe.test_acc, "test_loss": probe.test_loss}
            tracking.log_device(None)
            confusion, images_per_s, device = probe.confusion, None, torch.device("cpu")
        else:
            scores, confusion, images_per_s, device = fit_and_test(
                cfg, data, backbone, features, run
            )
        tracking.log_confusion(confusion, data.classes)
        wall_s = time.perf_counter() - start
        tracking.log_cost(wall_s, images_per_s, device)
    return CellResult(
        cell_name(cfg),
        scores["test_acc"],
        scores["test_loss"],
        wall_s,
        run.info.run_id,
        tracking.tracking_uri(cfg),
    )


def image_data(cfg: DictConfig, manifest: pd.DataFrame, backbone: Backbone) -> ManifestDataModule:
    """The image loaders, reading the decoded image cache when `speed.image_cache` is on."""
    cache = None
    if cfg.speed.image_cache:
        cache, build_s = build_image_cache(
            manifest.path.tolist(), backbone.preprocess, Path(cfg.paths.cache_dir)
        )
        tracking.log_build("image_cache_build_s", build_s)
    on_gpu = torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    augmentation = build_augmentation(cfg.augment.transforms, backbone.preprocess)
    if augmentation and not cfg.strategy.train_augmentation:
        log.info(
            "strategy=%s trains without augmentation: augment=%s is not applied "
            "(strategy.train_augmentation=true applies it).",
            cfg.strategy.name,
            cfg.augment.name,
        )
        augmentation = []
    return ManifestDataModule(
        manifest,
        backbone.preprocess,
        cfg.colour.grayscale,
        cfg.data.batch_size,
        cfg.data.num_workers,
        augmentation,
        cache=cache,
        channels_last=cfg.speed.channels_last and on_gpu,
    )


def cell_features(
    cfg: DictConfig, data: ManifestDataModule, backbone: Backbone, views: int
) -> FeatureSet:
    """The frozen backbone's features, extracted on the cell's accelerator and precision."""
    extractor: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        devices=1,
        strategy="auto",
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    identity = {
        "grayscale": cfg.colour.grayscale,
        "preprocess": asdict(backbone.preprocess),
        "precision": str(cfg.trainer.precision),
        "image_cache": cfg.speed.image_cache,
    }
    cache_dir = Path(cfg.paths.cache_dir)
    return feature_set(data, backbone.model, extractor, cache_dir, identity, views, cfg.seed)


def fit_and_test(
    cfg: DictConfig,
    data: ManifestDataModule,
    backbone: Backbone,
    features: FeatureSet | None,
    run: Run,
) -> tuple[dict[str, float], torch.Tensor, float, torch.device]:
    """Lightning epochs on the images, or on cached features (then the model is the head
    alone); the best-validation checkpoint is tested. Seeded here, so that a cache miss (which
    draws random numbers while extracting) and a hit train the same head."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if features is None:
        model = make_model(cfg, backbone, len(data.classes))
        datamodule: L.LightningDataModule = data
    else:
        head_only = Backbone(nn.Identity(), features.num_features, backbone.preprocess, [])
        model = make_model(cfg, head_only, len(data.classes))
        datamodule = FeatureDataModule(features, data.classes, cfg.data.batch_size, cfg.seed)
    if data.normalize.channels_last:
        model = model.to(memory_format=torch.channels_last)
    checkpoint = ModelCheckpoint(
        dirpath=Path(cfg.paths.output_dir) / "checkpoints",
        monitor="val_acc",
        mode="max",
        save_top_k=1,
        filename="best-{epoch}-{val_acc:.4f}",
    )
    throughput = TrainThroughput()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[checkpoint, throughput, *recipe_callbacks(cfg)],
        logger=tracking.lightning_logger(run),
        default_root_dir=cfg.paths.output_dir,
    )
    fitted = torch.compile(model) if cfg.speed.compile else model
    trainer.fit(fitted, datamodule=datamodule)
    (scores,) = trainer.test(fitted, datamodule=datamodule, ckpt_path="best")
    tracking.log_device(trainer)
    return scores, model.test_confusion, throughput.images_per_s, trainer.strategy.root_device
