"""benchmark.report.latex: the report's tables as LaTeX that pdflatex compiles, whatever the cells
hold (underscores, %, &, #, the report's ±, ▼, —, ...)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.report.latex import escape, latex_document, to_latex

PDFLATEX = shutil.which("pdflatex")

# Everything that breaks a naive table, in headers and cells.
AWKWARD = pd.DataFrame(
    {
        "dataset": ["dogs_vs_cats", "hymenoptera", "R&D #1 {x}"],
        "linear_probe": [
            "0.954 ± 0.010 (n=3) · study 0.961 (-0.007 ▼)",
            "failed — n ≥ 2… ▲",
            "50% ~ $5 ^ a\\b <c> |d|\nnext line\n\nafter a blank line",
        ],
        "wall time (s)": [111.8, np.nan, 5.25],
        "accuracy %": [0.95, 0.9543, 0.5],
        "n": [3, 0, 12],
        "name": ["Ső ü 中", "a\u00a0b", "x\u2212y \u00d7 z"],
    }
)
BOLD = pd.DataFrame({"linear_probe": [True, False, False], "accuracy %": [False, True, False]})


def test_escape():
    assert escape("linear_probe") == r"linear\_probe"
    assert escape("100% & #1 $5") == r"100\% \& \#1 \$5"
    assert escape(r"{a}\b") == r"\{a\}\textbackslash{}b"
    assert escape("0.954 ± 0.010 · ▼") == r"0.954 $\pm$ 0.010 $\cdot$ $\blacktriangledown$"
    assert escape("— ≥ …") == r"\textemdash{} $\geq$ \ldots{}"
    assert escape("é ő 中") == "é o ?"  # Latin-1 stays; others: ASCII decomposition, else ?


def test_table_layout_numbers_and_bold():
    latex = to_latex(AWKWARD, caption="Cost_per cell & 100% (±)", label="tab:cost", bold=BOLD)
    lines = latex.splitlines()
    assert r"\toprule" in lines and r"\midrule" in lines and r"\bottomrule" in lines
    assert r"\caption{Cost\_per cell \& 100\% ($\pm$)}" in lines and r"\label{tab:cost}" in lines
    assert r"\begin{tabular}{llrrrl}" in lines  # numbers right-aligned
    header = lines[lines.index(r"\toprule") + 1]
    assert header.startswith(r"dataset & linear\_probe & wall time (s) & accuracy \% & n &")
    rows = lines[lines.index(r"\midrule") + 1 : lines.index(r"\bottomrule")]
    cells = [row.removesuffix(r" \\").split(" & ") for row in rows]
    assert [c[2] for c in cells] == ["111.80", r"\textemdash{}", "5.25"]  # as the column needs
    assert [c[3] for c in cells] == ["0.950", r"\bfseries 0.954", "0.500"]  # at most 3 decimals
    assert [c[4] for c in cells] == ["3", "0", "12"]
    assert cells[0][1].startswith(r"\bfseries 0.954 $\pm$")
    assert latex.count(r"\bfseries") == 2
    assert "111.800000" not in latex and "nan" not in latex.lower()


def test_float_precision_per_column():
    frame = pd.DataFrame(
        {"s": [111.8, 95.3], "whole": [12.0, 300.0], "half": [0.5, 0.25], "acc": [0.9, 0.9543]}
    )
    lines = to_latex(frame, "c", "l").splitlines()
    rows = lines[lines.index(r"\midrule") + 1 : lines.index(r"\bottomrule")]
    assert rows == [r"111.8 & 12 & 0.50 & 0.900 \\", r"95.3 & 300 & 0.25 & 0.954 \\"]


@pytest.mark.skipif(PDFLATEX is None, reason="pdflatex is not installed (texlive-latex-base)")
def test_document_compiles_with_pdflatex(tmp_path: Path):
    tables = [
        to_latex(AWKWARD, caption="Awkward_cells: 100% & #1 ± ▼ — ≥ …", label="tab:x", bold=BOLD),
        to_latex(AWKWARD.drop(columns="name"), caption="Again", label="tab:y"),
    ]
    (tmp_path / "report.tex").write_text(latex_document(tables), encoding="utf-8")
    done = subprocess.run(
        [PDFLATEX, "-halt-on-error", "-interaction=nonstopmode", "report.tex"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "report.pdf").stat().st_size > 0
    log = (tmp_path / "report.log").read_text(errors="replace")
    assert "Missing character" not in log and "Undefined control sequence" not in log
