"""Each transfer recipe trains exactly the parameters it should, with BatchNorm as specified."""

from __future__ import annotations

import pytest
import torch
import torchvision
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmark.cell.run import run_cell
from benchmark.config.schema import HeadConfig, OptimConfig
from benchmark.models.backbones import BACKBONES, STUB, create_backbone, stage_of
from benchmark.models.classifier import TransferClassifier
from tests.conftest import TINY


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def local_torchvision(name: str, tmp_path_factory) -> object:
    """torchvision backbones with a weights file made here (no download in tests)."""
    file = tmp_path_factory.mktemp("weights") / f"{name}.pth"
    torch.save(torchvision.models.get_model(name).state_dict(), file)
    return create_backbone(name, weights_path=str(file))


def classifier(backbone, **strategy) -> TransferClassifier:
    model = TransferClassifier(
        backbone.model, backbone.stages, backbone.num_features, 2, **strategy
    )
    return model.train()


def trainable(model: TransferClassifier) -> set[int]:
    """Stages (0 = stem) that have a parameter requiring grad."""
    stages = model.hparams.stages
    return {stage_of(n, stages) for n, p in model.backbone.named_parameters() if p.requires_grad}


def batchnorm_modes(model: TransferClassifier) -> dict[int, set[bool]]:
    modes: dict[int, set[bool]] = {}
    for name, module in model.backbone.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            modes.setdefault(stage_of(name, model.hparams.stages), set()).add(module.training)
    return modes


def test_finetune_trains_every_parameter(lite0):
    model = classifier(lite0, trainable_stages=None)  # bn=eval: batch statistics where it trains
    assert all(p.requires_grad for p in model.parameters())
    assert all(modes == {True} for modes in batchnorm_modes(model).values())


def test_frozen_batchnorm_keeps_imagenet_statistics_while_everything_trains(lite0):
    model = classifier(lite0, trainable_stages=None, bn="frozen")  # lp_ft's
    assert all(p.requires_grad for p in model.parameters())
    assert all(modes == {False} for modes in batchnorm_modes(model).values())
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    model(torch.randn(4, 3, 224, 224))
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns, strict=True))


def test_freeze_trains_only_the_head_and_keeps_batchnorm_statistics(lite0):
    model = classifier(lite0, trainable_stages=0, bn="eval")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "head.0.weight",
        "head.0.bias",
    }
    assert all(modes == {False} for modes in batchnorm_modes(model).values())
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [bn.running_mean.clone() for bn in bns]
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 224, 224)), torch.tensor([0, 1] * 2))
    loss.backward()
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns, strict=True))
    assert all(p.grad is None for p in model.backbone.parameters())


def test_freeze_bn_train_is_the_studys_freeze_with_drifting_statistics(lite0):
    model = classifier(lite0, trainable_stages=0, bn="train")
    assert trainable(model) == set()
    assert all(modes == {True} for modes in batchnorm_modes(model).values())
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 224, 224))
    assert not torch.equal(before, bn.running_mean)


@pytest.mark.parametrize(
    "name", ["efficientnet_lite0", "resnet18", "vgg16", "mobilenet_v3_large", "convnext_tiny"]
)
def test_partial_top_two_stages_are_the_stride_16_and_32_stages(name, tmp_path_factory):
    backbone = (
        create_backbone(name)
        if name.startswith("efficientnet")
        else local_torchvision(name, tmp_path_factory)
    )
    model = classifier(backbone, trainable_stages=2, bn="eval")
    top = len(backbone.stages)
    assert trainable(model) == {top - 1, top}
    modes = batchnorm_modes(model)
    assert all(modes[s] == {False} for s in modes if s < top - 1)
    assert all(modes[s] == {True} for s in modes if s >= top - 1)
    # Stage outputs halve resolution: feeding 64 px, the top two stages see 4x4 and 2x2 maps.
    shapes = {}
    for stage in (top - 1, top):
        first = backbone.model.get_submodule(backbone.stages[stage - 1][0])
        first.register_forward_hook(lambda m, i, o, s=stage: shapes.update({s: o.shape[-1]}))
    model.eval()(torch.randn(1, 3, 64, 64))
    if name != "vgg16":  # VGG's first conv of a stage keeps the previous stride until its pool
        assert (shapes[top - 1], shapes[top]) == (4, 2), shapes


def test_every_backbone_names_only_real_submodules(tmp_path_factory):
    for name in BACKBONES:
        if name.startswith("efficientnet"):
            continue  # checked with real weights above
        stub = name == STUB  # random weights, nothing to load
        backbone = create_backbone(name) if stub else local_torchvision(name, tmp_path_factory)
        for stage in backbone.stages:
            for module in stage:
                backbone.model.get_submodule(module)  # raises if misnamed


def test_discriminative_learning_rates(lite0):
    optim = OptimConfig(name="sgd_cosine", backbone_lr_factor=0.1)
    model = classifier(lite0, trainable_stages=None, lr=0.01, optim=optim)
    model.trainer = type("T", (), {"max_epochs": 3})()  # configure_optimizers reads max_epochs
    optimizer = model.configure_optimizers()["optimizer"]
    head, backbone = optimizer.param_groups
    assert head["lr"] == 0.01 and backbone["lr"] == pytest.approx(0.001)
    assert len(backbone["params"]) == len(list(lite0.model.parameters()))


def test_mlp_head(lite0):
    model = TransferClassifier(
        lite0.model,
        lite0.stages,
        lite0.num_features,
        3,
        trainable_stages=0,
        head=HeadConfig(name="mlp", hidden=[64, 32], batchnorm=True, dropout=0.1),
    )
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2 + ["Linear"]
    assert model.eval()(torch.randn(2, 3, 224, 224)).shape == (2, 3)


