"""The split manifest: one row per image (path, label, split), the single source of truth for
every run. Its hash is a run param and the file a run artifact, so a number can always be traced
to its images.

Splits: a dataset's official test split when it has one; otherwise a stratified test split fixed
by `dataset.split_seed` (the same for every seed and cell, so cells compare on the same images),
or the study's "last 20% of each class's sorted file names" (`dataset.test_split=sorted`).
Validation is then carved from train with the run's `seed`, for checkpoint selection only.

Near-duplicates (consecutive frames of one scene, a re-encoded or resized copy) never straddle two
splits: images whose perceptual hashes differ in at most `dataset.near_duplicate_bits` of 256 bits
(and byte-identical files) form one group, recorded in the manifest's `group` column; carved splits
take whole groups, and a training or validation image grouped with an image of an official, more
protected split (test, then val) is left out with the reason.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.config.schema import DatasetConfig
from benchmark.data.scan import (
    HASH_BITS,
    VERDICTS_FILE,
    DatasetError,
    cache_folder,
    remembered_verdicts,
)
from benchmark.data.sources import PREPARERS
from benchmark.runtime.files import make_folder, write_text_aside

# dataset.near_duplicate_bits=null: perceptual hashes at most this many of HASH_BITS apart are
# one group (Kaggle's downscaled Simpsons test images are within 16 of their training frames).
NEAR_DUPLICATE_BITS = 21

log = logging.getLogger("benchmark")


def _relative_to(root: Path) -> Callable[[str], str]:
    """Paths under the dataset's root are stored relative to it, so the manifest (and its hash)
    is the same on every machine; others (a CSV may list any file) stay absolute."""

    def relative(path: str) -> str:
        p = Path(path)
        return (p.relative_to(root) if p.is_relative_to(root) else p).as_posix()

    return relative


@dataclass
class Manifest:
    # path (absolute), label, split, sha256 (of the file's bytes), group (of near-duplicates: the
    # smallest path in it, relative to root; an image without near-duplicates is its own group)
    frame: pd.DataFrame
    skipped: pd.DataFrame  # path, reason
    root: Path  # manifest paths are stored relative to it
    # Where the test split came from: the dataset's own (`official`: Hymenoptera's val/, Kaggle's
    # Simpsons test set...) or `carved` from its images by dataset.test_split. A run param.
    test_split: str = "carved"
    # Groups of more than one image (near-duplicates or copies) among the dataset's usable images.
    merged_groups: int = 0
    # Images left out as near-duplicates of a more protected split's: training or validation images
    # whose group holds an image of an official split that ranks higher (test, then val), and shift
    # images copying a native one. They are in `skipped`, with the image named.
    removed_across_splits: int = 0

    def relative_frame(self) -> pd.DataFrame:
        """The rows with paths relative to the dataset's root (as in the manifest file)."""
        return self.frame.assign(path=self.frame.path.map(_relative_to(self.root)))

    @cached_property
    def csv(self) -> str:
        """path, label, split, each file's content SHA-256 and its group: the hash of this text
        changes when any image is added, removed, moved between splits, edited or regrouped."""
        return self.relative_frame().to_csv(index=False)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.csv.encode()).hexdigest()

    @cached_property
    def content_sha256(self) -> str:
        """The dataset by content, whatever its splits: each image's path (relative to the
        root), label and bytes' SHA-256. The same for every seed (the validation split, carved
        with the run's seed, is left out of it), unlike `sha256`: what tells two datasets apart
        in the report when their folders have one name."""
        rows = self.relative_frame().sort_values("path")[["path", "label", "sha256"]]
        return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()

    @property
    def classes(self) -> list[str]:
        return sorted(self.frame.label.unique())

    def counts(self) -> pd.DataFrame:
        """Images per class and split, as the study printed them."""
        table = pd.crosstab(self.frame.label, self.frame.split, margins=True, margins_name="all")
        return table[[c for c in ("train", "val", "test", SHIFT, "all") if c in table]]


