"""Every Lightning Trainer the harness builds comes from here: a cell's fit, a tuning trial, the
frozen backbone's feature extraction and the DDP launcher check. The cell's `trainer` group
gives the arguments, `overrides` replace some of them for that use (a trial logs nothing, a head
on cached features trains in float32...), and every Trainer ends its loops once SIGTERM came."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.callbacks import Callback

from benchmark.models.classifier import StopOnSignal


def build_trainer(
    trainer: Mapping[str, Any], callbacks: Sequence[Callback] = (), **overrides: Any
) -> L.Trainer:
    """Lightning's Trainer from the `trainer` group (its `_target_`), with `callbacks` and
    StopOnSignal, and `overrides` in place of the group's values."""
    built: L.Trainer = hydra.utils.instantiate(
        trainer, callbacks=[StopOnSignal(), *callbacks], **overrides
    )
    return built
