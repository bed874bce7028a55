"""Fast seams for unit tests, beside the real-data end-to-end ones (as DomainBed and torchgeo
keep theirs): a stub backbone (a tiny random CNN in the `Backbone` contract: a stem, two stages,
pooled features) and a tiny synthetic dataset (learnable: a class shows in the red channel), so
that strategies, tuning and callbacks run in a second, with no image, weight file or store."""

from __future__ import annotations

from collections import OrderedDict

import lightning as L
import torch
from torch import nn

from benchmark.data.images import Preprocess
from benchmark.models.backbones import Backbone
from benchmark.models.features import FeatureDataModule, FeatureSet

SIZE = 16  # pixels a side
WIDTH = 8  # the stub's feature width


def _block(width: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3 if stride == 1 else width, width, 3, stride=stride, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    )


def stub_backbone(seed: int = 0) -> Backbone:
    """Stem, `stage1` and `stage2` (each halves the resolution), pooled to WIDTH features."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            stem=_block(WIDTH, 1),
            stage1=_block(WIDTH, 2),
            stage2=_block(WIDTH, 2),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
        )
    )
    return Backbone(
        model, WIDTH, Preprocess(SIZE, (0.5,) * 3, (0.5,) * 3), [["stage1"], ["stage2"]]
    )


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
