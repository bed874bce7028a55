"""Finding the images of a dataset, and the files that are not usable, before any training.

Real archives are messy: placeholders, `.DS_Store`, zero-byte and truncated files, text saved as
`.jpg`, stray nested folders. Each file is either an image (decoded once here, so a broken one can
never stop an epoch) or skipped with the reason, for the stats output and the run's artifacts.
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

import pandas as pd
from PIL import Image, UnidentifiedImageError

from benchmark.runtime.progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
# Longest side over shortest side beyond which an image is refused: resizing the short side to a
# backbone's input (256 px) would blow a thin strip up (1 x 12000 px, 132 bytes, becomes
# 256 x 3,072,000 px, 2.4 GB of RGB). A panorama is about 4:1; 20:1 is no photograph.
MAX_ASPECT_RATIO = 20
# Verdicts remembered in the cache (`remembered_verdicts`): the version changes with the rules, so
# a file accepted by older rules is checked again.
VERDICTS_FILE = "verified_files.v2.csv"
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
    if not content:
        return "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(content)) as image:
            width, height = image.size
            if max(width, height) > MAX_ASPECT_RATIO * max(1, min(width, height)):
                return (
                    f"extreme aspect ratio ({width}x{height} px, more than "
                    f"{MAX_ASPECT_RATIO}:1): resized for a backbone it would take gigabytes; "
                    "crop it or remove it"
                )
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()  # decodes the whole stream: truncation shows up here, not mid-epoch
    except UnidentifiedImageError:
        return "not an image (content unreadable by Pillow)"
    except Image.DecompressionBombError as error:  # a pixel bomb: refused before decoding
        return f"too large to decode safely ({error})"
    except (OSError, SyntaxError, ValueError) as error:
        return f"corrupt or truncated image ({error})"
    return None


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


# Verdicts of files already decoded, and their content digests, by (path, size, mtime): a dataset
# is decoded and hashed once, not per run. Filled from and saved to a CSV by `remembered_verdicts`.
_VERDICTS: dict[tuple[str, int, int], tuple[str | None, str]] = {}
VERDICT_COLUMNS = ["path", "size", "mtime_ns", "reason", "sha256"]


@contextmanager
def remembered_verdicts(file: Path | None) -> Iterator[None]:
    """Reuse and extend the verdicts stored in `file` (no file: decode everything)."""
    if file is not None and file.is_file():
        table = pd.read_csv(file, dtype={"reason": object, "sha256": object}, keep_default_na=False)
        if set(VERDICT_COLUMNS) <= set(table.columns):  # older caches lack digests: redo them
            _VERDICTS.update(
                ((p, int(s), int(m)), (r or None, d))
                for p, s, m, r, d in table[VERDICT_COLUMNS].itertuples(index=False)
            )
    try:
        yield
    finally:
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            rows = [(*key, reason or "", digest) for key, (reason, digest) in _VERDICTS.items()]
            # Written aside then renamed: cells of a parallel sweep never read a half-written file.
            partial = file.with_name(f".{file.name}.{os.getpid()}")
            pd.DataFrame(rows, columns=VERDICT_COLUMNS).to_csv(partial, index=False)
            partial.replace(file)
        _VERDICTS.clear()


def _verdict(path: Path) -> tuple[str | None, str | None]:
    """Why the file is unusable (None: it decodes), and the SHA-256 of its bytes. A file that
    cannot be read now (dangling or looping symlink, no permission) is skipped with the reason
    but not remembered: once fixed, it is checked again."""
    try:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _VERDICTS:
            content = path.read_bytes()  # read once: decoded and hashed
            _VERDICTS[key] = (unusable_reason(content), hashlib.sha256(content).hexdigest())
        return _VERDICTS[key]
    except OSError as error:
        return f"unreadable ({error.strerror or error}; fix it and rerun)", None


def verify(files: pd.DataFrame, placeholders: Iterable[str] = (), desc: str = "") -> Scan:
    """Check every (path, label) row; decoding runs on all cores with a progress bar. Usable
    images get their content digest (`sha256`), which the manifest and its hash carry."""
    placeholders = set(placeholders)
    reasons = [_candidate(Path(p), placeholders) for p in files.path]
    digests: list[str | None] = [None] * len(reasons)
    to_decode = [i for i, reason in enumerate(reasons) if reason is None]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = pool.map(_verdict, (Path(files.path.iloc[i]) for i in to_decode))
        if len(to_decode) >= 500:  # a few hundred images take a second or two: no progress
            decoded = progress(decoded, desc or "Checking images", total=len(to_decode))
        for i, (reason, digest) in zip(to_decode, decoded, strict=True):
            reasons[i], digests[i] = reason, digest
    bad = pd.Series(reasons, index=files.index)
    images = files.assign(sha256=digests)[bad.isna()].reset_index(drop=True)
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


def scan_class_folders(
    root: Path, placeholders: Iterable[str] = (), classes: list[str] | None = None
) -> Scan:
    """Every (selected) class folder must keep at least one usable image."""
    found, files, stray = class_folder_files(root)
    if not found:
        raise DatasetError(f"{root} has no class sub-folders.")
    files, left_out = select_classes(files, found, classes, root)
    scan = verify(files, placeholders, desc=f"checking {root.name}")
    wanted = found if classes is None else classes
    empty = sorted(set(wanted) - set(scan.images.label))
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(str(root / c) for c in empty)} have no usable images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}): add images or remove the folder."
        )
    return Scan(scan.images, pd.concat([stray, left_out, scan.skipped], ignore_index=True))
