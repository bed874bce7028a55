"""The pictures of the report: accuracy per cell, learning curves, confusion matrices."""

from __future__ import annotations

import base64
import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from benchmark.report.tables import column_names
from benchmark.tracking import plot_confusion


def png_data_uri(figure: Figure) -> str:
    """The figure as an inline image, so the HTML page is one self-contained file."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def accuracy_bars(table: pd.DataFrame) -> Figure:
    """Grouped bars: test accuracy ± sd per cell, the study's number as a black tick."""
    table = table.assign(column=column_names(table), row=table.dataset + "\n" + table.colour)
    rows, columns = list(dict.fromkeys(table.row)), list(dict.fromkeys(table.column))
    width = 0.8 / len(columns)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) * len(columns) ** 0.5), 4.5))
    for i, column in enumerate(columns):
        mine = table[table.column == column].set_index("row").reindex(rows)
        x = np.arange(len(rows)) + (i - (len(columns) - 1) / 2) * width
        axes.bar(
            x, mine.test_acc_mean, width, yerr=mine.test_acc_sd.fillna(0), capsize=3, label=column
        )
        axes.scatter(
            x,
            mine.study_val_acc,
            marker="_",
            s=400,
            color="black",
            zorder=3,
            label="study (max val)" if i == 0 else None,
        )
    axes.set_xticks(np.arange(len(rows)), rows)
    axes.set_ylabel("test accuracy")
    axes.set_ylim(max(0.0, np.nanmin(table.test_acc_mean.to_numpy(float)) - 0.15), 1.0)
    axes.legend(loc="lower right", fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def learning_curves(curves: pd.DataFrame) -> Figure:
    """Validation accuracy per epoch: one panel per dataset x colour, one line per run."""
    curves = curves.assign(column=column_names(curves), row=curves.dataset + " / " + curves.colour)
    rows = list(dict.fromkeys(curves.row))
    colours = {c: f"C{i}" for i, c in enumerate(dict.fromkeys(curves.column))}
    figure, panels = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6), squeeze=False)
    for axes, row in zip(panels[0], rows, strict=True):
        for (column, _run), run in curves[curves.row == row].groupby(["column", "run_id"]):
            axes.plot(
                run.epoch, run.val_acc, color=colours[column], alpha=0.8, marker=".", label=column
            )
        handles, labels = axes.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axes.legend(unique.values(), unique.keys(), fontsize="small", loc="lower right")
        axes.set_title(row)
        axes.set_xlabel("epoch")
        axes.set_ylabel("validation accuracy")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion(matrix: list[list[int]], classes: list[str], title: str) -> Figure:
    return plot_confusion(torch.tensor(matrix), classes, title)
