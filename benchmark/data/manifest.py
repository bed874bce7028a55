"""The split manifest: one row per image (path, label, split), the single source of truth for
every run. Its hash is a run param and the file a run artifact, so a number can always be traced
to its images.

Splits: a dataset's official test split when it has one; otherwise a stratified test split fixed
by `dataset.split_seed` (the same for every seed and cell, so cells compare on the same images),
or the study's "last 20% of each class's sorted file names" (`dataset.test_split=sorted`).
Validation is then carved from train with the run's `seed`, for checkpoint selection only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from benchmark.config.schema import DatasetConfig
from benchmark.data.scan import VERDICTS_FILE, DatasetError, remembered_verdicts
from benchmark.data.sources import PREPARERS


def _relative_to(root: Path) -> Callable[[str], str]:
    """Paths under the dataset's root are stored relative to it, so the manifest (and its hash)
    is the same on every machine; others (a CSV may list any file) stay absolute."""

    def relative(path: str) -> str:
        p = Path(path)
        return (p.relative_to(root) if p.is_relative_to(root) else p).as_posix()

    return relative


@dataclass
class Manifest:
    frame: pd.DataFrame  # path (absolute), label, split, sha256 (of the file's bytes)
    skipped: pd.DataFrame  # path, reason
    root: Path  # manifest paths are stored relative to it
    # Where the test split came from: the dataset's own (`official`: Hymenoptera's val/, Kaggle's
    # Simpsons test set...) or `carved` from its images by dataset.test_split. A run param.
    test_split: str = "carved"

    def relative_frame(self) -> pd.DataFrame:
        """The rows with paths relative to the dataset's root (as in the manifest file)."""
        return self.frame.assign(path=self.frame.path.map(_relative_to(self.root)))

    @cached_property
    def csv(self) -> str:
        """path, label, split and each file's content SHA-256: the hash of this text changes
        when any image is added, removed, moved between splits or edited."""
        return self.relative_frame().to_csv(index=False)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.csv.encode()).hexdigest()

    @property
    def classes(self) -> list[str]:
        return sorted(self.frame.label.unique())

    def counts(self) -> pd.DataFrame:
        """Images per class and split, as the study printed them."""
        table = pd.crosstab(self.frame.label, self.frame.split, margins=True, margins_name="all")
        return table[[c for c in ("train", "val", "test", "all") if c in table]]


def _stratified(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> pd.Index:
    counts = frame.label.value_counts()
    too_small = counts[(counts * fraction).round() < 1]
    if fraction > 0 and len(too_small):
        sizes = ", ".join(f"{label}: {int(n)}" for label, n in sorted(too_small.items()))
        raise DatasetError(
            f"classes {sorted(too_small.index)} have too few images ({sizes}) for a "
            f"{what} share of {fraction}: add images, drop the class (dataset.classes), or change "
            f"dataset.{what}_fraction."
        )
    return frame.groupby("label").sample(frac=fraction, random_state=seed).index


def _last_sorted(frame: pd.DataFrame, fraction: float) -> pd.Index:
    """The study's split: the last share of each class's file names in sorted order."""

    def tail(group: pd.DataFrame) -> pd.Index:
        names = group.path.map(lambda p: Path(p).name).sort_values()
        return names.index[len(names) - math.ceil(len(names) * fraction) :]

    return pd.Index([i for _, group in frame.groupby("label") for i in tail(group)])


def assign_splits(images: pd.DataFrame, cfg: DatasetConfig, seed: int) -> pd.DataFrame:
    frame = images.reset_index(drop=True)
    if "split" not in frame:
        frame["split"] = "train"
    if not (frame.split == "test").any():
        if cfg.test_split == "sorted":
            test = _last_sorted(frame, cfg.test_fraction)
        else:
            test = _stratified(frame, cfg.test_fraction, cfg.split_seed, "test")
        frame.loc[test, "split"] = "test"
    if not (frame.split == "val").any() and cfg.val_fraction > 0:
        train = frame[frame.split == "train"]
        frame.loc[_stratified(train, cfg.val_fraction, seed, "val"), "split"] = "val"
    return frame[["path", "label", "split", "sha256"]]


SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}  # where a duplicated image is kept


def one_split_per_content(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exact duplicates (same bytes) never sit in two splits: each image's copies stay in the
    most protected split holding one (test, then val, then train); the others are left out with
    the reason, so no test image is also trained on."""
    splits = frame.groupby("sha256").split.transform(
        lambda s: min(s, key=SPLIT_PRIORITY.__getitem__)
    )
    moved = frame.split != splits
    kept = frame[~moved].drop_duplicates("sha256").set_index("sha256")
    reasons = [
        f"same content as {kept.path[digest]} ({kept.split[digest]} split)"
        for digest in frame.sha256[moved]
    ]
    skipped = pd.DataFrame({"path": frame.path[moved], "reason": reasons})
    return frame[~moved].reset_index(drop=True), skipped


def build_manifest(
    cfg: DatasetConfig, data_root: Path, seed: int, cache_dir: Path | None = None
) -> Manifest:
    """Prepare the dataset (decoding each file once, remembered in `cache_dir`) and split it."""
    if cfg.name not in PREPARERS:
        raise DatasetError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(PREPARERS))}.")
    verdicts = cache_dir / VERDICTS_FILE if cache_dir else None
    with remembered_verdicts(verdicts):
        source = PREPARERS[cfg.name](cfg, data_root.expanduser().resolve())
    classes = source.scan.images.label.nunique()
    if classes < 2:
        raise DatasetError(
            f"{cfg.name} has {classes} class with usable images under {source.root}: a "
            "classifier needs at least 2 (add a class folder, or check dataset.classes)."
        )
    images = source.scan.images
    official = "split" in images and bool((images.split == "test").any())
    frame, duplicated = one_split_per_content(assign_splits(images, cfg, seed))
    manifest = Manifest(
        frame,
        pd.concat([source.scan.skipped, duplicated], ignore_index=True),
        source.root,
        "official" if official else "carved",
    )
    if cache_dir is not None:
        saved = cache_dir / "manifests" / f"{cfg.name}-{manifest.sha256[:12]}.csv"
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(manifest.csv)
    return manifest
