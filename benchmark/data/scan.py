"""Finding the images of a dataset, and the files that are not usable, before any training.

Real archives are messy: placeholders, `.DS_Store`, zero-byte and truncated files, text saved as
`.jpg`, stray nested folders. Each file is either an image (decoded once here, so a broken one can
never stop an epoch) or skipped with the reason, for the stats output and the run's artifacts.
The same decode gives each image its perceptual hash, which groups near-duplicates (manifest.py).
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError

from benchmark.data.images import to_rgb
from benchmark.runtime.files import DatasetError as DatasetError  # defined below data: see there
from benchmark.runtime.files import make_folder, write_aside
from benchmark.runtime.progress import progress

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini"}
# Longest side over shortest side beyond which an image is refused: resizing the short side to a
# backbone's input (256 px) would blow a thin strip up (1 x 12000 px, 132 bytes, becomes
# 256 x 3,072,000 px, 2.4 GB of RGB). A panorama is about 4:1; 20:1 is no photograph.
MAX_ASPECT_RATIO = 20
# Verdicts remembered in the cache (`remembered_verdicts`): the version changes with the rules, so
# a file accepted by older rules is checked again (v3: with each image's perceptual hash; v4: each
# file known by its ctime and inode too, so content replaced under the same size and mtime is
# checked again).
VERDICTS_FILE = "verified_files.v4.csv"
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
NOT_UTF8 = (
    "name is not valid UTF-8 (shown with its undecodable bytes as \\xNN): rename it in UTF-8 "
    "(e.g. convmv -f latin1 -t utf8 --notest) to use it"
)

log = logging.getLogger("benchmark")


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


def undecodable(path: Path | str) -> str | None:
    """None for a path that is valid text; for one whose name holds bytes that are not UTF-8
    (a file named under another encoding, e.g. Latin-1 `bad\\xff.jpg`), the path as safe text
    with those bytes as `\\xNN`: Python keeps them as lone surrogates, which no table, CSV or
    log line can hold, so such a file is skipped under this name."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that is no escaped byte
            return text.encode("utf-8", "backslashreplace").decode("utf-8")
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


# Verdicts of files already decoded, their content digests and perceptual hashes, by path with
# the file's state (size, mtime, ctime and inode): a dataset is decoded and hashed once, not per
# run, and a file whose content was replaced (even under its old size and mtime: a new ctime, or
# a new inode when renamed over) is checked again. Filled from and saved to a CSV by
# `remembered_verdicts`, with the columns CACHE_COLUMNS: VERDICT_COLUMNS (as in v3), the
# PERCEPTUAL_COLUMN (empty: no hash), then the file's ctime and inode (v4).
FileState = tuple[int, int, int, int]  # st_size, st_mtime_ns, st_ctime_ns, st_ino
Verdict = tuple[str | None, str, str | None]  # reason (None: usable), sha256, perceptual hash
_VERDICTS: dict[str, tuple[FileState, Verdict]] = {}
_CHECKED: set[str] = set()  # paths checked (decoded) since the verdicts were read
VERDICT_COLUMNS = ["path", "size", "mtime_ns", "reason", "sha256"]
PERCEPTUAL_COLUMN = "dhash"
CACHE_COLUMNS = [*VERDICT_COLUMNS, PERCEPTUAL_COLUMN, "ctime_ns", "inode"]
_NUMBER = re.compile(r"-?[0-9]+")
_DIGEST = re.compile(r"[0-9a-f]{64}")


def _remembered(row: list[str]) -> tuple[str, FileState, Verdict] | None:
    """One line of the verdicts file, or None when it is not one this version wrote."""
    if len(row) != len(CACHE_COLUMNS):
        return None
    path, size, mtime, reason, digest, phash, ctime, inode = row
    numbers = (size, mtime, ctime, inode)
    if not path or not all(_NUMBER.fullmatch(n) for n in numbers) or not _DIGEST.fullmatch(digest):
        return None
    if (phash and not _DIGEST.fullmatch(phash)) or undecodable(path) or undecodable(reason):
        return None  # (bytes that were not UTF-8 are read as surrogates)
    state = (int(size), int(mtime), int(ctime), int(inode))
    return path, state, (reason or None, digest, phash or None)


