"""The pictures of the report: accuracy per dataset (dots and intervals), cost against accuracy,
learning curves, confusion matrices; as inline PNG or SVG for a page that is one self-contained
file.

Matplotlib only (no torch, no tracking store), so that the report starts quickly.
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from benchmark.report.tables import column_names

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def png_data_uri(figure: Figure) -> str:
    """The figure as an inline image, so the HTML page is one self-contained file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def svg_markup(figure: Figure) -> str:
    """The figure as `<svg ...>...</svg>` markup to put inline in an HTML page (no XML prolog;
    text kept as text, so it stays sharp, searchable and free of glyph ids shared between
    figures). Closes the figure."""
    buffer = io.StringIO()
    with plt.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(figure)
    markup = buffer.getvalue()
    return markup[markup.index("<svg") :]


# The interval a dot of `accuracy_dots` is drawn with: the bootstrap's over seeds and test images
# where the report computed it (`verdicts.cell_intervals`), else the t interval over seeds.
INTERVALS = (("boot_low", "boot_high"), ("test_acc_ci_low", "test_acc_ci_high"))
PAD = 0.02  # the least room `accuracy_range` leaves below the lowest interval


def accuracy_range(table: pd.DataFrame) -> tuple[float, float]:
    """One x range for every dataset's `accuracy_dots`: from the lowest interval (or mean) less
    at least `PAD`, down to a multiple of 0.05, to 1. The same in every figure and never
    narrowed to one dataset's values, so a figure does not magnify small differences."""
    values = [table[c] for pair in INTERVALS for c in pair if c in table]
    values = pd.concat([table.test_acc_mean, *values]).astype(float).dropna()
    if values.empty:
        return 0.0, 1.0
    low = math.floor((values.min() - PAD) * 20) / 20
    return max(0.0, low), 1.0