def _stratified(frame: pd.DataFrame, fraction: float, seed: int, what: str) -> pd.Index:
    """A share of each class, drawn as whole groups: each group counts for the class most of its
    images have (a tie: the first in sorted order); in an order shuffled by `seed`, groups are
    taken until the class has its share, so a group of any size is drawn about as often as a
    single image. Without near-duplicates that is exactly the rounded share of each class; with
    them, at most the largest group's size less one more.
    (scikit-learn's group splitters do not fit: StratifiedGroupKFold gives only shares of 1/k,
    GroupShuffleSplit does not stratify and counts groups, not images.)"""
    counts = frame.label.value_counts()
    too_small = counts[(counts * fraction).round() < 1]
    if fraction > 0 and len(too_small):
        sizes = ", ".join(f"{label}: {int(n)}" for label, n in sorted(too_small.items()))
        raise DatasetError(
            f"classes {sorted(too_small.index)} have too few images ({sizes}) for a "
            f"{what} share of {fraction}: add images, drop the class (dataset.classes), or change "
            f"dataset.{what}_fraction."
        )
    votes = frame.groupby(["group", "label"]).size().rename("n").reset_index()
    votes = votes.sort_values(["group", "n", "label"], ascending=[True, False, True])
    groups = votes.drop_duplicates("group").set_index("group")[["label"]]
    groups["size"] = frame.groupby("group").size()
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for _, members in groups.groupby("label", sort=True):  # groups sorted by id
        target, taken = round(members["size"].sum() * fraction), 0
        for group, size in members["size"].iloc[rng.permutation(len(members))].items():
            if taken >= target:
                break
            chosen.append(str(group))
            taken += size
    return frame.index[frame.group.isin(chosen)]


def _last_sorted(frame: pd.DataFrame, fraction: float) -> pd.Index:
    """The study's split: the last share of each class's file names in sorted order; a group of
    near-duplicates goes where most of its images fall (a tie: test)."""

    def tail(group: pd.DataFrame) -> pd.Index:
        names = group.path.map(lambda p: Path(p).name).sort_values()
        return names.index[len(names) - math.ceil(len(names) * fraction) :]

    last = frame.index.isin([i for _, group in frame.groupby("label") for i in tail(group)])
    share = pd.Series(last, index=frame.index).groupby(frame.group).transform("mean")
    return frame.index[share >= 0.5]


def assign_splits(images: pd.DataFrame, cfg: DatasetConfig, seed: int) -> pd.DataFrame:
    """Carve the splits the images do not have yet (test, then val), each of whole groups
    (`group`; without it, each distinct content is one). Official splits are taken as they are:
    `one_split_per_group` first leaves out what straddles them."""
    frame = images.reset_index(drop=True)
    if "split" not in frame:
        frame["split"] = "train"
    if "group" not in frame:
        frame["group"] = frame.sha256
    if not (frame.split == "test").any():
        if cfg.test_split == "sorted":
            test = _last_sorted(frame, cfg.test_fraction)
        else:
            test = _stratified(frame, cfg.test_fraction, cfg.split_seed, "test")
        frame.loc[test, "split"] = "test"
    if not (frame.split == "val").any() and cfg.val_fraction > 0:
        train = frame[frame.split == "train"]
        frame.loc[_stratified(train, cfg.val_fraction, seed, "val"), "split"] = "val"
    return frame[["path", "label", "split", "sha256", "group"]]


SPLIT_PRIORITY = {"test": 0, "val": 1, "train": 2}  # where a duplicated image is kept
SHIFT = "shift"  # a second test split, scored by the same model (dataset.shift_test)


