"""One cell of the grid as a Lightning run: fit with checkpoint selection on validation accuracy,
then test the selected checkpoint on the held-out split."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from benchmark import tracking
from benchmark.data import ManifestDataModule, build_manifest
from benchmark.models import create_backbone


class TransferClassifier(L.LightningModule):
    """A pretrained backbone and a new linear head.

    With `train_backbone=False` (the `freeze` strategy) the backbone gets no gradients and stays in
    eval mode even while the module trains, so its BatchNorm statistics never drift.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_features: int,
        num_classes: int,
        train_backbone: bool,
        lr: float,
        momentum: float,
        weight_decay: float,
        label_smoothing: float,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"], logger=False)
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        self.backbone.requires_grad_(train_backbone)
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: torch.Tensor | None = None  # rows: true class, columns: predicted
        # ModuleDict keys may not shadow Module methods such as train().
        self.accuracy = nn.ModuleDict(
            {
                f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro")
                for stage in ("train", "val", "test")
            }
        )

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        if not self.hparams.train_backbone:
            self.backbone.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        accuracy = self.accuracy[f"{stage}_acc"]
        accuracy(logits, targets)
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=stage != "train")
        self.log(f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss

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
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(
            trainable,
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        epochs = max(1, self.trainer.max_epochs or 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": schedule}


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
        self.images += len(batch[1])

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

    def summary(self) -> str:
        return (
            f"{self.cell}: test_acc={self.test_acc:.4f} test_loss={self.test_loss:.4f} "
            f"wall={self.wall_s:.1f}s | MLflow run {self.run_id} in {self.tracking_uri}"
        )


def cell_name(cfg: DictConfig) -> str:
    return (
        f"{cfg.dataset.name}/{cfg.colour.name}/{cfg.strategy.name}/"
        f"{cfg.backbone.name}/seed={cfg.seed}"
    )


def run_cell(cfg: DictConfig) -> CellResult:
    """Prepare, fit, select on validation, test; everything inside one MLflow run."""
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    with tracking.cell_run(cfg, cell_name(cfg)) as run:
        manifest = build_manifest(
            cfg.dataset, Path(cfg.paths.data_root), cfg.seed, Path(cfg.paths.cache_dir)
        )
        tracking.log_manifest(manifest)
        backbone = create_backbone(cfg.backbone.name, cfg.backbone.weights_path)
        data = ManifestDataModule(
            manifest.frame,
            backbone.preprocess,
            cfg.colour.grayscale,
            cfg.data.batch_size,
            cfg.data.num_workers,
        )
        model = TransferClassifier(
            backbone.model,
            backbone.num_features,
            len(data.classes),
            train_backbone=cfg.strategy.train_backbone,
            lr=cfg.strategy.lr,
            momentum=cfg.optim.momentum,
            weight_decay=cfg.optim.weight_decay,
            label_smoothing=cfg.optim.label_smoothing,
        )
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
            callbacks=[checkpoint, throughput],
            logger=tracking.lightning_logger(run),
            default_root_dir=cfg.paths.output_dir,
        )
        trainer.fit(model, datamodule=data)
        (scores,) = trainer.test(model, datamodule=data, ckpt_path="best")
        tracking.log_device(trainer)
        tracking.log_confusion(model.test_confusion, data.classes)
        wall_s = time.perf_counter() - start
        tracking.log_cost(wall_s, throughput.images_per_s, trainer.strategy.root_device)
    return CellResult(
        cell_name(cfg),
        scores["test_acc"],
        scores["test_loss"],
        wall_s,
        run.info.run_id,
        tracking.tracking_uri(cfg),
    )
