"""Datasets as split manifests, and the loaders that feed them to a backbone.

A dataset is prepared into a manifest (one row per image: path, label, split) from exactly what its
official source ships. Everything downstream — splits, class counts, the loaders — reads the
manifest, so a number can always be traced back to its images.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "val", "test")


class DatasetError(RuntimeError):
    """The data is missing or unusable; the message says where and how to fix it."""


@dataclass(frozen=True)
class Preprocess:
    """The input a backbone was trained on; it belongs to the backbone, never to the dataset."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


# ---------------------------------------------------------------- manifests

Preparer = Callable[[Path, bool], pd.DataFrame]
PREPARERS: dict[str, Preparer] = {}


def register_dataset(name: str) -> Callable[[Preparer], Preparer]:
    def add(preparer: Preparer) -> Preparer:
        PREPARERS[name] = preparer
        return preparer

    return add


def scan_class_folders(root: Path) -> pd.DataFrame:
    """One row per image file under `root/<class>/`; other files are left out deliberately."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of class sub-folders.")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not images:
            raise DatasetError(
                f"class folder {class_dir} has no images ({', '.join(sorted(IMAGE_SUFFIXES))}): "
                "add images or remove the folder."
            )
        rows += [(str(p), class_dir.name) for p in images]
    if not rows:
        raise DatasetError(f"{root} has no class sub-folders with images.")
    return pd.DataFrame(rows, columns=["path", "label"])


HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
# tree_digest() of the official archive's hymenoptera_data/ folder (398 files).
HYMENOPTERA_SHA256 = "4d9516c2fb161c30f41a394c6690b6c88f5c14ffbacac3cef9ddb3412df91248"


@register_dataset("hymenoptera")
def prepare_hymenoptera(data_root: Path, download: bool) -> pd.DataFrame:
    """Official train/ gives train and val; official val/ is the held-out test split."""
    folder = data_root / "hymenoptera_data"
    layout = [folder / split / cls for split in ("train", "val") for cls in ("ants", "bees")]
    if not all(p.is_dir() for p in layout):
        fix = (
            f"Download {HYMENOPTERA_URL} and unzip it into {data_root} so that "
            f"{folder}/train/ants exists, or point paths.data_root (or BENCHMARK_DATA_ROOT) "
            "at the folder that holds hymenoptera_data/."
        )
        if not download:
            raise DatasetError(f"Hymenoptera not found at {folder}. {fix}")
        _download_into(HYMENOPTERA_URL, data_root, "hymenoptera_data", HYMENOPTERA_SHA256, fix)
    train = scan_class_folders(folder / "train").assign(split="train")
    test = scan_class_folders(folder / "val").assign(split="test")
    return pd.concat([train, test], ignore_index=True)


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and content: checks what was extracted."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _download_into(url: str, data_root: Path, name: str, sha256: str, fix: str) -> None:
    """Extract to a temporary folder, verify, then move into place: never a half-extracted tree."""
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f".{name}-") as tmp:
        try:
            download_and_extract_archive(url, download_root=tmp, remove_finished=True)
        except Exception as error:  # network, HTTP or archive errors all end the same way
            raise DatasetError(f"Could not download {url} ({error}). {fix}") from error
        if tree_digest(Path(tmp) / name) != sha256:
            raise DatasetError(f"{url} did not unpack to the expected files (checksum). {fix}")
        shutil.rmtree(data_root / name, ignore_errors=True)
        shutil.move(Path(tmp) / name, data_root / name)


def carve_validation(manifest: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """Move a stratified, seeded share of each class's training rows into the `val` split."""
    train = manifest[manifest.split == "train"]
    counts = train.label.value_counts()
    too_small = counts[(counts * fraction).round() < 1]
    if fraction > 0 and len(too_small):
        raise DatasetError(
            f"classes {list(too_small.index)} have too few training images for a validation "
            f"share of {fraction}: add images or raise dataset.val_fraction."
        )
    val = train.groupby("label").sample(frac=fraction, random_state=seed).index
    return manifest.assign(split=manifest.split.where(~manifest.index.isin(val), "val"))


def build_manifest(
    name: str, data_root: Path, val_fraction: float, seed: int, download: bool = True
) -> pd.DataFrame:
    if name not in PREPARERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(sorted(PREPARERS))}.")
    manifest = PREPARERS[name](data_root.expanduser().resolve(), download)
    return carve_validation(manifest, val_fraction, seed)


# ---------------------------------------------------------------- images to tensors


def load_rgb(path: str) -> Image.Image:
    """Any image mode (palette, CMYK, grayscale, alpha) becomes upright RGB."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def build_transform(preprocess: Preprocess, grayscale: bool, train: bool) -> T.Compose:
    """Augmentation (train only), then the backbone's own resize and normalisation."""
    interpolation = InterpolationMode(preprocess.interpolation)
    size = preprocess.input_size
    colour = [T.Grayscale(num_output_channels=3)] if grayscale else []
    if train:
        geometry = [
            T.RandomResizedCrop(size, interpolation=interpolation),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            T.Resize(int(size / preprocess.crop_pct), interpolation=interpolation),
            T.CenterCrop(size),
        ]
    to_tensor = [T.ToImage(), T.ToDtype(torch.float32, scale=True)]
    return T.Compose([*colour, *geometry, *to_tensor, T.Normalize(preprocess.mean, preprocess.std)])


class ImageDataset(Dataset):
    def __init__(self, paths: list[str], targets: list[int], transform: T.Compose) -> None:
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_rgb(self.paths[index])), self.targets[index]


class ManifestDataModule(L.LightningDataModule):
    """Loaders for the three splits of a manifest, preprocessed for one backbone."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        preprocess: Preprocess,
        grayscale: bool,
        batch_size: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        self.manifest = manifest
        self.classes = sorted(manifest.label.unique())
        self.preprocess, self.grayscale = preprocess, grayscale
        self.batch_size, self.num_workers = batch_size, num_workers

    def split(self, name: str) -> ImageDataset:
        rows = self.manifest[self.manifest.split == name]
        index = {label: i for i, label in enumerate(self.classes)}
        transform = build_transform(self.preprocess, self.grayscale, train=name == "train")
        return ImageDataset(rows.path.tolist(), rows.label.map(index).tolist(), transform)

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(
            self.split(name),
            batch_size=self.batch_size,
            shuffle=name == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
