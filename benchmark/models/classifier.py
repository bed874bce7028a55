"""The model of a cell: a pretrained backbone and a new head, trained as its strategy says, and
the Lightning callbacks of the recipes (two-stage unfreezing, early stopping, throughput)."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    BaseFinetuning,
    Callback,
    EarlyStopping,
    ModelSummary,
    ProgressBar,
)
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from benchmark.config.schema import BatchNorm, HeadConfig, OptimConfig, StrategyConfig
from benchmark.config.spec import plain
from benchmark.models import optim as optimizers
from benchmark.models.backbones import Backbone, stage_of, trainable_from
from benchmark.runtime import interrupt
from benchmark.runtime.progress import line


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


log = logging.getLogger("benchmark")


class TransferClassifier(L.LightningModule):
    """A pretrained backbone and a new head; the strategy decides which backbone stages train.

    Stages below `frozen_below` get no gradients. `bn="frozen"`: every BatchNorm layer of the
    backbone stays in eval mode while the module trains (ImageNet statistics, never updated;
    its affine weights still train where its stage does), so at learning rate 0 nothing moves.
    `bn="eval"`: only the frozen stages' BatchNorm and dropout layers stay in eval mode (a
    wholly frozen backbone runs exactly as at inference, as its cached features did).
    `bn="train"` lets them drift, as the study's "freeze" did.
    """

    def __init__(
        self,
        backbone: nn.Module,
        stages: list[list[str]],
        num_features: int,
        num_classes: int,
        trainable_stages: int | None = None,
        bn: BatchNorm = BatchNorm.eval,
        lr: float = 1e-3,
        optim: OptimConfig | None = None,
        head: HeadConfig | None = None,
    ) -> None:
        super().__init__()
        self.bn, self.lr = BatchNorm(bn), lr
        self.optim = optim or OptimConfig(name="sgd_cosine")
        head = head or HeadConfig(name="linear")
        # The checkpoint's metadata, in plain values (a checkpoint loads with weights_only).
        self.save_hyperparameters(
            plain(
                {
                    "stages": stages,
                    "num_features": num_features,
                    "num_classes": num_classes,
                    "trainable_stages": trainable_stages,
                    "bn": self.bn,
                    "lr": lr,
                    "optim": self.optim,
                    "head": head,
                }
            ),
            logger=False,
        )
        self.stages = stages
        self.backbone = backbone
        self.head = build_head(
            num_features, num_classes, list(head.hidden), head.batchnorm, head.dropout
        )
        self.freeze_below(trainable_from(stages, trainable_stages))
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion: torch.Tensor | None = None  # rows: true class, columns: predicted
        # The class predicted for each test image, in the test loader's order (one device).
        self.test_predicted: list[torch.Tensor] = []
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
            parameter.requires_grad = stage_of(name, self.stages) >= stage
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferClassifier:
        super().train(mode)
        policy = self.bn
        if not mode or policy == BatchNorm.train:
            return self
        if self.frozen_below > len(self.stages):  # nothing trains: run as at inference
            self.backbone.eval()
            return self
        for name, module in self.backbone.named_modules():
            frozen = stage_of(name, self.stages) < self.frozen_below
            norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
            if (norm and policy == BatchNorm.frozen) or (
                frozen and (norm or isinstance(module, nn.Dropout))
            ):
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
        predicted = self(images).argmax(1)
        self.confusion.update(predicted, targets)
        self.test_predicted.append(predicted.cpu())

    def on_test_epoch_start(self) -> None:
        self.test_predicted = []

    def on_test_epoch_end(self) -> None:
        self.test_confusion = self.confusion.compute().cpu()
        self.confusion.reset()

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        """The head at lr, the backbone at lr x backbone_lr_factor (discriminative rates), with
        the `optim` group's optimizer and schedule (benchmark.models.optim)."""
        lr = self.lr * self.optim.lr_factor
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": list(self.head.parameters()), "lr": lr}]
        if backbone:
            groups.append({"params": backbone, "lr": lr * self.optim.backbone_lr_factor})
        optimizer = optimizers.optimizer(groups, lr, self.optim)
        schedule = optimizers.scheduler(optimizer, self.optim, self.trainer.max_epochs or 1)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.optim.label_smoothing)
        accuracy = cast(MulticlassAccuracy, self.accuracy[f"{stage}_acc"])
        accuracy(logits, targets)
        logged = stage != "test"  # the test scores are part of the cell's result, logged once
        # Under DDP each rank sees a shard: the loss is averaged over the ranks (sync_dist), the
        # accuracy metric object gathers its counts across ranks itself.
        self.log(
            f"{stage}_loss",
            loss,
            on_step=False,
            on_epoch=True,
            prog_bar=stage != "train",
            sync_dist=True,
            logger=logged,
        )
        self.log(
            f"{stage}_acc", accuracy, on_step=False, on_epoch=True, prog_bar=True, logger=logged
        )
        return loss


