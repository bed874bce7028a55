"""The pictures of the report: accuracy per cell, cost against accuracy, learning curves,
confusion matrices; as inline PNG or SVG for a page that is one self-contained file.

Matplotlib only (no torch, no tracking store), so that the report starts quickly.
"""

from __future__ import annotations

import base64
import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

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


def accuracy_bars(table: pd.DataFrame) -> Figure:
    """Test accuracy (mean, sd error bars) per cell: one panel per dataset, its colours along x,
    one bar per strategy (/ backbone); the study's number as a black tick. Each panel's y-axis
    spans its own values (it does not start at 0); a cell without a finished seed shows its
    state ("failed", "not run"...) where its bar would be.

    Columns: dataset, colour, strategy, backbone, test_acc_mean, test_acc_sd; optionally
    study_val_acc and state.
    """
    table = table.assign(column=column_names(table))
    datasets = list(dict.fromkeys(table.dataset))
    columns = list(dict.fromkeys(table.column))
    width = 0.8 / len(columns)
    colours_per_panel = max(table.groupby("dataset").colour.nunique())
    panel_width = max(3.2, 0.8 + 0.45 * colours_per_panel * len(columns))
    figure, panels = plt.subplots(
        1,
        len(datasets),
        figsize=(panel_width * len(datasets), 4.2),
        squeeze=False,
        layout="constrained",
    )
    for axes, dataset in zip(panels[0], datasets, strict=True):
        mine = table[table.dataset == dataset]
        colours = list(dict.fromkeys(mine.colour))
        limits = _accuracy_limits(mine)
        for i, column in enumerate(columns):
            cells = mine[mine.column == column].set_index("colour").reindex(colours)
            x = np.arange(len(colours)) + (i - (len(columns) - 1) / 2) * width
            mean = cells.test_acc_mean.to_numpy(float)
            sd = cells.test_acc_sd.to_numpy(float)
            axes.bar(x, mean, width, yerr=sd, capsize=3, color=f"C{i}", label=column)
            if "study_val_acc" in cells:
                axes.scatter(
                    x,
                    cells.study_val_acc.to_numpy(float),
                    marker="_",
                    s=300,
                    color="black",
                    zorder=3,
                    label="study (max val)",
                )
            if "state" in cells:
                for where, state, value in zip(x, cells.state, mean, strict=True):
                    if np.isnan(value) and isinstance(state, str):
                        axes.text(
                            where,
                            limits[0],
                            f" {state}",
                            rotation=90,
                            ha="center",
                            va="bottom",
                            fontsize="small",
                            color="0.4",
                        )
        axes.set_xticks(np.arange(len(colours)), colours)
        axes.set_xlim(-0.5, len(colours) - 0.5)
        axes.set_ylim(*limits)
        axes.set_title(dataset)
        axes.grid(axis="y", alpha=0.3)
    panels[0][0].set_ylabel("test accuracy (mean ± sd over seeds)")
    _figure_legend(figure, panels[0])
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
    several_colours = done.colour.nunique() > 1
    group = done.dataset + " / " + done.colour if several_colours else done.dataset
    # In the table's order, as in the other pictures, whichever cells are left out.
    everywhere = table.dataset + " / " + table.colour if several_colours else table.dataset
    groups = [name for name in dict.fromkeys(everywhere) if name in set(group)]
    strategies = [name for name in dict.fromkeys(table.strategy) if name in set(done.strategy)]
    colours = {name: f"C{i % 10}" for i, name in enumerate(groups)}
    markers = {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(strategies)}
    figure, axes = plt.subplots(figsize=(7.5, 4.8), layout="constrained")
    for (name, strategy), cells in done.groupby([group, done.strategy], sort=False):
        axes.errorbar(
            cells.wall_time_s,
            cells.test_acc_mean,
            yerr=cells.test_acc_sd.to_numpy(float),
            fmt=markers[strategy],
            color=colours[name],
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
    axes.set_xscale("log")
    axes.set_xlabel("wall time per cell (s, log scale)")
    axes.set_ylabel("test accuracy (mean ± sd over seeds)")
    axes.grid(alpha=0.3, which="both")
    figure.legend(
        [Line2D([], [], color=colours[g], marker="o", linestyle="none") for g in groups],
        groups,
        title="dataset / colour" if several_colours else "dataset",
        loc="outside right upper",
        fontsize="small",
    )
    figure.legend(
        [Line2D([], [], color="0.3", marker=markers[s], linestyle="none") for s in strategies],
        strategies,
        title="strategy",
        loc="outside right lower",
        fontsize="small",
    )
    return figure


def learning_curves(curves: pd.DataFrame) -> Figure:
    """Validation accuracy per epoch: one panel per dataset x colour (all on the same y scale),
    one line per run, one colour per strategy (/ backbone)."""
    curves = curves.assign(column=column_names(curves), row=curves.dataset + " / " + curves.colour)
    rows = list(dict.fromkeys(curves.row))
    colours = {c: f"C{i % 10}" for i, c in enumerate(dict.fromkeys(curves.column))}
    figure, panels = _panels(len(rows), width=4.5, height=3.6, sharey=True)
    for axes, row in zip(panels, rows, strict=True):
        for (column, _run), run in curves[curves.row == row].groupby(["column", "run_id"]):
            axes.plot(
                run.epoch, run.val_acc, color=colours[column], alpha=0.8, marker=".", label=column
            )
        handles, labels = axes.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axes.legend(unique.values(), unique.keys(), fontsize="small", loc="lower right")
        axes.set_title(row)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    for axes in panels[:: min(4, len(rows))]:
        axes.set_ylabel("validation accuracy")
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
        image = _draw_confusion(axes, fractions, classes, title, fraction=True)
    figure.colorbar(image, ax=panels, shrink=0.6, label="fraction of the true class")
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


def _accuracy_limits(cells: pd.DataFrame) -> tuple[float, float]:
    """A y range around the panel's means ± sd and study numbers, within [0, 1]."""
    mean, sd = cells.test_acc_mean.astype(float), cells.test_acc_sd.astype(float).fillna(0)
    values = pd.concat([mean - sd, mean + sd, cells.get("study_val_acc", pd.Series(dtype=float))])
    values = values.astype(float).dropna()
    if values.empty:
        return 0.0, 1.0
    low, high = values.min(), values.max()
    pad = max(0.02, 0.15 * (high - low))
    return max(0.0, low - pad), min(1.0, high + pad)


def _figure_legend(figure: Figure, panels: list[Axes]) -> None:
    """One legend for all panels, right of them, each label once."""
    unique: dict[str, Artist] = {}
    for axes in panels:
        for handle, label in zip(*axes.get_legend_handles_labels(), strict=True):
            unique.setdefault(label, handle)
    figure.legend(
        list(unique.values()), list(unique.keys()), loc="outside right upper", fontsize="small"
    )