def _popcount(words: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # NumPy 2
        return np.bitwise_count(words)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[words.view(np.uint8)].reshape(*words.shape, -1).sum(-1, dtype=np.uint8)


def hash_words(hashes: pd.Series) -> np.ndarray:
    """Hex perceptual hashes (all of HASH_BITS) as rows of 64-bit words."""
    words = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint64)
    return words.reshape(len(hashes), HASH_BITS // 64)


def hash_distances(words: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Bits that differ between each row of `words` and each of `other` (len(words), len(other))."""
    return _popcount(words[:, None, :] ^ other[None, :, :]).sum(-1, dtype=np.int32)


def near_pairs(words: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) of hashes at most `bits` apart. Every pair is compared on the first
    64 bits, in blocks of rows that keep the working memory near 64 MB; the few within `bits`
    there (about 1 in 300 of unrelated images) on all of them. 30,000 images take a few seconds."""
    n = len(words)
    block = max(1, (1 << 23) // max(1, n))
    rows, cols = [np.zeros(0, dtype=np.intp)], [np.zeros(0, dtype=np.intp)]
    for start in range(0, n, block):
        head, rest = words[start : start + block], words[start:]
        first = _popcount(np.bitwise_xor.outer(head[:, 0], rest[:, 0]))
        i, j = np.nonzero(first <= bits)
        upper = j > i
        i, j = i[upper], j[upper]
        distance = first[i, j] + _popcount(head[i, 1:] ^ rest[j, 1:]).sum(-1, dtype=np.int32)
        close = distance <= bits
        rows.append(i[close] + start)
        cols.append(j[close] + start)
    return np.concatenate(rows), np.concatenate(cols)


def near_duplicate_groups(images: pd.DataFrame, bits: int | None) -> np.ndarray:
    """A group number per row: rows with the same bytes (`sha256`) or, unless `bits` is None,
    perceptual hashes (`dhash`) at most `bits` apart are in one group, and so, transitively,
    are their near-duplicates (connected components)."""
    from scipy.sparse import coo_matrix  # imported when a manifest is built, not with the package
    from scipy.sparse.csgraph import connected_components

    n = len(images)
    same = pd.Series(pd.factorize(images.sha256)[0])
    rows, cols = [np.arange(n)], [same.groupby(same).transform("min").to_numpy()]
    if bits is not None and "dhash" in images:
        hashed = np.flatnonzero(images.dhash.notna().to_numpy())
        i, j = near_pairs(hash_words(images.dhash.iloc[hashed]), bits)
        rows.append(hashed[i])
        cols.append(hashed[j])
    edges = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(edges[0]), dtype=np.int8), edges), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _straddle_reason(row: Any, kept: pd.DataFrame) -> str:
    """Why `row` is left out: the image of its group in the protected split it is closest to."""
    same = kept[kept.sha256 == row.sha256]
    if len(same):
        return f"same content as {same.path.iloc[0]} ({same.split.iloc[0]} split)"
    hashed = kept[kept.dhash.notna()] if isinstance(row.dhash, str) else kept.iloc[:0]
    if not len(hashed):
        return f"near-duplicate group of {kept.path.iloc[0]} ({kept.split.iloc[0]} split)"
    distances = hash_distances(hash_words(pd.Series([row.dhash])), hash_words(hashed.dhash))[0]
    closest = int(np.argmin(distances))
    return (
        f"near-duplicate of {hashed.path.iloc[closest]} ({hashed.split.iloc[closest]} split; "
        f"perceptual hashes {distances[closest]} of {HASH_BITS} bits apart)"
    )


def one_split_per_group(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A group (copies and near-duplicates) never sits in two splits: where official splits
    differ within a group, its images stay in the most protected split holding one (test, then
    val, then train); the others are left out with the reason naming that split's image, so no
    test image is also trained on."""
    if "dhash" not in frame:
        frame = frame.assign(dhash=None)
    rank = frame.split.map(SPLIT_PRIORITY)
    moved = rank != rank.groupby(frame.group).transform("min")
    if not moved.any():
        return frame, pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})
    protected = frame[frame.group.isin(frame.group[moved]) & ~moved].sort_values("path")
    by_group = dict(list(protected.groupby("group")))
    reasons = [_straddle_reason(row, by_group[row.group]) for row in frame[moved].itertuples()]
    skipped = pd.DataFrame({"path": frame.path[moved], "reason": reasons})
    return frame[~moved].reset_index(drop=True), skipped.reset_index(drop=True)


def apart_from(
    shift: pd.DataFrame, native: pd.DataFrame, bits: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The shift split's images less those that copy a native image (the same bytes, or
    perceptual hashes at most `bits` apart), which are left out with the image named. Each is
    compared with the native images directly: shift images are never trained on, so chains
    through their own near-duplicates (small downscaled frames of different characters come
    close) group nothing."""
    if shift.empty:
        return shift, pd.DataFrame({"path": pd.Series(dtype=str), "reason": pd.Series(dtype=str)})
    hashed = native[native.dhash.notna()] if "dhash" in native else native.iloc[:0]
    near = np.zeros(len(shift), dtype=bool)
    if len(hashed) and "dhash" in shift:
        has = shift.dhash.notna().to_numpy()
        distances = hash_distances(hash_words(shift.dhash[has]), hash_words(hashed.dhash))
        near[has] = distances.min(1) <= bits
    leaked = near | shift.sha256.isin(set(native.sha256)).to_numpy()
    reasons = [_straddle_reason(row, native) for row in shift[leaked].itertuples()]
    skipped = pd.DataFrame({"path": shift.path[leaked], "reason": reasons})
    return shift[~leaked], skipped.reset_index(drop=True)


def build_manifest(
    cfg: DatasetConfig, data_root: Path, seed: int, cache_dir: Path | None = None
) -> Manifest:
    """Prepare the dataset (decoding each file once, remembered in `cache_dir`) and split it."""
    if cfg.name not in PREPARERS:
        raise DatasetError(f"unknown dataset {cfg.name!r}; known: {', '.join(sorted(PREPARERS))}.")
    bits = NEAR_DUPLICATE_BITS if cfg.near_duplicate_bits is None else cfg.near_duplicate_bits
    if not 0 <= bits < HASH_BITS:
        raise DatasetError(
            f"dataset.near_duplicate_bits={bits}: it must be in [0, {HASH_BITS}) (bits of the "
            f"perceptual hash), or null for the default {NEAR_DUPLICATE_BITS}."
        )
    verdicts = cache_dir / VERDICTS_FILE if cache_dir else None
    with cache_folder(cache_dir), remembered_verdicts(verdicts):
        source = PREPARERS[cfg.name](cfg, data_root.expanduser().resolve())
    classes = source.scan.images.label.nunique()
    if classes < 2:
        raise DatasetError(
            f"{cfg.name} has {classes} class with usable images under {source.root}: a "
            "classifier needs at least 2 (add a class folder, or check dataset.classes)."
        )
    images = source.scan.images.reset_index(drop=True)
    if "split" not in images:
        images["split"] = "train"
    # The shift split is set apart first: the native splits are what they would be without it.
    shifted = images.split == SHIFT
    images, shift = images[~shifted].reset_index(drop=True), images[shifted]
    official = bool((images.split == "test").any())
    # A group is named by its smallest path as stored (relative): the same on every machine.
    relative = _relative_to(source.root)
    stored = images.path.map(relative)
    images["group"] = stored.groupby(near_duplicate_groups(images, bits)).transform("min")
    merged = int((images.group.value_counts() > 1).sum())
    kept, straddling = one_split_per_group(images)
    shift, leaked = apart_from(shift.assign(group=shift.path.map(relative)), images, bits)
    manifest = Manifest(
        pd.concat([assign_splits(kept, cfg, seed), shift[kept.columns]], ignore_index=True)[
            ["path", "label", "split", "sha256", "group"]
        ],
        pd.concat([source.scan.skipped, straddling, leaked], ignore_index=True),
        source.root,
        "official" if official else "carved",
        merged_groups=merged,
        removed_across_splits=len(straddling) + len(leaked),
    )
    if merged:
        log.info(
            "%s: %d groups of near-duplicate or identical images, each kept in one split "
            "(dataset.near_duplicate_bits=%s); %d image(s) left out as near-duplicates of "
            "images of a more protected split (test, val, train, then shift)",
            cfg.name,
            merged,
            bits,
            len(straddling),
        )
    if cache_dir is not None:
        saved = cache_dir / "manifests" / f"{cfg.name}-{manifest.sha256[:12]}.csv"
        make_folder(saved.parent)  # a read-only or full folder: one line naming it
        write_text_aside(saved, manifest.csv)  # aside, then renamed: no link followed
    return manifest
