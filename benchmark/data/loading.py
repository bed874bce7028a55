"""From manifest rows to the tensors a backbone expects: decoding any image mode to upright RGB,
optional grayscale, augmentation for training, then the backbone's own resize and normalisation."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING

import hydra
import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from benchmark.data.images import Preprocess, load_rgb

if TYPE_CHECKING:
    from benchmark.data.cache import ImageCache


def build_augmentation(specs: list, preprocess: Preprocess) -> list[Callable]:
    """Instantiate the `augment.transforms` list. Entries marked `_partial_: true` are completed
    with the backbone's `size` (and `interpolation`, where they take one), so a policy such as
    random-resized-crop fits every backbone without naming its resolution."""
    given = {
        "size": preprocess.input_size,
        "interpolation": InterpolationMode(preprocess.interpolation),
    }
    transforms = []
    for transform in hydra.utils.instantiate(list(specs), _convert_="all"):
        if isinstance(transform, functools.partial):
            accepts = inspect.signature(transform.func).parameters
            transform = transform(**{k: v for k, v in given.items() if k in accepts})
        transforms.append(transform)
    return transforms


def build_transform(
    preprocess: Preprocess,
    grayscale: bool,
    augmentation: list[Callable] | None = None,
    normalize: bool = True,
) -> T.Compose:
    """Grayscale, then the augmentation (training only), then always
    last the backbone's own resize, crop and normalisation. Takes a PIL image or a uint8 tensor
    (the image cache); `normalize=False` stops at uint8, for `Normalize` on the device."""
    interpolation = InterpolationMode(preprocess.interpolation)
    size = preprocess.input_size
    colour = [T.Grayscale(num_output_channels=3)] if grayscale else []
    # Evaluation, and training without augmentation: the backbone's centre crop (so a frozen
    # backbone's training features are its evaluation features). Augmented training: shorter
    # side to `size`, which is a no-op after a random-resized crop.
    resize = size if augmentation else int(size / preprocess.crop_pct)
    geometry = [T.Resize(resize, interpolation=interpolation), T.CenterCrop(size)]
    steps = [*colour, *(augmentation or []), *geometry, T.ToImage()]
    if normalize:
        steps += [
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    return T.Compose(steps)


class Normalize(torch.nn.Module):
    """uint8 batches to the backbone's normalised floats, on whatever device they are: a GPU
    receives a quarter of the bytes and does the arithmetic itself."""

    mean: torch.Tensor  # buffers (register_buffer), in 0..255
    std: torch.Tensor

    def __init__(self, preprocess: Preprocess, channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1) * 255)
        self.channels_last = channels_last

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        images = (images.float() - mean) / std
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
        )


class ImageDataset(Dataset):
    """Images from their files, or from the decoded image cache when one is given."""

    def __init__(
        self,
        paths: list[str],
        targets: list[int],
        transform: T.Compose,
        cache: ImageCache | None = None,
    ) -> None:
        self.paths, self.targets, self.transform, self.cache = paths, targets, transform, cache

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        image = self.cache[path] if self.cache is not None else load_rgb(path)
        return self.transform(image), self.targets[index]


class SplitLoaders(L.LightningDataModule):
    """Lightning's three loader hooks, each the `_loader` of its split; the test hook's split is
    `test_split` (`shift`: the second test, dataset.shift_test)."""

    test_split = "test"

    def _loader(self, split: str) -> DataLoader:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_split)


class ManifestDataModule(SplitLoaders):
    """Loaders for the three splits of a manifest, preprocessed for one backbone.

    Workers yield uint8 images (decoded from the files, or read from an `ImageCache`); they are
    normalised after the transfer to the training device (`on_after_batch_transfer`)."""

    def __init__(
        self,
        manifest: pd.DataFrame,
        preprocess: Preprocess,
        grayscale: bool,
        batch_size: int,
        num_workers: int,
        augmentation: list[Callable] | None = None,
        cache: ImageCache | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.manifest = manifest
        self.classes = sorted(manifest.label.unique())
        self.preprocess, self.grayscale = preprocess, grayscale
        self.augmentation = augmentation or []
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache = cache
        self.normalize = Normalize(preprocess, channels_last)

    def split(self, name: str) -> ImageDataset:
        """One split, with the training augmentation for `train`."""
        return self.dataset(self.manifest[self.manifest.split == name], augment=name == "train")

    def dataset(self, rows: pd.DataFrame, augment: bool) -> ImageDataset:
        augmentation = self.augmentation if augment else None
        transform = build_transform(self.preprocess, self.grayscale, augmentation, normalize=False)
        index = {label: i for i, label in enumerate(self.classes)}
        targets = rows.label.map(index).tolist()
        return ImageDataset(rows.path.tolist(), targets, transform, self.cache)

    def on_after_batch_transfer(
        self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch
        return self.normalize(images), targets

    def _loader(self, name: str) -> DataLoader:
        return DataLoader(
            self.split(name),
            batch_size=self.batch_size,
            shuffle=name == "train",
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
