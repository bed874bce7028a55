"""A budget that is not epochs alone: `protocol.min_steps` raises the epochs of a small dataset
so that the fit takes at least that many optimizer steps, and the schedule spans them."""

from __future__ import annotations

import lightning as L
import mlflow
import pytest
from lightning.pytorch.callbacks import Callback

from benchmark.cell.run import run_cell
from benchmark.config.rules import problems
from tests.conftest import TINY


class LastTrainer(Callback):
    """The fit's trainer, and the LR of the head's param group at each epoch's start."""

    def __init__(self) -> None:
        self.trainer: L.Trainer | None = None
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.trainer = trainer
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_min_steps_raises_the_epochs_and_the_schedule_spans_them(make_cfg):
    # Two epochs' worth of data: 2 batches an epoch, 4 steps in 2 epochs; min_steps asks for 7.
    cfg = make_cfg(
        "strategy=freeze",
        *TINY,
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "protocol.min_steps=7",
    )
    seen = LastTrainer()
    result = run_cell(cfg, callbacks=[seen])
    client = mlflow.MlflowClient(cfg.tracking.uri)
    steps = client.get_run(result.run_id).data.metrics["optimizer_steps"]
    assert steps >= 7 and steps == seen.trainer.global_step == 8  # 4 epochs of 2 steps
    assert seen.trainer.max_epochs == 4 and len(seen.lrs) == 4
    # The cosine decays over the 4 epochs that ran, not over the 2 asked for: at the last
    # epoch's start it is at (1 + cos(3pi/4)) / 2 of the base rate, not already back up.
    schedule = seen.trainer.lr_scheduler_configs[0].scheduler
    assert schedule.T_max == 4
    assert seen.lrs[-1] == pytest.approx(seen.lrs[0] * 0.1464466, rel=1e-4)
    assert seen.lrs == sorted(seen.lrs, reverse=True)


def test_every_cell_logs_its_optimizer_steps(make_cfg):
    cfg = make_cfg("strategy=freeze", *TINY, "trainer.max_epochs=2")
    result = run_cell(cfg)
    metrics = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert metrics["optimizer_steps"] == 2  # epochs alone: 1 batch x 2 epochs


def test_min_steps_above_max_steps_is_refused(make_cfg):
    cfg = make_cfg("protocol.min_steps=300", "+trainer.max_steps=100")
    assert any("protocol.min_steps=300" in line for line in problems(cfg))
    assert any(
        "protocol.min_steps=0" in line for line in problems(make_cfg("protocol.min_steps=0"))
    )


def test_the_linear_probe_logs_its_lbfgs_iterations_as_its_steps(make_cfg, ants_and_bees):
    cfg = make_cfg(
        "dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=linear_probe", *TINY
    )
    result = run_cell(cfg)
    metrics = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert metrics["optimizer_steps"] >= 1
