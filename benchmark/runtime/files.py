"""Files in a folder that others may write too (a shared cache): each written aside and renamed
into place, never through a link the harness did not make.

`write_aside` creates its temporary file with O_CREAT | O_EXCL (tempfile.mkstemp) beside the
target, so a link planted under any name there is never opened, flushes it to disk (fsync) and
renames it over the target (os.replace): a link at the target is replaced, not followed, and a
reader sees the old file or the whole new one, never half of it. `read_json` reads a small JSON
file such as a cache's done-marker, and says None for one that is missing, truncated or not an
object, for the caller to treat it as a miss.

A folder that refuses the write (read-only, no permission, a full disk) is one `DatasetError`
naming the folder and the fix (`writing_in`), never an OSError traceback, and leaves no partial
file behind.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


class DatasetError(RuntimeError):
    """The data, or the folder its caches are kept in, is missing or unusable; the message says
    where and how to fix it. Said in one line, without a traceback, by every entry point.
    (Defined here, in the lowest layer, so that a cache write can raise it; the rest of the
    harness imports it from `benchmark.data`.)"""


# Why a folder refuses a write, as the harness says it (errno -> the words of its line).
READ_ONLY = {
    errno.EROFS: "it is on a read-only file system",
    errno.EACCES: "permission denied (the folder is read-only for this user)",
    errno.EPERM: "operation not permitted (the folder is read-only for this user)",
}
FULL = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded (no space left for this user)",
}
CACHE_FIX = "paths.cache_dir (BENCHMARK_CACHE_DIR)"


def unwritable(error: OSError, folder: Path) -> DatasetError | None:
    """The one line for a write in `folder` that the file system refused for want of permission
    or of space; None for any other error (a bug or a broken disk: its traceback is wanted)."""
    if error.errno in READ_ONLY:
        return DatasetError(
            f"cannot write in {folder}: {READ_ONLY[error.errno]}; make it writable, or set "
            f"{CACHE_FIX} to a writable folder (e.g. BENCHMARK_CACHE_DIR=$HOME/.cache/benchmark)."
        )
    if error.errno in FULL:
        return DatasetError(
            f"cannot write in {folder}: {FULL[error.errno]}; free some space, or set "
            f"{CACHE_FIX} to a folder on a larger disk."
        )
    return None


@contextmanager
def writing_in(folder: Path) -> Iterator[None]:
    """Writes in `folder`: one refused for want of permission or space is the one line of
    `unwritable`, raised from None (the OSError's traceback says nothing more)."""
    try:
        yield
    except OSError as error:
        if (said := unwritable(error, folder)) is None:
            raise
        raise said from None


def make_folder(folder: Path) -> None:
    """`folder` and its parents, created where missing (see `writing_in`)."""
    with writing_in(folder):
        folder.mkdir(parents=True, exist_ok=True)


def partials(target: Path) -> list[Path]:
    """The temporary files `write_aside` left for `target` (a crashed or killed writer's): for
    a caller holding the target's lock to remove."""
    return sorted(target.parent.glob(f".{target.name}.*{PARTIAL_SUFFIX}"))


def _umask() -> int:
    """The process's umask (read once, at import: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# The mode an ordinary open() gives a new file here: mkstemp's 0600 would keep the other users
# of a shared cache folder from reading what this one built.
FILE_MODE = 0o666 & ~_umask()


def open_aside(target: Path) -> tuple[IO[bytes], Path]:
    """A new, empty temporary file beside `target` (none existed under its name: O_EXCL), open
    for reading and writing with the mode open() would give it, and its path."""
    with writing_in(target.parent):
        fd, name = tempfile.mkstemp(
            dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX
        )
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "r+b"), Path(name)


def commit(handle: IO[bytes], partial: Path, target: Path) -> None:
    """The file written through `handle` flushed to disk and renamed over `target`."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(partial, target)


def write_aside(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`target` as `write(handle)` writes it, atomically, never through a link (see above); a
    folder that refuses it is one DatasetError, and nothing is left behind."""
    handle, partial = open_aside(target)
    try:
        with writing_in(target.parent), handle:
            write(handle)
            commit(handle, partial, target)
    except BaseException:
        with suppress(OSError):  # a folder gone read-only meanwhile: the first error is the one
            partial.unlink(missing_ok=True)
        raise


def write_text_aside(target: Path, text: str) -> None:
    write_aside(target, lambda handle: handle.write(text.encode()))


def read_json(file: Path) -> dict[str, Any] | None:
    """The JSON object in `file`; None if it is missing, unreadable, truncated or not an
    object."""
    try:
        said = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return said if isinstance(said, dict) else None
