"""Fast seams for unit tests, beside the real-data end-to-end ones (as DomainBed and torchgeo
keep theirs): the stub backbone (`backbone=stub`: a tiny random CNN in the `Backbone` contract, a
stem, two stages, pooled features; benchmark.models.backbones), a tiny synthetic dataset in memory
(learnable: a class shows in the red channel) and a quiet Trainer, so that strategies, tuning and
callbacks run in a second, with no image, weight file or store. Whole cells on the stub run on
`dataset=synthetic`, its image-folder counterpart (tests/test_stub_cells.py); a CellSpec from
overrides without a fixture: tests.conftest.cell_spec."""

from __future__ import annotations

import lightning as L
import torch

from benchmark.models.backbones import STUB_SIZE as SIZE  # pixels a side
from benchmark.models.backbones import STUB_WIDTH as WIDTH  # the stub's feature width
from benchmark.models.backbones import stub_backbone
from benchmark.models.features import FeatureDataModule, FeatureSet

__all__ = ["SIZE", "WIDTH", "quiet_trainer", "stub_backbone", "synthetic_data"]


def synthetic_data(
    classes: int = 2, per_class: tuple[int, int, int] = (16, 8, 8), seed: int = 0, batch: int = 8
) -> FeatureDataModule:
    """Train / val / test images (`per_class` of each class in each split): noise, with the
    red channel shifted by the class, batched as the cell's cached-input path batches them."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = {}, {}
    for split, n in zip(("train", "val", "test"), per_class, strict=True):
        labels = torch.arange(classes).repeat_interleave(n)
        x = 0.5 * torch.randn(len(labels), 3, SIZE, SIZE, generator=generator)
        x[:, 0] += (2.0 * labels.float() - (classes - 1))[:, None, None]
        images[split], targets[split] = x, labels
    features = FeatureSet(
        train=images["train"][None],  # one view
        val=images["val"],
        test=images["test"],
        targets=targets,
        build_s=0.0,
    )
    return FeatureDataModule(features, [f"class{i}" for i in range(classes)], batch, seed)


def quiet_trainer(**kwargs: object) -> L.Trainer:
    """A CPU Trainer that logs, checkpoints and prints nothing."""
    settings: dict[str, object] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**(settings | kwargs))
