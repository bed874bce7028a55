"""Whether a fit had converged, as the cell logs it once after the fit: the last epoch's
training loss and accuracy, the epoch of the best validation accuracy and the epochs run.
The report reads them to mark a cell that may be undertrained."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

# The last epoch's metrics a fit's convergence is read from (as final_<name>).
FINAL = ("train_loss", "train_acc", "val_acc")


class Convergence(Callback):
    """Counts the training epochs and remembers the epoch (0-based, Lightning's) of the best
    validation accuracy, chosen as ModelCheckpoint(mode="max") chooses: the first epoch with
    the highest `val_acc` (a later tie does not replace it)."""

    def __init__(self, monitor: str = "val_acc") -> None:
        self.monitor = monitor
        self.epochs = 0
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.last: dict[str, float] = {}  # the last epoch's FINAL metrics, as it ended

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking or (value := trainer.callback_metrics.get(self.monitor)) is None:
            return
        if self.best is None or float(value) > self.best:
            self.best, self.best_epoch = float(value), trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epochs += 1
        logged = trainer.callback_metrics  # the epoch's aggregates, as `metrics` reads them
        self.last = {name: float(logged[name]) for name in FINAL if name in logged}

    def state_dict(self) -> dict[str, Any]:
        """What a fit resumed from a checkpoint needs to go on counting (its epochs, its best
        epoch) and to say how it ended when it resumes after its last epoch."""
        return {
            "epochs": self.epochs,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "last": dict(self.last),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = int(state_dict["epochs"])
        self.best, self.best_epoch = state_dict["best"], state_dict["best_epoch"]
        self.last = {name: float(value) for name, value in state_dict["last"].items()}

    def metrics(self, trainer: L.Trainer, start_won: bool = False) -> dict[str, float]:
        """Read right after `fit`: `final_train_loss`, `final_train_acc` (the last epoch's
        aggregates, as trained: augmentation and dropout on), `final_val_acc` (the last
        epoch's), `best_val_epoch` (-1 when the start won the selection), `epochs_run`."""
        logged = trainer.callback_metrics
        out = {f"final_{name}": float(logged[name]) for name in FINAL if name in logged}
        for name, value in self.last.items():  # a fit resumed after its last epoch ran none
            out.setdefault(f"final_{name}", value)
        if start_won:
            out["best_val_epoch"] = -1.0
        elif self.best_epoch is not None:
            out["best_val_epoch"] = float(self.best_epoch)
        return out | {"epochs_run": float(self.epochs)}