class Recorder(Callback):
    """Per epoch: which backbone stages train and the optimizer's learning rates."""

    def __init__(self) -> None:
        self.epochs: list[tuple[set[int], list[float]]] = []

    def on_train_batch_start(self, trainer, module, batch, index) -> None:
        if index == 0:
            lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
            self.epochs.append((trainable(module), lrs))


def test_two_stage_unfreezes_the_top_stages_at_the_epoch_with_a_lower_lr(make_cfg):
    recorder = Recorder()
    cfg = make_cfg(
        "strategy=two_stage",
        "strategy.unfreeze_at_epoch=1",
        *TINY,
        "trainer.max_epochs=2",
        "strategy.lr=0.03",
        "strategy.unfreeze_lr_factor=0.1",
    )
    run_cell(cfg, callbacks=[recorder])
    (first_stages, first_lrs), (second_stages, second_lrs) = recorder.epochs
    assert first_stages == set() and len(first_lrs) == 1
    assert second_stages == {4, 5}  # the top 2 of EfficientNet's 5 stages
    assert len(second_lrs) == 2 and second_lrs[1] == pytest.approx(0.003)


def learning_rates(make_cfg, preset: str, epochs: int) -> tuple[str, list[float]]:
    cfg = make_cfg(f"optim={preset}", f"trainer.max_epochs={epochs}")
    backbone = create_backbone("efficientnet_lite0")
    model = classifier(backbone, lr=0.01, optim=cfg.optim)
    model.trainer = type("T", (), {"max_epochs": epochs})()
    configured = model.configure_optimizers()
    optimizer, schedule = configured["optimizer"], configured["lr_scheduler"]
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return type(optimizer).__name__, rates


def test_optimizer_presets_follow_their_schedules(make_cfg):
    name, study = learning_rates(make_cfg, "sgd_step", 12)
    assert name == "SGD" and study[:10] == [0.01] * 10
    assert study[10] == pytest.approx(0.001)
    name, modern = learning_rates(make_cfg, "adamw_cosine", 5)
    assert name == "AdamW"
    assert modern[0] == pytest.approx(0.0001) and modern[1] == pytest.approx(0.001)  # warm-up
    assert modern[1] > modern[2] > modern[3] > modern[4] > 0  # then cosine decay


def test_early_stopping_ends_training_when_validation_stalls(make_cfg):
    cfg = make_cfg(
        "strategy=freeze",
        *TINY,
        "trainer.max_epochs=6",
        "strategy.lr=1e-12",  # learns nothing: validation accuracy stalls
        "optim.early_stopping_patience=1",
    )
    result = run_cell(cfg)
    history = mlflow_history(result.run_id, cfg.tracking.uri)
    assert len(history) == 2  # epoch 0 sets the best, epoch 1 does not improve: stop


def mlflow_history(run_id: str, uri: str) -> list[float]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    return [m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "val_acc")]


@pytest.mark.parametrize("policy", ["none", "standard", "strong"])
def test_augmentation_policies_give_backbone_sized_tensors(policy, make_cfg, shared_data):
    from benchmark.data.images import load_rgb
    from benchmark.data.loading import build_augmentation, build_transform

    cfg = make_cfg(f"augment={policy}", "backbone=efficientnet_lite1")
    preprocess = create_backbone("efficientnet_lite1").preprocess
    augmentation = build_augmentation(cfg.augment.transforms, preprocess)
    transform = build_transform(preprocess, False, augmentation)
    tiny = next(
        p
        for p in sorted((shared_data / "dogs-vs-cats/train").glob("*.jpg"))
        if min(load_rgb(str(p)).size) < 100
    )  # one of the 59x80-pixel photos
    for path in [tiny, *sorted((shared_data / "hymenoptera_data/val/ants").glob("*.jpg"))[:3]]:
        tensor = transform(load_rgb(str(path)))
        assert tensor.shape == (3, 240, 240) and tensor.dtype == torch.float32
        assert torch.isfinite(tensor).all() and tensor.min() > -1.5 and tensor.max() < 1.5
    assert len(augmentation) == {"none": 0, "standard": 2, "strong": 6}[policy]


def test_preview_writes_a_grid_of_augmented_images(tmp_path, shared_data):
    from PIL import Image

    from benchmark.tools.data import main as data_cli

    out = tmp_path / "preview.png"
    code = data_cli(
        [
            "preview",
            f"paths.data_root={shared_data}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "augment=strong",
            "--out",
            str(out),
            "--images",
            "9",
        ]
    )
    assert code == 0
    with Image.open(out) as grid:
        assert grid.size == (3 * 224 + 4 * 4, 3 * 224 + 4 * 4)  # 3x3 with 4-px padding


def test_frozen_batchnorm_statistics_stay_fixed_through_a_real_lightning_fit(lite0):
    """Lightning 2.6 does not call model.train() when fit starts and, after validation, restores
    each submodule's previous mode: modes must be right from construction on. (A first version
    set them only in train(), so its "freeze" let BatchNorm statistics drift.)"""
    import lightning as L

    model = TransferClassifier(
        lite0.model, lite0.stages, lite0.num_features, 2, trainable_stages=0, bn="eval", lr=0.03
    )
    bn = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    before, modes = bn.running_mean.clone(), []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, index) -> None:
            modes.append(bn.training)

    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 64, 64), torch.randint(0, 2, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Spy()],
    ).fit(model, loader, loader)
    assert modes == [False] * 4
    assert torch.equal(before, bn.running_mean)