def _interval(cells: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's interval (`INTERVALS`: the first the cell has), NaN where it has none."""
    low = pd.Series(np.nan, index=cells.index)
    high = pd.Series(np.nan, index=cells.index)
    for a, b in INTERVALS:
        if a in cells and b in cells:
            low = low.fillna(cells[a].astype(float))
            high = high.fillna(cells[b].astype(float))
    return low.to_numpy(float), high.to_numpy(float)


def accuracy_dots(
    table: pd.DataFrame,
    dataset: str,
    limits: tuple[float, float] | None = None,
    columns: list[str] | None = None,
) -> Figure:
    """One dataset's test accuracy per column: a dot at each colour's mean over seeds and a line
    across its 95 % interval (`INTERVALS`), one line of the y axis per column (`columns`, default
    every column of `table`, in its order: the same in every dataset's figure), on the x range
    `limits` (default `accuracy_range(table)`: one for all). A cell without a finished seed says
    its state ("failed", "not run"...) at the left.

    Columns: dataset, colour, strategy, backbone, test_acc_mean; optionally boot_low, boot_high
    or test_acc_ci_low, test_acc_ci_high, state, column (the short label)."""
    table = table.assign(column=column_names(table))
    columns = columns or list(dict.fromkeys(table.column))
    mine = table[table.dataset == dataset]
    colours = list(dict.fromkeys(mine.colour))
    limits = limits or accuracy_range(table)
    height = 1.1 + 0.3 * len(columns) * max(1.0, len(colours) / 2)
    figure, axes = plt.subplots(figsize=(6.4, height), layout="constrained")
    step = 0.6 / max(len(colours), 1)
    for k, colour in enumerate(colours):
        cells = mine[mine.colour == colour].drop_duplicates("column").set_index("column")
        cells = cells.reindex(columns)
        y = -np.arange(len(columns)) + (k - (len(colours) - 1) / 2) * -step
        mean = cells.test_acc_mean.to_numpy(float)
        low, high = _interval(cells)
        spread = np.vstack([mean - low, high - mean])
        spread = np.where(np.isnan(spread), 0.0, spread)
        axes.errorbar(
            mean, y, xerr=spread, fmt=MARKERS[k % len(MARKERS)], color=f"C{k}", capsize=3,
            markersize=6, label=colour, linestyle="none",
        )  # fmt: skip
        states = cells.state if "state" in cells else pd.Series(None, index=cells.index)
        for where, state, value in zip(y, states, mean, strict=True):
            if np.isnan(value) and isinstance(state, str):
                axes.text(
                    limits[0], where, f" {colour}: {state}", va="center", ha="left",
                    fontsize="small", color="0.4",
                )  # fmt: skip
    axes.set_yticks(-np.arange(len(columns)), columns)
    axes.set_ylim(-len(columns) + 0.5, 0.5)
    axes.set_xlim(*limits)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    axes.set_xlabel("test accuracy: mean over seeds, 95 % interval")
    axes.grid(axis="x", alpha=0.3)
    axes.set_title(dataset)
    if len(colours) > 1:
        figure.legend(loc="outside lower center", ncols=len(colours), fontsize="small")
    return figure


def cost_vs_accuracy(table: pd.DataFrame) -> Figure:
    """Test accuracy (mean, sd error bars) against wall time per cell (s, log scale): one marker
    shape per strategy, one colour per dataset (per dataset / colour when there are several
    colours); the backbone written beside each point when there are several. Cells without an
    accuracy or a wall time are left out.

    Columns: dataset, colour, strategy, backbone, test_acc_mean, test_acc_sd, wall_time_s.
    """
    done = table.dropna(subset=["test_acc_mean", "wall_time_s"])
    done = done[done.wall_time_s > 0]
    key = _cost_key(table, done)
    figure, axes = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    _draw_cost_cells(axes, done, key)
    _log_time_axis(axes)
    axes.set_xlabel("wall time per cell (s, log scale)")
    axes.set_ylabel("test accuracy (mean ± sd over seeds)")
    axes.grid(alpha=0.3, which="both")
    _cost_legends(figure, key)
    return figure


@dataclass(frozen=True)
class _CostKey:
    """How `cost_vs_accuracy` tells its cells apart: each drawn cell's group (its dataset, or
    dataset / colour), a colour per group and a marker per strategy (both in the table's order),
    and the title of the groups' legend."""

    group: pd.Series
    colours: dict[str, str]
    markers: dict[str, str]
    title: str


def _cost_key(table: pd.DataFrame, done: pd.DataFrame) -> _CostKey:
    """The colours and markers of the cells `done` (those drawn) of `table`."""
    several_colours = done.colour.nunique() > 1
    group = done.dataset + " / " + done.colour if several_colours else done.dataset
    # In the table's order, as in the other pictures, whichever cells are left out.
    everywhere = table.dataset + " / " + table.colour if several_colours else table.dataset
    groups = [name for name in dict.fromkeys(everywhere) if name in set(group)]
    strategies = [name for name in dict.fromkeys(table.strategy) if name in set(done.strategy)]
    return _CostKey(
        group=group,
        colours={name: f"C{i % 10}" for i, name in enumerate(groups)},
        markers={name: MARKERS[i % len(MARKERS)] for i, name in enumerate(strategies)},
        title="dataset / colour" if several_colours else "dataset",
    )


def _draw_cost_cells(axes: Axes, done: pd.DataFrame, key: _CostKey) -> None:
    """Each cell's mean accuracy (sd error bars) at its wall time, the backbone beside it when
    there are several; a line that says so when no cell has both."""
    for (name, strategy), cells in done.groupby([key.group, done.strategy], sort=False):
        axes.errorbar(
            cells.wall_time_s,
            cells.test_acc_mean,
            yerr=cells.test_acc_sd.to_numpy(float),
            fmt=key.markers[strategy],
            color=key.colours[name],
            capsize=3,
            markersize=7,
            alpha=0.85,
        )
    if done.backbone.nunique() > 1:
        for _, cell in done.iterrows():
            axes.annotate(
                cell.backbone,
                (cell.wall_time_s, cell.test_acc_mean),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize="x-small",
                color="0.3",
            )
    if done.empty:
        axes.text(
            0.5,
            0.5,
            "no cell with both an accuracy and a wall time",
            ha="center",
            transform=axes.transAxes,
        )


def _log_time_axis(axes: Axes) -> None:
    """A log x axis labelled at each power of ten only, written out (1, 10, 100, 1000): no minor
    labels, which crowd into each other when the times span less than a decade or two."""
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(base=10, numticks=8))
    axes.xaxis.set_minor_locator(
        LogLocator(base=10, subs=[k / 10 for k in range(2, 10)], numticks=8)
    )
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def _cost_legends(figure: Figure, key: _CostKey) -> None:
    """Two legends right of the axes: the groups' colours above, the strategies' markers below."""
    figure.legend(
        [Line2D([], [], color=c, marker="o", linestyle="none") for c in key.colours.values()],
        list(key.colours),
        title=key.title,
        loc="outside right upper",
        fontsize="small",
    )
    figure.legend(
        [Line2D([], [], color="0.3", marker=m, linestyle="none") for m in key.markers.values()],
        list(key.markers),
        title="strategy",
        loc="outside right lower",
        fontsize="small",
    )