class StagedUnfreeze(BaseFinetuning):
    """two_stage: at `epoch`, the top `stages` backbone stages (None: all) start training in a
    param group of their own at `lr`, the Keras recipe's lower fine-tuning rate."""

    def __init__(self, epoch: int, stages: int | None, lr: float) -> None:
        super().__init__()
        self.epoch, self.stages, self.lr = epoch, stages, lr
        self.unfrozen = False  # kept in a checkpoint: a fit resumed after it unfreezes again

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """The module froze its backbone already, from strategy.trainable_stages."""

    def finetune_function(
        self, pl_module: L.LightningModule, epoch: int, optimizer: torch.optim.Optimizer
    ) -> None:
        if epoch != self.epoch:
            return
        if not isinstance(pl_module, TransferClassifier):
            raise TypeError(
                "StagedUnfreeze unfreezes a TransferClassifier's stages, not a "
                f"{type(pl_module).__name__}'s"
            )
        stages = pl_module.stages
        floor = trainable_from(stages, self.stages)
        names = [name for stage in stages[max(0, floor - 1) :] for name in stage]
        modules = (
            [pl_module.backbone]
            if floor == 0
            else [pl_module.backbone.get_submodule(name) for name in names]
        )
        self.unfreeze_and_add_param_group(modules, optimizer, lr=self.lr, train_bn=True)
        pl_module.freeze_below(floor)
        self.unfrozen = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen": self.unfrozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.unfrozen = bool(state_dict.get("unfrozen", False))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit resumed after the unfreezing: Lightning gives the optimizer its param groups
        back (BaseFinetuning), and the stages train again as they did."""
        restarting = self._restarting
        super().on_fit_start(trainer, pl_module)
        if restarting and self.unfrozen and isinstance(pl_module, TransferClassifier):
            pl_module.freeze_below(trainable_from(pl_module.stages, self.stages))


class MinSteps(Callback):
    """A budget in optimizer steps (`protocol.min_steps`, which is also Lightning's `min_steps`):
    Lightning's `min_steps` only holds off early stopping, and `max_epochs` still ends the fit,
    so this raises `max_epochs` until the epochs hold at least `min_steps` optimizer steps. It
    runs in `setup`, before `configure_optimizers`: the LR schedule spans the raised epochs."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        wanted, epochs = trainer.fit_loop.min_steps, trainer.max_epochs
        if stage != "fit" or not wanted or epochs is None or epochs < 1:
            return
        trainer.estimated_stepping_batches  # noqa: B018 -- loads the training data (Lightning)
        batches = trainer.num_training_batches  # this rank's, after limit_train_batches
        if not math.isfinite(batches) or batches < 1:
            return
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches)
        needed = math.ceil(wanted / per_epoch)
        if needed > epochs:
            log.info(
                "min_steps=%d: %d optimizer steps an epoch, max_epochs %d -> %d",
                wanted,
                per_epoch,
                epochs,
                needed,
            )
            trainer.fit_loop.max_epochs = needed


