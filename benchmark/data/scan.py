"""Finding the images of a dataset, and the files that are not usable, before any training.

Real archives are messy: placeholders, `.DS_Store`, zero-byte and truncated files, text saved as
`.jpg`, stray nested folders. Each file is either an image (decoded once here, so a broken one can
never stop an epoch) or skipped with the reason, for the stats output and the run's artifacts.
The same decode gives each image its perceptual hash, which groups near-duplicates (manifest.py).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from benchmark.data.images import to_rgb
from benchmark.runtime.files import write_aside
from benchmark.runtime.progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
# Longest side over shortest side beyond which an image is refused: resizing the short side to a
# backbone's input (256 px) would blow a thin strip up (1 x 12000 px, 132 bytes, becomes
# 256 x 3,072,000 px, 2.4 GB of RGB). A panorama is about 4:1; 20:1 is no photograph.
MAX_ASPECT_RATIO = 20
# Verdicts remembered in the cache (`remembered_verdicts`): the version changes with the rules, so
# a file accepted by older rules is checked again (v3: with each image's perceptual hash).
VERDICTS_FILE = "verified_files.v3.csv"
# The perceptual hash: imagehash's difference hash of a 17x16 grey thumbnail, 16 x 16 = 256 bits.
HASH_SIZE = 16
HASH_BITS = HASH_SIZE * HASH_SIZE
# A JPEG is decoded at a reduced scale (its DCT does it, at a fraction of the cost), but not below
# this many pixels a side: on the Simpsons frames, the hash of a 1/8 decode (80x60 of 640x480)
# differs from the full image's by up to 20 bits; of one 128 px or more a side, by up to 12 (mean
# 1.6), and Kaggle's test images (too small to be reduced) by none.
HASH_SOURCE_PX = 128
# A thumbnail whose grey levels span less than this is featureless (a blank or one-colour image):
# its hash is all zeros whatever the colour, so it gets none and is grouped by exact content only.
# The real images of ../shared/data span 52 levels or more.
FLAT_SPREAD = 8
# Folders that archivers add beside the data (macOS zips carry `__MACOSX/`): never a class.
SYSTEM_FOLDERS = {"__macosx": "macOS archive metadata (__MACOSX), not a class"}


class DatasetError(RuntimeError):
    """The data is missing or unusable; the message says where and how to fix it."""


@dataclass
class Scan:
    """Usable images with their labels, and everything left out with the reason."""

    images: pd.DataFrame  # path, label[, split]
    skipped: pd.DataFrame  # path, reason

    @staticmethod
    def concat(scans: Iterable[Scan]) -> Scan:
        scans = list(scans)
        return Scan(
            pd.concat([s.images for s in scans], ignore_index=True),
            pd.concat([s.skipped for s in scans], ignore_index=True),
        )


def unusable_reason(content: bytes) -> str | None:
    """None for a file whose bytes decode fully as an image; otherwise why it cannot be used."""
    return inspect_image(content)[0]


def perceptual_hash(image: Image.Image) -> str | None:
    """The 256-bit difference hash (64 hex digits) of the upright image, or None when it is
    featureless (see FLAT_SPREAD) or its orientation cannot be read."""
    try:
        upright = to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError):
        return None
    # The thumbnail imagehash.dhash makes (grey, LANCZOS); handed to it, it is not resized again.
    thumbnail = upright.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS)
    if np.ptp(np.asarray(thumbnail)) < FLAT_SPREAD:
        return None
    return str(imagehash.dhash(thumbnail, hash_size=HASH_SIZE))


def inspect_image(content: bytes) -> tuple[str | None, str | None]:
    """Why the bytes cannot be used (None: they decode fully as an image), and the image's
    perceptual hash (`perceptual_hash`) from the same decode."""
    if not content:
        return "empty file (0 bytes)", None
    try:
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
            if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                return (
                    f"extreme aspect ratio ({width}x{height} px, more than "
                    f"{MAX_ASPECT_RATIO}:1): resized for a backbone it would take gigabytes; "
                    "crop it or remove it"
                ), None
            least = (max(width // 8, HASH_SOURCE_PX), max(height // 8, HASH_SOURCE_PX))
            image.draft("RGB", (min(width, least[0]), min(height, least[1])))
            image.load()  # decodes the whole stream: truncation shows up here, not mid-epoch
            return None, perceptual_hash(image)
    except UnidentifiedImageError:
        return "not an image (content unreadable by Pillow)", None
    except Image.DecompressionBombError as error:  # a pixel bomb: refused before decoding
        return f"too large to decode safely ({error})", None
    except (OSError, SyntaxError, ValueError) as error:
        return f"corrupt or truncated image ({error})", None


def _candidate(path: Path, placeholders: set[str]) -> str | None:
    """Reason to skip a file without opening it, or None if it should be decoded."""
    name = path.name.lower()
    if name.startswith(".") or name in SYSTEM_FILES:
        return "system file"
    if path.name in placeholders:
        return "placeholder shipped with the dataset, not a sample"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({path.suffix or 'no suffix'})"
    return None


# Verdicts of files already decoded, their content digests and perceptual hashes, by (path, size,
# mtime): a dataset is decoded and hashed once, not per run. Filled from and saved to a CSV by
# `remembered_verdicts`, with the columns VERDICT_COLUMNS + [PERCEPTUAL_COLUMN] (empty: no hash).
_VERDICTS: dict[tuple[str, int, int], tuple[str | None, str, str | None]] = {}
VERDICT_COLUMNS = ["path", "size", "mtime_ns", "reason", "sha256"]
PERCEPTUAL_COLUMN = "dhash"


@contextmanager
def remembered_verdicts(file: Path | None) -> Iterator[None]:
    """Reuse and extend the verdicts stored in `file` (no file: decode everything)."""
    columns = [*VERDICT_COLUMNS, PERCEPTUAL_COLUMN]
    if file is not None and file.is_file():
        text = {"reason": object, "sha256": object, PERCEPTUAL_COLUMN: object}
        table = pd.read_csv(file, dtype=text, keep_default_na=False)
        if set(columns) <= set(table.columns):  # older caches lack digests or hashes: redo them
            _VERDICTS.update(
                ((p, int(s), int(m)), (r or None, d, h or None))
                for p, s, m, r, d, h in table[columns].itertuples(index=False)
            )
    try:
        yield
    finally:
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            rows = [
                (*key, reason or "", digest, phash or "")
                for key, (reason, digest, phash) in _VERDICTS.items()
            ]
            # Written aside then renamed: cells of a parallel sweep never read a half-written
            # file, and no link planted in the cache folder is followed.
            table = pd.DataFrame(rows, columns=columns)
            write_aside(file, lambda handle: table.to_csv(handle, index=False))
        _VERDICTS.clear()


def _verdict(path: Path) -> tuple[str | None, str | None, str | None]:
    """Why the file is unusable (None: it decodes), the SHA-256 of its bytes and the image's
    perceptual hash. A file that cannot be read now (dangling or looping symlink, no permission)
    is skipped with the reason but not remembered: once fixed, it is checked again."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _VERDICTS:
            content = path.read_bytes()  # read once: decoded and hashed
            reason, phash = inspect_image(content)
            _VERDICTS[key] = (reason, hashlib.sha256(content).hexdigest(), phash)
        return _VERDICTS[key]
    except OSError as error:
        return f"unreadable ({error.strerror or error}; fix it and rerun)", None, None


