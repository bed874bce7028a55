"""Progress of a long quiet step: tqdm's bar on a terminal; in a log (not a terminal), one line
at each tenth of the way, instead of a thousand-character line of carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sized
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    items: Iterable[T], what: str, stream: TextIO | None = None, total: int | None = None
) -> Iterator[T]:
    """Yield `items` (`total` of them, if they have no len), showing how far along `what` is
    and about how long is left."""
    stream = stream or sys.stderr
    total = len(items) if isinstance(items, Sized) else total
    if stream.isatty():
        yield from tqdm(items, desc=what, total=total, file=stream, leave=False)
        return
    start, shown = time.monotonic(), 0
    for done, item in enumerate(items, 1):
        yield item
        if total and (done * 10 // total > shown or done == total):
            shown = done * 10 // total
            print(line(what, done, total, time.monotonic() - start), file=stream, flush=True)


def line(what: str, done: int, total: int, elapsed_s: float) -> str:
    """`what: k/N (P %), elapsed, about R left`."""
    left = elapsed_s / done * (total - done) if done else float("nan")
    return (
        f"{what}: {done}/{total} ({100 * done / total:.0f} %), {duration(elapsed_s)} elapsed, "
        f"about {duration(left)} left"
    )


def duration(seconds: float) -> str:
    """3 s, 4 min 05 s, 2 h 07 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class SweepProgress:
    """k/N cells started or ended, the time elapsed and an estimate of the time left (from the
    cells that ran, skipped ones costing nothing), for a sweep's log lines."""

    def __init__(self, total: int) -> None:
        self.total, self.began, self.finished, self.ran = total, 0, 0, 0
        self.started = time.monotonic()

    def start(self) -> str:
        """`k/N` for the cell that starts now."""
        self.began += 1
        return f"{self.began}/{self.total}"

    def done(self, skipped: bool = False) -> str:
        self.finished += 1
        self.ran += not skipped
        return self.status()

    def status(self) -> str:
        elapsed = time.monotonic() - self.started
        text = f"{self.finished}/{self.total} done, {duration(elapsed)} elapsed"
        if self.ran and self.finished < self.total:
            left = elapsed / self.ran * (self.total - self.finished)
            text += f", about {duration(left)} left"
        return text


def sweep_size(overrides: Iterable[str]) -> int:
    """How many cells a `-m` command line makes: the product of its swept values' counts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    size = 1
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_sweep_override():
            size *= sum(1 for _ in override.sweep_string_iterator())
    return size