class StartCandidate(Callback):
    """The weights before the first training step as a candidate for selection: Lightning's
    sanity check validates them on the whole validation split (the fit runs it with
    `num_sanity_val_steps=-1`), and this keeps their score and a weights-only checkpoint.
    After the fit the start is tested when no epoch scored higher (ties go to the earlier
    candidate, as ModelCheckpoint's): a fit that only made things worse keeps its start."""

    def __init__(self, path: Path, monitor: str = "val_acc") -> None:
        self.path, self.monitor = path, monitor
        self.scores: dict[str, float] = {}

    def on_sanity_check_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        logged = trainer.callback_metrics
        if self.monitor not in logged or self.scores:  # (a resumed fit has its start already)
            return
        self.scores = {f"start_{k}": float(v) for k, v in logged.items() if k.startswith("val_")}
        trainer.save_checkpoint(self.path, weights_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"scores": dict(self.scores)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed fit's start: its scores (its checkpoint is at `path`, put there by the
        launch that resumes)."""
        self.scores = {k: float(v) for k, v in state_dict.get("scores", {}).items()}

    def wins(self, best: float | None) -> bool:
        """Whether the start scored at least `best` (the best epoch's score)."""
        start = self.scores.get(f"start_{self.monitor}")
        return start is not None and (best is None or start >= best)


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

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.images, self.seconds = int(state_dict["images"]), float(state_dict["seconds"])

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds else float("nan")


class LineProgress(ProgressBar):
    """Lightning's progress in a log file (not a terminal), as lines instead of a progress bar's
    carriage returns: one line per epoch (its metrics, the fit's time elapsed and left), and a
    line at each tenth of a predict loop (feature extraction)."""

    def __init__(self) -> None:
        super().__init__()
        self.shown, self.started = True, 0.0
        self.tenths = 0

    def disable(self) -> None:
        self.shown = False

    def enable(self) -> None:
        self.shown = True

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.shown:
            return
        done = trainer.current_epoch + 1
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else done
        metrics = self.get_metrics(trainer, module)
        shown = " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in sorted(metrics.items())
            if k != "v_num"
        )
        log.info("%s | %s", line("epoch", done, total, time.monotonic() - self.started), shown)

    def on_predict_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.started, self.tenths = time.monotonic(), 0

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        total = int(trainer.num_predict_batches[dataloader_idx])
        done = batch_idx + 1
        if not self.shown or not total or done * 10 // total <= self.tenths:
            return
        self.tenths = done * 10 // total
        log.info("%s", line("extracting features", done, total, time.monotonic() - self.started))


class StopOnSignal(Callback):
    """Ends any loop at the next batch once SIGTERM came, even if the exception its handler
    raised was lost (benchmark.runtime.interrupt)."""

    def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
        interrupt.check()

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = on_train_batch_end


def progress_callbacks(enabled: bool) -> list[Callback]:
    """Lightning's own progress bar on a terminal; lines in a log (LineProgress)."""
    return [LineProgress()] if enabled and not sys.stderr.isatty() else []


class ModelSize(ModelSummary):
    """The model in one line (`model: 3.4 M parameters, 2.6 K trained`) in place of
    Lightning's table of the top modules, whose FLOPs column reads 0 for a model without an
    example input and whose size estimate warns under bf16 (`verbose=true` shows the table)."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = sum(p.numel() for p in pl_module.parameters())
        trained = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        log.info(
            "model: %s parameters, %s trained",
            get_human_readable_count(total).strip(),
            get_human_readable_count(trained).strip(),
        )


def summary_callbacks(enabled: bool, verbose: bool) -> list[Callback]:
    """The model summary when the Trainer shows one (trainer.enable_model_summary): one line,
    or Lightning's own table when `verbose`."""
    return [ModelSize()] if enabled and not verbose else []


def make_model(
    strategy: StrategyConfig,
    head: HeadConfig,
    optim: OptimConfig,
    backbone: Backbone,
    num_classes: int,
) -> TransferClassifier:
    return TransferClassifier(
        backbone.model,
        backbone.stages,
        backbone.num_features,
        num_classes,
        trainable_stages=strategy.trainable_stages,
        bn=strategy.bn,
        lr=strategy.lr * (strategy.ft_lr_factor or 1.0),
        optim=optim,
        head=head,
    )


def recipe_callbacks(strategy: StrategyConfig, optim: OptimConfig) -> list[Callback]:
    """Early stopping and the two-stage unfreezing, when the recipe asks for them."""
    callbacks: list[Callback] = []
    if optim.early_stopping_patience is not None:
        patience = optim.early_stopping_patience
        callbacks.append(EarlyStopping("val_acc", mode="max", patience=patience))
    if strategy.unfreeze_at_epoch is not None:
        lr = strategy.lr * strategy.unfreeze_lr_factor
        callbacks.append(StagedUnfreeze(strategy.unfreeze_at_epoch, strategy.unfreeze_stages, lr))
    return callbacks