def verify(files: pd.DataFrame, placeholders: Iterable[str] = (), desc: str = "") -> Scan:
    """Check every (path, label) row; decoding runs on all cores with a progress bar. Usable
    images get their content digest (`sha256`), which the manifest and its hash carry, and their
    perceptual hash (`dhash`, None for a featureless image), which groups near-duplicates."""
    placeholders = set(placeholders)
    reasons = [_candidate(Path(p), placeholders) for p in files.path]
    digests: list[str | None] = [None] * len(reasons)
    hashes: list[str | None] = [None] * len(reasons)
    to_decode = [i for i, reason in enumerate(reasons) if reason is None]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(_verdict, (Path(files.path.iloc[i]) for i in to_decode))
        if len(to_decode) >= 500:  # a few hundred images take a second or two: no progress
            decoded = progress(decoded, desc or "Checking images", total=len(to_decode))
        for i, (reason, digest, phash) in zip(to_decode, decoded, strict=True):
            reasons[i], digests[i], hashes[i] = reason, digest, phash
    bad = pd.Series(reasons, index=files.index)
    images = files.assign(sha256=digests, dhash=hashes)[bad.isna()].reset_index(drop=True)
    return Scan(
        images,
        files[bad.notna()]
        .assign(reason=bad[bad.notna()])[["path", "reason"]]
        .reset_index(drop=True),
    )


