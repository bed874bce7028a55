"""Tables as LaTeX that compiles: booktabs through pandas' Styler, every header and cell escaped.

`to_latex` escapes LaTeX's special characters (`linear_probe`, `100%`, `R&D`, `#1`, ...), turns the
report's symbols (±, ▼, ▲, —, ·, ≥, …) into LaTeX, prints floats with as many decimals as the
column needs (at most `precision`: 111.8, not 111.800000) and bolds the flagged cells.
`latex_document` wraps such tables into a document that pdflatex compiles; a table included in
another document needs the packages of `PACKAGES`.
"""

from __future__ import annotations

import math
import numbers
import unicodedata
from collections.abc import Callable

import pandas as pd

PACKAGES = ["booktabs", "amssymb"]  # \toprule..., \blacktriangledown

# One pass, character by character, so that the backslashes of one replacement are never escaped
# again by another.
REPLACEMENTS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"\textless{}",
    ">": r"\textgreater{}",
    "|": r"\textbar{}",
    "±": r"$\pm$",
    "▼": r"$\blacktriangledown$",
    "▲": r"$\blacktriangle$",
    "—": r"\textemdash{}",
    "\u2013": r"\textendash{}",  # en dash
    "\u2212": r"$-$",  # minus sign
    "·": r"$\cdot$",
    "\u00d7": r"$\times$",  # multiplication sign
    "≥": r"$\geq$",
    "≤": r"$\leq$",
    "≈": r"$\approx$",
    "≠": r"$\neq$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "…": r"\ldots{}",
    "†": r"\dag{}",
    "‡": r"\ddag{}",
    "§": r"\S{}",
    "¶": r"\P{}",
    "‖": r"\textbardbl{}",
    "°": r"\textdegree{}",
    "µ": r"$\mu$",
    "✓": r"$\checkmark$",
    "\u00a0": "~",  # no-break space
}


def escape(text: str) -> str:
    """`text` as LaTeX text: special characters escaped, the report's symbols as commands.

    Latin-1 characters (é, ü, ß, ...) stay: pdflatex reads UTF-8 and sets them. Any other
    character becomes its ASCII decomposition where it has one (ő -> o), else "?", rather than
    stopping pdflatex with "Unicode character ... not set up for use with LaTeX"; control
    characters (newlines) become spaces.
    """
    return "".join(_character(c) for c in text)


def to_latex(
    frame: pd.DataFrame,
    caption: str,
    label: str,
    bold: pd.DataFrame | None = None,
    precision: int = 3,
    na_rep: str = "—",
) -> str:
    """A booktabs `table` of `frame`'s columns (not its index: `reset_index()` first to show it).

    Floats get the fewest decimals, at most `precision`, that show every value of their column
    rounded to `precision` (0.954, 0.950 / 111.8, 95.3 / 12, 300). Missing values print as
    `na_rep`. `bold`: booleans labelled like `frame` (missing labels: not bold), True = bold.
    Text columns are left-aligned, numeric ones right-aligned.
    """
    styler = frame.style.hide(axis="index")
    styler = styler.format(
        {name: _formatter(frame[name], precision, na_rep) for name in frame.columns}
    )
    styler = styler.format_index(lambda name: escape(str(name)), axis=1)
    if bold is not None:
        flags = bold.reindex(index=frame.index, columns=frame.columns).fillna(False).astype(bool)
        styler = styler.apply(
            lambda _: flags.replace({True: "font-weight: bold", False: ""}), axis=None
        )
    alignment = "".join(
        "r" if pd.api.types.is_numeric_dtype(frame[name]) else "l" for name in frame.columns
    )
    return styler.to_latex(
        hrules=True,
        caption=escape(caption),
        label=label,
        position_float="centering",
        column_format=alignment,
        convert_css=True,
    )


def latex_document(tables: list[str]) -> str:
    """A minimal article holding `tables` (from `to_latex`), compilable with pdflatex."""
    packages = "\n".join(rf"\usepackage{{{name}}}" for name in PACKAGES)
    body = "\n\n".join(tables)
    return rf"""\documentclass{{article}}
\usepackage[T1]{{fontenc}}
\usepackage[utf8]{{inputenc}}
\usepackage{{lmodern}}
\usepackage[margin=2cm]{{geometry}}
{packages}
\begin{{document}}

{body}

\end{{document}}
"""


def _formatter(column: pd.Series, precision: int, na_rep: str) -> Callable[[object], str]:
    decimals = _decimals(column, precision)

    def format_cell(value: object) -> str:
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            return escape(na_rep)
        if isinstance(value, bool):
            return str(value)
        if isinstance(value, numbers.Integral):
            return str(value)
        if isinstance(value, numbers.Real):
            if not math.isfinite(value):
                return escape(str(value))
            return f"{value:.{decimals}f}"
        return escape(str(value))

    return format_cell


def _decimals(column: pd.Series, precision: int) -> int:
    """The fewest decimals (<= precision) that print every float of `column` as it rounds to
    `precision` decimals."""
    values = [
        float(v)
        for v in column
        if isinstance(v, numbers.Real)
        and not isinstance(v, (bool, numbers.Integral))
        and math.isfinite(v)
    ]
    for decimals in range(precision):
        if all(
            abs(round(v, decimals) - round(v, precision)) < 10 ** -(precision + 3) for v in values
        ):
            return decimals
    return precision


def _character(character: str) -> str:
    if character in REPLACEMENTS:
        return REPLACEMENTS[character]
    code = ord(character)
    if code < 0x20 or 0x7F <= code < 0xA0:  # control characters: a blank line would end the row
        return " "
    return character if code < 0x100 else _ascii(character)


def _ascii(character: str) -> str:
    plain = unicodedata.normalize("NFKD", character).encode("ascii", "ignore").decode()
    return escape(plain) if plain else "?"
