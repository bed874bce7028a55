"""Frozen backbone => compute its features once.

Under a strategy that trains no backbone parameter and keeps BatchNorm in eval mode, the backbone
is a fixed function: its features for an image never change. They are extracted once per (image
files, colour, backbone weights, geometry, precision), saved under `paths.cache_dir/features`,
and every epoch of every seed trains the head on them. With augmentation on, the training split's
features are those of `speed.augmented_views` augmented views per image (drawn with the run's
seed, one picked at random per sample and epoch); with 0 views such a cell trains from images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import lightning as L
import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from benchmark.data.cache import clear_partials, file_fingerprint, files_key, reusable
from benchmark.data.loading import ManifestDataModule, Normalize, SplitLoaders
from benchmark.runtime.files import read_json, write_aside, write_text_aside

log = logging.getLogger("benchmark")


def weights_digest(model: nn.Module) -> str:
    """The backbone's identity is its weights, wherever they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


class FeatureExtractor(L.LightningModule):
    """The backbone in eval mode as a predict loop: Lightning places it on the device, applies
    the precision and shows progress."""

    def __init__(self, backbone: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.backbone, self.normalize = backbone, normalize

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return self.backbone(self.normalize(batch[0])).float().cpu()


@dataclass
class FeatureSet:
    """Features of each split, and for `train` possibly several augmented views (V, N, D)."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    targets: dict[str, torch.Tensor]
    build_s: float  # seconds spent extracting in this run (0 when all came from the cache)
    shift: torch.Tensor | None = None  # the second test split's (dataset.shift_test), if any

    @property
    def num_features(self) -> int:
        return self.val.shape[-1]


def extract(
    data: ManifestDataModule,
    trainer: L.Trainer,
    backbone: nn.Module,
    rows: list[str],
    augment: bool,
) -> torch.Tensor:
    frame = data.manifest.set_index("path").loc[rows].reset_index()
    loader = DataLoader(
        data.dataset(frame, augment),
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    backbone.eval()
    batches = trainer.predict(FeatureExtractor(backbone, data.normalize), loader)
    if batches is None:  # Lightning returns None only with return_predictions=False
        raise RuntimeError("Feature extraction: the Trainer's predict loop returned no features.")
    return torch.cat(cast(list[torch.Tensor], batches))  # one loader: a tensor per batch


def _cached(
    file: Path, compute: Callable[[], torch.Tensor], inputs: dict[str, object]
) -> tuple[torch.Tensor, float]:
    """The array in `file`, computed and saved first if missing, damaged, unloadable or built
    from other `inputs` (its size, SHA-256 and inputs are recorded beside it when complete);
    concurrent cells wait."""
    with FileLock(str(file) + ".lock"):
        if reusable(file, "Feature cache") and (array := _load(file, inputs)) is not None:
            return torch.from_numpy(array), 0.0
        start = time.perf_counter()
        array = compute().numpy()
        # Written aside in a new file (never through a planted link), then renamed into place.
        clear_partials(file)
        write_aside(file, lambda handle: np.save(handle, array))
        # Written last: the done-marker, naming what the features were computed from.
        marker = {**file_fingerprint(file), "inputs": inputs}
        write_text_aside(file.with_suffix(".json"), json.dumps(marker, default=str))
        return torch.from_numpy(array), time.perf_counter() - start


def _load(file: Path, inputs: dict[str, object]) -> np.ndarray | None:
    """The intact cache file's features, or None (said in a warning) if it was built from
    other inputs (or by a version that did not record them) or is not a float array."""
    recorded = (read_json(file.with_suffix(".json")) or {}).get("inputs")
    expected = json.loads(json.dumps(inputs, default=str))  # tuples as JSON lists
    if recorded != expected:
        differ = sorted(k for k in expected if (recorded or {}).get(k) != expected[k])
        log.warning(
            "Feature cache %s was built from other inputs (%s): rebuilding it.",
            file,
            ", ".join(differ) if recorded else "not recorded",
        )
        return None
    try:
        array = np.load(file)  # allow_pickle=False: an object array is refused, not run
    except (ValueError, OSError, EOFError) as error:
        log.warning("Feature cache %s cannot be loaded (%s): rebuilding it.", file, error)
        return None
    if array.dtype.kind != "f":
        log.warning("Feature cache %s holds %s, not features: rebuilding it.", file, array.dtype)
        return None
    return array


def images_digest(frame: pd.DataFrame) -> str:
    """The image set by content: each path with its bytes' SHA-256 (from the manifest; a frame
    without digests: each path's size and modification time)."""
    if "sha256" not in frame:
        return files_key(frame.path.tolist())
    rows = frame.sort_values("path")[["path", "sha256"]].itertuples(index=False)
    return hashlib.sha256("".join(f"{p}\0{d}\n" for p, d in rows).encode()).hexdigest()[:24]


def feature_set(
    data: ManifestDataModule,
    backbone: nn.Module,
    trainer: L.Trainer,
    cache_dir: Path,
    identity: dict[str, object],
    views: int,
    seed: int,
) -> FeatureSet:
    """Features for the three splits, from the cache where they are already there. `identity`
    names what else decides them (colour, precision...)."""
    folder = cache_dir / "features"
    folder.mkdir(parents=True, exist_ok=True)
    frame = data.manifest
    paths = sorted(frame.path)
    weights = weights_digest(backbone)
    key = files_key(paths, json.dumps(identity, sort_keys=True), weights)
    inputs: dict[str, object] = {
        "backbone": weights,
        "images": images_digest(frame),
        "transform": identity,
    }
    plain, build_s = _cached(
        folder / f"{key}.npy",
        lambda: extract(data, trainer, backbone, paths, augment=False),
        inputs,
    )
    row = {path: i for i, path in enumerate(paths)}
    named = ("train", "val", "test", *(["shift"] if (frame.split == "shift").any() else []))
    split = {s: frame[frame.split == s].path.tolist() for s in named}
    by_split = {s: plain[[row[p] for p in split[s]]] for s in split}
    train = by_split["train"].unsqueeze(0)
    if data.augmentation and views:
        # Views are drawn with the run's seed, from its training split, by its augmentation.
        drawn = [key, views, seed, split["train"], [repr(t) for t in data.augmentation]]
        train_key = hashlib.sha256(json.dumps(drawn).encode()).hexdigest()[:24]

        def draw() -> torch.Tensor:
            L.seed_everything(seed, workers=True, verbose=False)
            return torch.stack(
                [extract(data, trainer, backbone, split["train"], True) for _ in range(views)]
            )

        augmented = {
            **inputs,
            "views": drawn[1:3],
            "train": images_digest(frame.loc[frame.split == "train"]),
            "augmentation": drawn[4],
        }
        train, views_s = _cached(folder / f"{train_key}.views.npy", draw, augmented)
        build_s += views_s
    targets = {s: torch.tensor(data.split(s).targets) for s in split}
    shift = by_split.get("shift")
    return FeatureSet(train, by_split["val"], by_split["test"], targets, build_s, shift)


class RandomView(Dataset):
    """One of V feature views per sample, drawn anew each time it is read (with a generator of
    its own: the shuffling draws the same numbers as on images)."""

    def __init__(self, views: torch.Tensor, targets: torch.Tensor, seed: int) -> None:
        self.views, self.targets = views, targets
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.views.shape[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.views.shape[0]
        view = int(torch.randint(count, (), generator=self.generator)) if count > 1 else 0
        return self.views[view, index], self.targets[index]


class FeatureDataModule(SplitLoaders):
    """The head's training data: cached features instead of images."""

    def __init__(
        self, features: FeatureSet, classes: list[str], batch_size: int, seed: int
    ) -> None:
        super().__init__()
        self.features, self.classes, self.batch_size = features, classes, batch_size
        self.seed = seed
        self.views: RandomView | None = None  # the training loader's, once built
        self._views_state: torch.Tensor | None = None  # to restore when it is built

    def view_state(self) -> torch.Tensor | None:
        """The training views' generator state (None before the training loader is built): a
        fit resumed from a checkpoint that kept it draws the views the uninterrupted fit draws."""
        return None if self.views is None else self.views.generator.get_state()

    def restore_view_state(self, state: torch.Tensor) -> None:
        """The training views' generator as `view_state` said it, from when the training loader
        is next built (a resumed fit restores its state before it builds its loaders)."""
        self._views_state = state

    def _loader(self, split: str) -> DataLoader:
        targets = self.features.targets[split]
        if split == "train":
            views = self.views = RandomView(self.features.train, targets, self.seed)
            if self._views_state is not None:
                views.generator.set_state(self._views_state)
                self._views_state = None
            dataset: Dataset = views
        else:
            features = getattr(self.features, split)
            if features is None:
                raise ValueError(f"the cached features have no {split} split")
            dataset = TensorDataset(features, targets)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=split == "train",
            pin_memory=torch.cuda.is_available(),
        )
