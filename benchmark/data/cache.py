"""Decode once: every image of a dataset decoded, resized and centre-cropped to a square of the
backbone's resize size, stored as uint8 in one memory-mapped file under `paths.cache_dir`.

Built once (with a progress bar) and reused by every cell, colour mode and seed that needs the
same images at the same size: the key is the image files (path, size, mtime, ctime and inode:
content replaced under the same size and mtime is a new key) and the geometry, not the split. The
evaluation crop of a cached image is the same pixels as the uncached path's (resize then centre
crop); training augmentation sees the stored square, i.e. the central crop of each photo, not its
full width. Pages come from the file on demand, so resident memory does not grow with the
dataset, and DataLoader workers share them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from filelock import FileLock
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from benchmark.data.images import Preprocess, load_rgb
from benchmark.data.scan import DatasetError
from benchmark.runtime.files import (
    commit,
    make_folder,
    open_aside,
    partials,
    read_json,
    write_text_aside,
    writing_in,
)
from benchmark.runtime.progress import progress

log = logging.getLogger("benchmark")


def file_fingerprint(file: Path) -> dict[str, object]:
    """Size and SHA-256 of a cache file, recorded in its done-marker when it is complete."""
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return {"bytes": file.stat().st_size, "sha256": digest.hexdigest()}


def reusable(file: Path, what: str) -> bool:
    """Whether `file` is complete (its done-marker `file.json` exists) and intact (its size and
    SHA-256 as recorded there). A damaged one, a damaged marker (truncated, not JSON) or a link
    in place of either (the harness makes none) is named in one warning and its marker removed,
    for the caller to rebuild it: a cache miss, healed by that build."""
    marker = file.with_suffix(".json")
    if not os.path.lexists(marker):
        return False
    if file.is_symlink() or marker.is_symlink():
        problem: str | None = "a link in the cache, which the harness never makes"
    elif (recorded := read_json(marker)) is None:
        problem = f"its done-marker {marker.name} is truncated or not JSON"
    else:
        problem = damage(file, recorded)
    if problem is None:
        return True
    log.warning("%s %s is damaged (%s): rebuilding it.", what, file, problem)
    marker.unlink(missing_ok=True)
    return False


def clear_partials(file: Path) -> None:
    """Remove what a killed builder of `file` left (call with the file's lock held)."""
    for partial in partials(file):
        partial.unlink(missing_ok=True)


def damage(file: Path, recorded: dict[str, object]) -> str | None:
    """What is wrong with a cache file against its recorded fingerprint, or None if intact."""
    if not file.is_file():
        return "the file is missing"
    size = file.stat().st_size
    if size != recorded.get("bytes"):
        return f"{size} bytes instead of {recorded.get('bytes')}"
    if file_fingerprint(file)["sha256"] != recorded.get("sha256"):
        return "its content does not match the SHA-256 recorded when it was built"
    return None


def stored_size(preprocess: Preprocess) -> int:
    """The side of the stored square: the shorter side the backbone resizes to before its crop."""
    return int(preprocess.input_size / preprocess.crop_pct)


def files_key(paths: list[str], *extra: object) -> str:
    """Which files, in which state, and how they were stored: a changed file changes the key,
    even one whose content was replaced under its old size and mtime (its ctime, or its inode
    when another file was renamed over it, is new)."""
    digest = hashlib.sha256(json.dumps([str(e) for e in extra]).encode())
    for path in sorted(paths):
        stat = os.stat(path)
        state = f"{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
        digest.update(f"{path}\0{state}\n".encode())
    return digest.hexdigest()[:24]


@dataclass
class ImageCache:
    """uint8 images (3, S, S) by path, from a read-only memory map."""

    file: Path
    rows: dict[str, int]
    size: int

    @classmethod
    def open(cls, file: Path) -> ImageCache:
        meta = json.loads(file.with_suffix(".json").read_text())
        return cls(file, {path: i for i, path in enumerate(meta["paths"])}, meta["size"])

    @property
    def array(self) -> np.memmap:
        # Opened lazily per process: a memmap does not survive pickling to a spawned worker.
        if getattr(self, "_array", None) is None:
            shape = (len(self.rows), 3, self.size, self.size)
            self._array = np.memmap(self.file, dtype=np.uint8, mode="r", shape=shape)
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __getitem__(self, path: str) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[self.rows[path]]))

    def __len__(self) -> int:
        return len(self.rows)


