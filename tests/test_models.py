from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import torchvision

from benchmark.config.schema import DatasetConfig
from benchmark.data import build_manifest
from benchmark.data.loading import ManifestDataModule
from benchmark.models.backbones import IMAGENET_CLASSES, BackboneError, create_backbone

ANT, BEE = 310, 309  # ImageNet class indices


@pytest.fixture(scope="module")
def lite0_imagenet():
    return create_backbone("efficientnet_lite0", num_classes=IMAGENET_CLASSES)


@functools.cache
def hymenoptera(shared_data: Path) -> pd.DataFrame:
    """Its manifest, built once for the zero-shot checks (each build verifies the 397 images)."""
    return build_manifest(DatasetConfig(name="hymenoptera"), shared_data, seed=0).frame


def zero_shot_hits(backbone, preprocess, shared_data, per_class: int = 40) -> dict[str, float]:
    """Share of held-out ants predicted as ImageNet 'ant', and of bees as 'bee'."""
    manifest = hymenoptera(shared_data)
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


# ---------------------------------------------------------------- any timm model by name


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory) -> str:
    """A timm ResNet-18 made here (no download) and saved as a weights file."""
    import timm

    file = tmp_path_factory.mktemp("timm") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), file)
    return str(file)


def test_a_timm_model_by_name_loads_its_weights_file_and_pretrained_config(resnet18_file):
    made = create_backbone("timm", weights_path=resnet18_file, model="resnet18.a1_in1k")
    saved = torch.load(resnet18_file, weights_only=True)
    assert torch.equal(made.model.state_dict()["conv1.weight"], saved["conv1.weight"])
    assert made.num_features == 512 and made.model(torch.zeros(1, 3, 64, 64)).shape == (1, 512)
    # resnet18.a1_in1k's own pretrained config: 224 px (tested at 288), bicubic, crop 0.95
    assert (made.preprocess.input_size, made.preprocess.interpolation) == (224, "bicubic")
    assert made.preprocess.crop_pct == 0.95
    # stages from timm's feature info: layer1..layer4 at strides 4..32; conv1/bn1 the stem
    assert [stage[0].split(".")[0] for stage in made.stages] == [f"layer{i}" for i in (1, 2, 3, 4)]
    assert not any(name.startswith(("conv1", "bn1")) for stage in made.stages for name in stage)


def test_timm_stages_match_the_hand_written_ones_of_a_known_family():
    import timm

    from benchmark.models.backbones import EFFICIENTNET_STAGES, feature_info_stages

    lite0 = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    found = feature_info_stages(lite0)
    assert [{name.split(".")[0] + "." + name.split(".")[1] if "." in name else name
             for name in stage} for stage in found] == [
        {p for p in stage} for stage in EFFICIENTNET_STAGES
    ]  # fmt: skip
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    groups = feature_info_stages(vit)  # one stride throughout: four groups of three blocks
    assert len(groups) == 4 and groups[-1][-1] == "norm"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (None, "backbone=timm needs the model's name"),
        ("resnet18x", "timm has no such model"),
        ("resnet18.a1_in1k", "backbone.weights_path=/path/to/weights"),  # offline, no file
    ],
)
def test_a_timm_model_that_cannot_be_had_is_one_clear_error(model, message, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no internet here: fail at once, not retry
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    with pytest.raises(BackboneError, match=message):
        create_backbone("timm", model=model)


def test_a_timm_cell_runs_end_to_end_offline_and_is_reported_by_its_name(
    make_cfg, resnet18_file, tmp_path
):
    import pandas as pd

    from benchmark.cell.run import run_cell
    from benchmark.report.__main__ import main as report
    from tests.conftest import TINY

    timm_cell = ["backbone=timm", "backbone.model=resnet18.a1_in1k"]
    summary = run_cell(make_cfg(*timm_cell, f"backbone.weights_path={resnet18_file}", *TINY))
    run = mlflow.MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "timm"
    assert run.data.params["backbone.model"] == "resnet18.a1_in1k"
    out = tmp_path / "report"
    uri = summary.tracking_uri
    assert report(["--tracking-uri", uri, "--out", str(out), "--include-debug"]) == 0
    assert list(pd.read_csv(out / "report.csv").backbone) == ["timm:resnet18.a1_in1k"]
