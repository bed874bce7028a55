"""Files in a folder that others may write too (a shared cache): each written aside and renamed
into place, never through a link the harness did not make.

`write_aside` creates its temporary file with O_CREAT | O_EXCL (tempfile.mkstemp) beside the
target, so a link planted under any name there is never opened, flushes it to disk (fsync) and
renames it over the target (os.replace): a link at the target is replaced, not followed, and a
reader sees the old file or the whole new one, never half of it. `read_json` reads a small JSON
file such as a cache's done-marker, and says None for one that is missing, truncated or not an
object, for the caller to treat it as a miss.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"


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
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX)
    os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, "r+b"), Path(name)


def commit(handle: IO[bytes], partial: Path, target: Path) -> None:
    """The file written through `handle` flushed to disk and renamed over `target`."""
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(partial, target)


def write_aside(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`target` as `write(handle)` writes it, atomically, never through a link (see above)."""
    handle, partial = open_aside(target)
    try:
        with handle:
            write(handle)
            commit(handle, partial, target)
    except BaseException:
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
