"""A fit that cannot learn keeps its start (issue 32): at learning rate 0 (or 1e-9) no weight
moves, so nothing else may move the network either (BatchNorm statistics of augmented batches,
dropout left on at evaluation), and the start itself is a candidate for checkpoint selection."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
from lightning.pytorch.callbacks import Callback

from benchmark.cell.run import run_cell
from tests.conftest import TINY

# Every image of train and validation, three epochs with augmentation: drift would show.
LONGER = [o for o in TINY if not o.startswith(("trainer.limit_", "trainer.max_epochs"))] + [
    "trainer.max_epochs=3",
    "trainer.limit_test_batches=1",
]


class ValPerEpoch(Callback):
    """val_acc and val_loss after each training epoch (the sanity check left out)."""

    def __init__(self) -> None:
        self.acc: list[float] = []
        self.loss: list[float] = []

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.acc.append(float(trainer.callback_metrics["val_acc"]))
            self.loss.append(float(trainer.callback_metrics["val_loss"]))


@pytest.mark.parametrize("lr", ["0", "1e-9"])
def test_lp_ft_at_no_learning_rate_keeps_its_probe(make_cfg, ants_and_bees, lr):
    cfg = make_cfg(
        "dataset=imagefolder",
        f"dataset.root={ants_and_bees}",
        "strategy=lp_ft",
        f"strategy.lr={lr}",
        "strategy.probe_c=[10.0]",  # a head far from zero: any drift of the features shows
        *LONGER,
    )
    seen = ValPerEpoch()
    result = run_cell(cfg, callbacks=[seen])
    metrics = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    start_acc, start_loss = metrics["lp_val_acc"], metrics["lp_val_loss"]
    assert len(seen.acc) == 3
    # The same network every epoch: the probe's accuracy, its loss up to float rounding.
    assert seen.acc == pytest.approx([start_acc] * 3, abs=1e-6)
    assert seen.loss == pytest.approx([start_loss] * 3, rel=1e-4)
    assert metrics["start_val_acc"] == pytest.approx(start_acc, abs=1e-6)
    assert metrics["best_val_acc"] >= start_acc  # the start is a candidate


def finetune_at_lr_0(make_cfg, root, *overrides: str) -> tuple[ValPerEpoch, dict[str, float]]:
    cfg = make_cfg(
        "dataset=imagefolder", f"dataset.root={root}", "strategy=finetune", "strategy.lr=0",
        *LONGER, *overrides,
    )  # fmt: skip
    seen = ValPerEpoch()
    result = run_cell(cfg, callbacks=[seen])
    return seen, mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics


def test_finetune_with_frozen_batchnorm_at_lr_0_keeps_its_start(make_cfg, ants_and_bees):
    seen, metrics = finetune_at_lr_0(make_cfg, ants_and_bees, "strategy.bn=frozen")
    start = metrics["start_val_acc"], metrics["start_val_loss"]
    assert seen.acc == pytest.approx([start[0]] * 3, abs=1e-6)
    assert seen.loss == pytest.approx([start[1]] * 3, rel=1e-4)
    # Ties go to the earliest candidate: nothing beat the start, so the start was tested.
    assert metrics["best_val_epoch"] == -1


def test_finetune_at_lr_0_never_ends_below_its_start(make_cfg, ants_and_bees):
    """finetune's default BatchNorm (bn=eval) normalises the training stages by batch and moves
    their statistics toward the new data, even at lr 0 (the network's only change then); the
    start is a candidate, so the cell never ends below it on validation."""
    seen, metrics = finetune_at_lr_0(make_cfg, ants_and_bees)
    assert len(seen.acc) == 3
    assert metrics["best_val_acc"] == pytest.approx(max([metrics["start_val_acc"], *seen.acc]))