def learning_curves(curves: pd.DataFrame) -> Figure:
    """Validation accuracy per epoch: one panel per dataset x colour (all on the same y scale),
    one line per run, one colour per column (its short label); one legend above the panels."""
    curves = curves.assign(column=column_names(curves), row=curves.dataset + " / " + curves.colour)
    rows = list(dict.fromkeys(curves.row))
    colours = {c: f"C{i % 10}" for i, c in enumerate(dict.fromkeys(curves.column))}
    figure, panels = _panels(len(rows), width=4.2, height=3.2, sharey=True, columns=3)
    for axes, row in zip(panels, rows, strict=True):
        for (column, _run), run in curves[curves.row == row].groupby(["column", "run_id"]):
            axes.plot(
                run.epoch, run.val_acc, color=colours[column], alpha=0.8, marker=".", label=column
            )
        axes.set_title(row)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    for axes in panels[:: min(3, len(rows))]:
        axes.set_ylabel("validation accuracy")
    handles = [Line2D([], [], color=colour, marker=".") for colour in colours.values()]
    figure.legend(
        handles, list(colours), loc="outside upper center", ncols=min(len(colours), 4),
        fontsize="small",
    )  # fmt: skip
    return figure


def confusion(matrix: list[list[int]], classes: list[str], title: str) -> Figure:
    """One confusion matrix in counts (rows: true class, columns: predicted)."""
    counts = _square(matrix, classes, title)
    size = min(12.0, 2.5 + 0.45 * len(classes))
    figure, axes = plt.subplots(figsize=(size + 1.0, size), layout="constrained")
    image = _draw_confusion(axes, counts, classes, title, fraction=False)
    figure.colorbar(image, ax=axes, shrink=0.8, label="images")
    return figure


def confusion_grid(matrices: list[tuple[str, list[str], list[list[int]]]]) -> Figure:
    """Small multiples of (title, classes, matrix), in the given order, each row-normalised: the
    fraction of each true class predicted as each class (a class with no test image: blank row).
    One colour scale, 0 to 1, for all."""
    if not matrices:
        raise ValueError("confusion_grid needs at least one matrix")
    largest = max(len(classes) for _, classes, _ in matrices)
    size = min(6.0, 2.4 + 0.3 * largest)
    figure, panels = _panels(len(matrices), width=size, height=size, columns=3)
    for axes, (title, classes, matrix) in zip(panels, matrices, strict=True):
        counts = _square(matrix, classes, title)
        totals = counts.sum(axis=1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            fractions = np.where(totals > 0, counts / totals, np.nan)
        wrapped = _wrap(title, int(size * 10))  # ~10 characters of small text an inch
        image = _draw_confusion(axes, fractions, classes, wrapped, fraction=True)
        axes.title.set_fontsize("small")
    figure.colorbar(
        image, ax=panels, location="top", shrink=0.5, aspect=40, label="fraction of the true class"
    )
    return figure


def _panels(
    n: int, width: float, height: float, sharey: bool = False, columns: int = 4
) -> tuple[Figure, list[Axes]]:
    """n panels, at most `columns` a row; the grid's spare cells removed."""
    ncols = min(columns, n)
    nrows = math.ceil(n / ncols)
    figure, grid = plt.subplots(
        nrows,
        ncols,
        figsize=(width * ncols, height * nrows),
        squeeze=False,
        sharey=sharey,
        layout="constrained",
    )
    panels = list(grid.flat)
    for spare in panels[n:]:
        figure.delaxes(spare)
    return figure, panels[:n]


def _draw_confusion(
    axes: Axes, values: np.ndarray, classes: list[str], title: str, fraction: bool
) -> AxesImage:
    k = len(classes)
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if fraction else None)
    if k <= (12 if fraction else 30):
        top = np.nanmax(values) if np.isfinite(values).any() else 0
        for (i, j), value in np.ndenumerate(values):
            if np.isnan(value):
                continue
            text = f"{value:.2f}" if fraction else f"{int(value)}"
            colour = "white" if value > 0.5 * (1 if fraction else top) else "black"
            axes.text(j, i, text, ha="center", va="center", color=colour, fontsize="small")
    if k <= 40:
        axes.set_xticks(range(k), classes, rotation=90, fontsize="small")
        axes.set_yticks(range(k), classes, fontsize="small")
    else:
        axes.set_xticks([])
        axes.set_yticks([])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title, fontsize="medium")
    return image


def _square(matrix: list[list[int]], classes: list[str], title: str) -> np.ndarray:
    counts = np.asarray(matrix, dtype=float)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(
            f"{title}: a confusion matrix of {len(classes)} classes must be "
            f"{len(classes)} x {len(classes)}, not {counts.shape}"
        )
    return counts


def _wrap(title: str, width: int) -> str:
    """`title` with each of its lines wrapped at `width` characters (at spaces, else anywhere):
    a small panel's title never runs into its neighbour's."""
    return "\n".join(
        textwrap.fill(line, max(width, 8), break_long_words=True, break_on_hyphens=False)
        for line in title.split("\n")
    )
