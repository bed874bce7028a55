"""Text from the runs (a dataset folder's name, a variant, a strategy) as Markdown that shows it
as written: `|` would split a table's row, `<b>` would pass through as HTML, `*`, `` ` ``, `[`
would format. As `html.escape` does for report.html and `latex.escape` for report.tex."""

from __future__ import annotations

import pandas as pd

# Backslash-escaped (CommonMark: any ASCII punctuation may be); HTML's three as entities.
_BACKSLASHED = "\\`*[]|"
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_TABLE = str.maketrans({**{c: f"\\{c}" for c in _BACKSLASHED}, **_ENTITIES})


def escape(text: str) -> str:
    """`text` as literal Markdown text, inside a table cell or not."""
    return str(text).translate(_TABLE)


def escape_names(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """`frame` with its header and the text of `columns` (the names, not the numbers) escaped."""
    named = [c for c in columns if c in frame]
    escaped = frame.assign(**{c: frame[c].map(escape, na_action="ignore") for c in named})
    return escaped.rename(columns=lambda name: escape(name))
