from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torchvision

from benchmark.config import DatasetConfig
from benchmark.data import build_manifest
from benchmark.data.loading import ManifestDataModule
from benchmark.models import IMAGENET_CLASSES, BackboneError, create_backbone

ANT, BEE = 310, 309  # ImageNet class indices


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_backbone("efficientnet_lite0", num_classes=IMAGENET_CLASSES)


def zero_shot_hits(backbone, preprocess, shared_data, per_class: int = 40) -> dict[str, float]:
    """Share of held-out ants predicted as ImageNet 'ant', and of bees as 'bee'."""
    manifest = build_manifest(DatasetConfig(name="hymenoptera"), shared_data, seed=0).frame
    test = manifest[manifest.split == "test"].groupby("label").head(per_class)
    data = ManifestDataModule(test, preprocess, False, batch_size=per_class, num_workers=0)
    backbone.model.eval()
    hits = {}
    with torch.inference_mode():
        for batch in data.test_dataloader():
            images, targets = data.on_after_batch_transfer(batch, 0)
            predicted = backbone.model(images).argmax(1)
            for label, index in (("ants", ANT), ("bees", BEE)):
                mine = targets == data.classes.index(label)
                if mine.any():
                    hits[label] = (predicted[mine] == index).float().mean().item()
    return hits


@pytest.mark.parametrize(
    ("name", "size"),
    [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)],
)
def test_offline_weights_and_preprocessing_are_real(name, size, lite0_imagenet, shared_data):
    backbone = (
        lite0_imagenet
        if name == "efficientnet_lite0"
        else create_backbone(name, num_classes=IMAGENET_CLASSES)
    )
    assert backbone.preprocess.mean == (0.5, 0.5, 0.5)
    assert backbone.preprocess.input_size == size
    hits = zero_shot_hits(backbone, backbone.preprocess, shared_data)
    assert hits["ants"] >= 0.6 and hits["bees"] >= 0.6, hits


def test_zero_shot_check_catches_foreign_normalisation(lite0_imagenet, shared_data):
    imagenet_stats = replace(
        lite0_imagenet.preprocess, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    right = zero_shot_hits(lite0_imagenet, lite0_imagenet.preprocess, shared_data)
    wrong = zero_shot_hits(lite0_imagenet, imagenet_stats, shared_data)
    assert wrong["ants"] + wrong["bees"] < right["ants"] + right["bees"]


def test_resnet18_loads_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    file = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), file)
    backbone = create_backbone("resnet18", weights_path=str(file))
    assert backbone.num_features == 512
    assert torch.equal(backbone.model.conv1.weight, reference.conv1.weight)
    assert backbone.model(torch.randn(1, 3, 224, 224)).shape == (1, 512)
    assert backbone.preprocess.mean == (0.485, 0.456, 0.406)
    assert (backbone.preprocess.input_size, backbone.preprocess.crop_pct) == (224, 224 / 256)


def test_resnet18_without_reachable_weights_names_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(BackboneError) as error:
        create_backbone("resnet18")
    message = str(error.value)
    assert "backbone.weights_path=" in message and str(tmp_path / "hub") in message


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(BackboneError, match="no such file"):
        create_backbone("efficientnet_lite0", weights_path=str(tmp_path / "nope.pth"))