def _read_verdicts(file: Path) -> bool:
    """Fill _VERDICTS from `file`; whether it must be rewritten. The cache is a convenience,
    never a reason to stop: a file that cannot be read, or lines that are not verdicts (edited,
    damaged on disk), are dropped with one warning naming the file and the first such line, and
    what they were for is checked again. An older version's file (another header) is just a
    miss, silently: its files are checked again by today's rules."""
    bad: list[int] = []
    try:
        with file.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            # Line by line: a damaged line (an unclosed quote) cannot swallow the lines after it.
            lines = enumerate(handle, start=1)
            header = next(csv.reader([next(lines, (1, ""))[1]]), [])
            if header != CACHE_COLUMNS:
                if header and set(header) <= set(CACHE_COLUMNS):
                    return True  # an older version's verdicts: not trusted, not damaged
                log.warning(
                    "%s: the image-check cache's first line is not its header %s: dropped; "
                    "every file is checked again and the cache is rewritten.",
                    file,
                    ",".join(CACHE_COLUMNS),
                )
                return True
            for number, line in lines:
                try:
                    row = next(csv.reader([line]), [])
                except csv.Error:
                    row = []
                if (remembered := _remembered(row)) is None:
                    bad.append(number)
                else:
                    path, state, verdict = remembered
                    _VERDICTS[path] = (state, verdict)
    except OSError as error:
        log.warning(
            "%s: the image-check cache cannot be read (%s): ignored; every file is checked "
            "again and the cache is rewritten.",
            file,
            error.strerror or error,
        )
        return True
    if bad:
        log.warning(
            "%s: %d line(s) of the image-check cache are unreadable (line %d first): dropped; "
            "the files they were for are checked again and the cache is rewritten without them.",
            file,
            len(bad),
            bad[0],
        )
    return bool(bad)


def _save_verdicts(file: Path) -> None:
    """The verdicts written to `file`, aside then renamed: cells of a parallel sweep never read
    a half-written file, and no link planted in the cache folder is followed. A folder that
    refuses the write is one DatasetError naming it (runtime.files.writing_in)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(CACHE_COLUMNS)
    for path, ((size, mtime, ctime, inode), (reason, digest, phash)) in sorted(_VERDICTS.items()):
        writer.writerow([path, size, mtime, reason or "", digest, phash or "", ctime, inode])
    make_folder(file.parent)
    write_aside(file, lambda handle: handle.write(text.getvalue().encode()))


@contextmanager
def remembered_verdicts(file: Path | None) -> Iterator[None]:
    """Reuse and extend the verdicts stored in `file` (no file: decode everything). The file
    is rewritten when a file was checked or a line dropped; when the body fails, what was
    checked is still kept if the folder allows, and the body's error is the one said."""
    _VERDICTS.clear()
    _CHECKED.clear()
    rewrite = file is not None and file.is_file() and _read_verdicts(file)
    try:
        yield
    except BaseException:
        if file is not None and (rewrite or _CHECKED):
            with suppress(DatasetError):
                _save_verdicts(file)
        raise
    else:
        if file is not None and (rewrite or _CHECKED):
            _save_verdicts(file)
    finally:
        _VERDICTS.clear()
        _CHECKED.clear()


def _state(stat: os.stat_result) -> FileState:
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _verdict(path: Path) -> tuple[str | None, str | None, str | None]:
    """Why the file is unusable (None: it decodes), the SHA-256 of its bytes and the image's
    perceptual hash. A file that cannot be read now (dangling or looping symlink, no permission)
    is skipped with the reason but not remembered: once fixed, it is checked again."""
    try:
        known = _VERDICTS.get(str(path))
        if known is not None and known[0] == _state(path.stat()):
            return known[1]
        with open(path, "rb") as handle:
            state = _state(os.fstat(handle.fileno()))  # the state of the very file read
            content = handle.read()  # read once: decoded and hashed
        reason, phash = inspect_image(content)
        if reason is not None:  # one line in the cache, the stats output and the logs
            reason = " ".join(reason.split())
        verdict = (reason, hashlib.sha256(content).hexdigest(), phash)
        _VERDICTS[str(path)] = (state, verdict)
        _CHECKED.add(str(path))
        return verdict
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


# The cache folder (paths.cache_dir) of the manifest being built, by real path: set while its
# dataset is scanned (`cache_folder`), so that a cache kept inside the dataset folder is never a
# class (its images/ and manifests/ appear after the first cell: the classes would move).
_CACHE_FOLDERS: set[str] = set()
_SAID: set[str] = set()


@contextmanager
def cache_folder(folder: Path | None) -> Iterator[None]:
    """While the body scans a dataset, `folder` (its cache) is not taken for a class folder."""
    if folder is not None:
        _CACHE_FOLDERS.add(os.path.realpath(folder))
    try:
        yield
    finally:
        _CACHE_FOLDERS.clear()
        _SAID.clear()


