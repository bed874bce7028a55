from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmark.config.schema import DatasetConfig
from benchmark.data import DatasetError, acquire, scan_class_folders, sources
from benchmark.data import build_manifest as build
from benchmark.data.images import Preprocess
from benchmark.data.loading import ManifestDataModule, build_transform

LITE = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def build_manifest(name, data_root, val_fraction, seed, download=True):
    cfg = DatasetConfig(name=name, val_fraction=val_fraction, download=download)
    return build(cfg, data_root, seed).frame


def test_hymenoptera_manifest_follows_the_official_split(shared_data):
    manifest = build_manifest("hymenoptera", shared_data, val_fraction=0.2, seed=0)
    counts = manifest.groupby(["split", "label"]).size().to_dict()
    # official train/ (123 ants + the .jpeg, 121 bees; imageNotFound.gif left out) -> train + val
    assert counts[("train", "ants")] + counts[("val", "ants")] == 124 - 1
    assert counts[("train", "bees")] + counts[("val", "bees")] == 121
    # official val/ is the held-out test split, untouched by the seed
    assert (counts[("test", "ants")], counts[("test", "bees")]) == (70, 83)
    assert (counts[("val", "ants")], counts[("val", "bees")]) == (25, 24)  # 20% of each class
    assert not manifest.path.str.endswith(".gif").any()
    assert manifest.path.str.endswith("formica.jpeg").sum() == 1


def test_validation_split_is_seeded_and_stratified(shared_data):
    first = build_manifest("hymenoptera", shared_data, 0.2, seed=0)
    again = build_manifest("hymenoptera", shared_data, 0.2, seed=0)
    other = build_manifest("hymenoptera", shared_data, 0.2, seed=1)
    assert first.equals(again)
    val = set(first[first.split == "val"].path)
    assert val != set(other[other.split == "val"].path)
    per_class = lambda m: m[m.split == "val"].label.value_counts().to_dict()  # noqa: E731
    assert per_class(first) == per_class(other)
    assert set(first[first.split == "test"].path) == set(other[other.split == "test"].path)


def test_missing_dataset_offline_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(DatasetError) as error:
        build_manifest("hymenoptera", tmp_path, 0.2, 0, download=False)
    message = str(error.value)
    assert str(tmp_path / "hymenoptera_data") in message
    assert "hymenoptera_data.zip" in message and "BENCHMARK_DATA_ROOT" in message


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cats" / "a.jpg")
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"dogs have no usable images"):
        scan_class_folders(tmp_path)


def test_gray_gives_three_identical_luminance_channels(shared_data):
    image = Image.open(next((shared_data / "hymenoptera_data/val/bees").glob("*.jpg")))
    gray = build_transform(LITE, grayscale=True)(image.convert("RGB"))
    rgb = build_transform(LITE, grayscale=False)(image.convert("RGB"))
    assert gray.shape == rgb.shape == (3, 224, 224)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert not torch.equal(rgb[0], rgb[1])
    # luminance lies between the channels it is made of
    assert rgb.min(0).values.mean() <= gray[0].mean() <= rgb.max(0).values.mean()


def test_datamodule_batches_are_preprocessed_for_the_backbone(shared_data):
    manifest = build_manifest("hymenoptera", shared_data, 0.2, seed=0)
    data = ManifestDataModule(manifest, LITE, grayscale=False, batch_size=4, num_workers=0)
    assert data.classes == ["ants", "bees"]
    batch = next(iter(data.test_dataloader()))
    assert batch[0].dtype == torch.uint8  # a quarter of the bytes to move to the device
    images, targets = data.on_after_batch_transfer(batch, 0)
    assert images.shape == (4, 3, 224, 224) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0  # mean = std = 0.5
    assert set(targets.tolist()) <= {0, 1}
    assert len(data.split("test")) == 153


def test_unknown_dataset_lists_the_known_ones(tmp_path: Path):
    with pytest.raises(DatasetError, match="hymenoptera"):
        build_manifest("hymenopterra", tmp_path, 0.2, 0)


def fake_download(tree: Path | None, corrupt: bool = False):
    """Stands in for the network: 'extracts' a copy of `tree`, or fails like an offline machine."""

    def download(url: str, download_root: str, **_: object) -> None:
        if tree is None:
            raise OSError("[Errno -2] Name or service not known")
        target = Path(download_root) / tree.name
        shutil.copytree(tree, target)
        if corrupt:
            next(target.rglob("*.jpg")).write_bytes(b"truncated")

    return download


def test_download_is_verified_then_moved_into_place(tmp_path, shared_data, monkeypatch):
    real = shared_data / "hymenoptera_data"
    monkeypatch.setattr(acquire, "download_and_extract_archive", fake_download(real))
    manifest = build_manifest("hymenoptera", tmp_path, 0.2, seed=0)
    assert len(manifest) == 244 + 153
    assert manifest.path.str.startswith(str(tmp_path / "hymenoptera_data")).all()
    assert [p.name for p in tmp_path.iterdir()] == ["hymenoptera_data"]  # no temp folder left


def test_download_with_wrong_content_leaves_nothing_behind(tmp_path, shared_data, monkeypatch):
    real = shared_data / "hymenoptera_data"
    monkeypatch.setattr(acquire, "download_and_extract_archive", fake_download(real, True))
    with pytest.raises(DatasetError, match="checksum"):
        build_manifest("hymenoptera", tmp_path, 0.2, seed=0)
    assert list(tmp_path.iterdir()) == []


def test_offline_download_names_the_file_and_where_it_goes(tmp_path, monkeypatch):
    monkeypatch.setattr(acquire, "download_and_extract_archive", fake_download(None))
    with pytest.raises(DatasetError) as error:
        build_manifest("hymenoptera", tmp_path, 0.2, seed=0)
    message = str(error.value)
    assert "Could not fetch hymenoptera_data (" in message and "Name or service" in message
    assert f"Download {sources.HYMENOPTERA_URL}" in message
    assert f"unzip it into {tmp_path}" in message