def class_folder_files(root: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Class names, and files under `root/<class>/` labelled by folder; nested folders and loose
    files at the top are not classes and are reported, never silently merged."""
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of class sub-folders.")
    classes, rows, stray = [], [], []
    for entry in sorted(root.iterdir()):
        if entry.is_file():
            stray.append((str(entry), "file outside any class folder"))
            continue
        if not entry.is_dir():
            stray.append((str(entry), "not a readable folder (broken or looping link?)"))
            continue
        if entry.name.startswith("."):
            stray.append((str(entry), "hidden folder"))
            continue
        if entry.name.lower() in SYSTEM_FOLDERS:
            stray.append((str(entry), SYSTEM_FOLDERS[entry.name.lower()]))
            continue
        classes.append(entry.name)
        try:
            items = sorted(entry.iterdir())
        except OSError as error:
            raise DatasetError(
                f"class folder {entry} cannot be listed ({error.strerror}): fix its permissions."
            ) from None
        for item in items:
            if item.is_dir():
                stray.append((str(item), "nested folder inside a class folder, ignored"))
            else:
                rows.append((str(item), entry.name))
    files = pd.DataFrame(rows, columns=["path", "label"])
    return classes, files, pd.DataFrame(stray, columns=["path", "reason"])


def excluded(paths: pd.Series, reason: str) -> pd.DataFrame:
    return pd.DataFrame({"path": paths, "reason": reason})


def select_classes(
    files: pd.DataFrame, available: Iterable[str], wanted: list[str] | None, where: Path
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows of the configured classes (all when None) and the rows left out; a configured class
    that is not there is an error, before anything is decoded."""
    if wanted is None:
        return files, excluded(pd.Series(dtype=str), "")
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise DatasetError(
            f"classes {missing} are configured (dataset.classes) but not in {where}. Fetch the "
            "complete dataset, or choose classes that are there (dataset.classes=[a,b], or "
            "dataset.classes=null for all)."
        )
    keep = files.label.isin(wanted)
    return files[keep].reset_index(drop=True), excluded(files.path[~keep], "class not selected")


def refuse_two_labels(files: pd.DataFrame, root: Path) -> None:
    """A file reached through two class folders (one folder a link to another, `bees2 -> bees`,
    or an image linked into a second folder) would be one image under two labels, possibly in
    two splits: refused, as the CSV source refuses an image listed with two labels."""
    real = files.path.map(os.path.realpath)
    labels = files.groupby(real.to_numpy()).label.unique()
    conflicting = labels[labels.map(len) > 1]
    if conflicting.empty:
        return
    first, second = (root / label for label in sorted(conflicting.iloc[0])[:2])
    if os.path.realpath(first) == os.path.realpath(second):
        raise DatasetError(
            f"class folders {first} and {second} are the same folder "
            f"({os.path.realpath(first)}): its images would have two labels; remove the link, "
            "or keep one of them (dataset.classes)."
        )
    shown = ", ".join(conflicting.index[:5])
    raise DatasetError(
        f"{root}: {len(conflicting)} image(s) are in two class folders, {first} and {second} "
        f"among them ({shown}): give each image one label (remove the link or the copy)."
    )


def scan_class_folders(
    root: Path, placeholders: Iterable[str] = (), classes: list[str] | None = None
) -> Scan:
    """Every (selected) class folder must keep at least one usable image."""
    found, files, stray = class_folder_files(root)
    if not found:
        raise DatasetError(f"{root} has no class sub-folders.")
    files, left_out = select_classes(files, found, classes, root)
    refuse_two_labels(files, root)
    scan = verify(files, placeholders, desc=f"checking {root.name}")
    wanted = found if classes is None else classes
    empty = sorted(set(wanted) - set(scan.images.label))
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(str(root / c) for c in empty)} have no usable images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder."
        )
    return Scan(scan.images, pd.concat([stray, left_out, scan.skipped], ignore_index=True))