def build_image_cache(
    paths: list[str], preprocess: Preprocess, cache_dir: Path, threads: int | None = None
) -> tuple[ImageCache, float]:
    """The cache for these files at this backbone's geometry, built unless it exists; returns it
    and the seconds spent building (0 when it was there). Concurrent cells wait for one builder;
    a build that crashes leaves no file that looks complete."""
    size = stored_size(preprocess)
    key = files_key(paths, size, preprocess.interpolation)
    folder = cache_dir / "images"
    make_folder(folder)  # a read-only or full folder: one line naming it
    file = folder / f"{key}.u8"
    lock = FileLock(str(file) + ".lock")
    with writing_in(folder):  # the lock file is the first write there
        lock.acquire()
    try:
        if reusable(file, "Decoded-image cache"):
            return ImageCache.open(file), 0.0
        return _build(sorted(paths), size, preprocess.interpolation, file, threads)
    finally:
        lock.release()


def allocate(handle: IO[bytes], file: Path, size: int) -> None:
    """The new, empty `file` open as `handle` with `size` bytes reserved on disk before any is
    written. A memmap on a sparse file that meets a full disk gets SIGBUS ("Bus error", no
    message, its run left RUNNING): here it is one DatasetError naming the folder, and nothing
    is left behind."""
    free = shutil.disk_usage(file.parent).free
    if free < size:
        raise DatasetError(
            f"no space left on device at {file.parent}: the decoded-image cache needs "
            f"{size / 1e9:.2f} GB, {free / 1e9:.2f} GB are free; free some space or set "
            "paths.cache_dir (BENCHMARK_CACHE_DIR) to a larger disk."
        )
    try:
        try:
            os.posix_fallocate(handle.fileno(), 0, size)
        except OSError as error:
            if error.errno != errno.EOPNOTSUPP:  # a file system that cannot reserve
                raise
            handle.truncate(size)
    except OSError as error:
        file.unlink(missing_ok=True)
        if error.errno != errno.ENOSPC:
            raise
        raise DatasetError(
            f"no space left on device at {file.parent}: free some space or set "
            "paths.cache_dir (BENCHMARK_CACHE_DIR) to a larger disk."
        ) from None


def _build(
    paths: list[str], size: int, interpolation: str, file: Path, threads: int | None
) -> tuple[ImageCache, float]:
    start = time.perf_counter()
    square = T.Compose(
        [
            T.Resize(size, interpolation=InterpolationMode(interpolation)),
            T.CenterCrop(size),
            T.ToImage(),
        ]
    )
    shape = (len(paths), 3, size, size)
    # Built in a new file of its own (never through a link planted in the cache folder), then
    # flushed to disk and renamed into place.
    clear_partials(file)
    handle, partial = open_aside(file)
    try:
        with handle:
            allocate(handle, partial, int(np.prod(shape)))
            array = np.memmap(handle, dtype=np.uint8, mode="r+", shape=shape)

            def store(row: int) -> None:
                array[row] = square(load_rgb(paths[row])).numpy()

            with ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:  # PIL frees the GIL
                done = pool.map(store, range(len(paths)))
                for _ in progress(done, f"Decoding images once ({size}px)", total=len(paths)):
                    pass
            array.flush()
            commit(handle, partial, file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    meta = {"paths": paths, "size": size, "interpolation": interpolation}
    meta |= file_fingerprint(file)
    write_text_aside(file.with_suffix(".json"), json.dumps(meta))  # last: the done-marker
    return ImageCache.open(file), time.perf_counter() - start