def _holds_images(folder: Path) -> bool:
    with suppress(OSError):
        return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())
    return False


def _current_cache(folder: Path) -> bool:
    return bool(_CACHE_FOLDERS) and os.path.realpath(folder) in _CACHE_FOLDERS


def harness_cache(folder: Path) -> bool:
    """Whether `folder` is the cache folder of the manifest being built (see `cache_folder`),
    or another one of the harness's (it holds an image-check cache and no image: a cache folder
    that was set inside the data before, then moved). The cache folder set to a class folder
    that holds images is refused: skipped, a class would be lost; scanned, the cache's files
    would be among its images."""
    if _current_cache(folder):
        if _holds_images(folder):
            raise DatasetError(
                f"paths.cache_dir is {folder}, a class folder of the dataset (it holds images): "
                "set paths.cache_dir (BENCHMARK_CACHE_DIR) to a folder outside the data."
            )
        return True
    return (folder / VERDICTS_FILE).is_file() and not _holds_images(folder)


def _skip_cache(folder: Path, root: Path) -> None:
    """A cache folder found among the class folders: skipped, said once in one line. Not
    listed with the skipped files: it is not the dataset's, and the first cell (before the
    cache existed) and the next must leave out the same files."""
    if str(folder) in _SAID:
        return
    _SAID.add(str(folder))
    current = _current_cache(folder)
    log.warning(
        "%s is %s, inside the dataset folder %s: skipped, not a class; %s",
        folder,
        "the harness's cache folder (paths.cache_dir)"
        if current
        else f"a cache folder of the harness (it holds {VERDICTS_FILE})",
        root,
        "better set paths.cache_dir (BENCHMARK_CACHE_DIR) to a folder outside the data."
        if current
        else "remove it, and keep paths.cache_dir (BENCHMARK_CACHE_DIR) outside the data.",
    )


def class_folder_files(root: Path) -> tuple[list[str], pd.DataFrame, pd.DataFrame]:
    """Class names, and files under `root/<class>/` labelled by folder; nested folders and loose
    files at the top are not classes and are reported, never silently merged. A name that is
    not UTF-8 is reported under a safe spelling (`undecodable`), and the harness's own cache
    folder is skipped (`cache_folder`)."""
    if not root.is_dir():
        raise DatasetError(f"{undecodable(root) or root} is not a folder of class sub-folders.")
    if (safe := undecodable(root)) is not None:
        raise DatasetError(
            f"the dataset folder's path {safe} is not valid UTF-8 (its undecodable bytes shown "
            "as \\xNN): rename it in UTF-8, or move the data to a folder whose path is."
        )
    if _current_cache(root):
        raise DatasetError(
            f"paths.cache_dir is the dataset folder {root} itself: the harness's cache "
            "(manifests/, images/, features/) would be read as class folders; set "
            "paths.cache_dir (BENCHMARK_CACHE_DIR) to a folder outside the data."
        )
    classes, rows, stray = [], [], []
    for entry in sorted(root.iterdir()):
        if (safe := undecodable(entry)) is not None:
            kind = "folder" if entry.is_dir() else "file"
            stray.append((safe, f"{kind} {NOT_UTF8}"))
            continue
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
        if harness_cache(entry):
            _skip_cache(entry, root)
            continue
        classes.append(entry.name)
        try:
            items = sorted(entry.iterdir())
        except OSError as error:
            raise DatasetError(
                f"class folder {entry} cannot be listed ({error.strerror}): fix its permissions."
            ) from None
        for item in items:
            if (safe := undecodable(item)) is not None:
                stray.append((safe, f"{'folder' if item.is_dir() else 'file'} {NOT_UTF8}"))
            elif item.is_dir():
                if harness_cache(item):
                    _skip_cache(item, root)
                else:
                    stray.append((str(item), "nested folder inside a class folder, ignored"))
            else:
                rows.append((str(item), entry.name))
    files = pd.DataFrame(rows, columns=["path", "label"])
    return classes, files, pd.DataFrame(stray, columns=["path", "reason"])


def flat_files(folder: Path) -> tuple[list[Path], pd.DataFrame]:
    """The files of a flat folder (Kaggle's `train/cat.N.jpg`), and those skipped because their
    name is not UTF-8 (`undecodable`)."""
    found, skipped = [], []
    for entry in sorted(folder.iterdir()):
        if (safe := undecodable(entry)) is not None:
            skipped.append((safe, f"{'folder' if entry.is_dir() else 'file'} {NOT_UTF8}"))
        else:
            found.append(entry)
    return found, pd.DataFrame(skipped, columns=["path", "reason"])


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
