"""What a cell's fit keeps so that a relaunch resumes it where it was cut off, in Lightning's
terms: a full checkpoint at the end of every epoch (`LastCheckpoint`: weights, optimizer,
schedule, loops and every callback's state, written aside and renamed into place), the random
state and what the cell adds to it (`ResumeState`: the cell's key, the epochs and optimizer steps
done, the cell's seconds so far), and checkpoint callbacks whose state follows their files to the
folder of the launch that resumes (`Checkpoints`: a relaunch writes to its own folder).

A fit resumed from such a checkpoint computes what the uninterrupted fit computes, to the bit,
where every random number it draws comes from the generators kept here: one device, the loader
in the main process (`data.num_workers=0`), which is how the stub cells of the tests run. Loader
workers (persistent: their generators live in the worker processes), several DDP ranks (only
rank 0's state is kept) and non-deterministic GPU kernels give a fit that is the same in
distribution, not bit for bit.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from benchmark.models.features import FeatureDataModule

# The full checkpoint, in the cell's checkpoint folder, and the entry the cell adds to it.
LAST_FILE = "last.ckpt"
ENTRY = "benchmark.resume"
# The metrics the model logs once per epoch (TransferClassifier: its loggers step them by epoch).
EPOCH_CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")


def _relocated(path: object, old: str, new: str) -> object:
    """`path` moved from the folder `old` to `new` (anything else as it is)."""
    if isinstance(path, str) and path and os.path.dirname(path) == old:
        return os.path.join(new, os.path.basename(path))
    return path


def relocated(state: dict[str, Any], dirpath: str | None) -> dict[str, Any]:
    """A ModelCheckpoint's state, written in another folder, with every path in it moved to
    `dirpath` (the files were copied there by the launch that resumes)."""
    old = state.get("dirpath")
    if not isinstance(old, str) or dirpath is None or old == dirpath:
        return state
    moved = {key: _relocated(value, old, dirpath) for key, value in state.items()}
    moved["dirpath"] = dirpath
    if isinstance(best := state.get("best_k_models"), dict):
        moved["best_k_models"] = {_relocated(k, old, dirpath): v for k, v in best.items()}
    return moved


class Checkpoints(ModelCheckpoint):
    """Lightning's ModelCheckpoint, whose state, when restored from a checkpoint that was
    written in another folder, names the same files in this one's folder (Lightning would
    forget the best score it had, and the epoch that scored it)."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        here = None if self.dirpath is None else str(self.dirpath)
        super().load_state_dict(relocated(state_dict, here))


class LastCheckpoint(Checkpoints):
    """The fit's whole state at the end of every epoch, as `LAST_FILE` in `dirpath` (the one
    before it replaced): written under another name, then renamed into place, so that a
    process killed while writing leaves the previous epoch's file whole. Saved at the training
    epoch's end, after every other callback's end-of-epoch hook (Lightning runs checkpoint
    callbacks last) and before the learning-rate schedule steps (Lightning steps it again on
    resume): the state Lightning resumes from exactly."""

    def __init__(self, dirpath: Path) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=Path(LAST_FILE).stem,
            monitor=None,
            save_top_k=1,
            save_weights_only=False,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        partial = f"{filepath}.partial"
        trainer.save_checkpoint(partial, weights_only=False)  # rank 0 writes; all wait for it
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath


def random_state(datamodule: object) -> dict[str, Any]:
    """Every random generator the fit draws from, as plain values a checkpoint loads with
    `weights_only`: torch's (and CUDA's), numpy's, Python's, and the cached features' view
    generator (FeatureDataModule) once its training loader is built."""
    kind, keys, position, has_gauss, gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state()
    )
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if isinstance(datamodule, FeatureDataModule) and (views := datamodule.view_state()) is not None:
        state["views"] = views
    return state


def restore_random_state(state: dict[str, Any], datamodule: object) -> None:
    """Every generator as `random_state` kept it."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if isinstance(datamodule, FeatureDataModule) and "views" in state:
        datamodule.restore_view_state(state["views"])


def epochs_done(trainer: L.Trainer) -> int:
    """The epochs the fit has trained, the current one included once it ran its last batch
    (Lightning counts it `processed` before the end-of-epoch hooks where checkpoints are saved;
    a fit resumed from such a checkpoint starts at the next)."""
    current = cast(Any, trainer.fit_loop.epoch_progress.current)
    return int(current.processed)


class ResumeState(Callback):
    """Adds to every full checkpoint (not the weights-only ones of selection) what a relaunch
    needs beside Lightning's state: the cell's key (a checkpoint of another cell is never
    resumed), the MLflow run of the fit (`run_id`), the epochs and optimizer steps done, the
    cell's seconds so far (`seconds`), the random state, and the epoch's EPOCH_CURVES with the
    time (Lightning logs the training ones after the checkpoint is written: a cut in between
    leaves them to the relaunch); and restores the random state when the fit resumes from one,
    before the training loader draws its first numbers."""

    def __init__(self, key: str, run_id: str, seconds: Callable[[], float]) -> None:
        self.key, self.run_id, self.seconds = key, run_id, seconds

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[ENTRY] = {
            "cell_key": self.key,
            "run_id": self.run_id,
            "epochs": epochs_done(trainer),
            "steps": trainer.global_step,
            "seconds": float(self.seconds()),
            "random": random_state(getattr(trainer, "datamodule", None)),
            "curves": {
                name: float(value)
                for name, value in trainer.callback_metrics.items()
                if name in EPOCH_CURVES
            },
            "time_ms": int(time.time() * 1000),
        }

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if (entry := checkpoint.get(ENTRY)) is not None:
            restore_random_state(entry["random"], getattr(trainer, "datamodule", None))


def entry(file: Path) -> dict[str, Any]:
    """What `ResumeState` added to the checkpoint `file` ({} if nothing). Raises what
    torch.load raises on a damaged file."""
    loaded = torch.load(file, map_location="cpu", weights_only=True)
    said = loaded.get(ENTRY) if isinstance(loaded, dict) else None
    return said if isinstance(said, dict) else {}
