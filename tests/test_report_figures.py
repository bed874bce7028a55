"""benchmark.report.figures on small synthetic tables: what each picture draws, read back from
its matplotlib artists (Agg backend, nothing shown)."""

from __future__ import annotations

import base64
from itertools import combinations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.transforms import Bbox

from benchmark.report import figures

BASE = {"hymenoptera": 0.93, "dogs_vs_cats": 0.98}
STRATEGIES = ["finetune", "freeze", "linear_probe"]
TIMES = {"finetune": 300.0, "freeze": 60.0, "linear_probe": 20.0}


def summary(backbones: tuple[str, ...] = ("efficientnet_lite0",)) -> pd.DataFrame:
    """Like report.tables.summarise: 2 datasets x 2 colours x 3 strategies; one cell failed."""
    rows = [
        {
            "dataset": dataset,
            "colour": colour,
            "strategy": strategy,
            "backbone": backbone,
            "test_acc_mean": base - 0.02 * i - 0.01 * (colour == "gray") - 0.005 * j,
            "test_acc_sd": 0.01 + 0.002 * i,
            "wall_time_s": TIMES[strategy] * (1 + j),
            "study_val_acc": base if strategy != "linear_probe" else np.nan,
            "state": "finished",
        }
        for dataset, base in BASE.items()
        for colour in ["rgb", "gray"]
        for i, strategy in enumerate(STRATEGIES)
        for j, backbone in enumerate(backbones)
    ]
    table = pd.DataFrame(rows)
    failed = (
        (table.dataset == "hymenoptera") & (table.colour == "gray") & (table.strategy == "freeze")
    )
    table.loc[failed, ["test_acc_mean", "test_acc_sd", "wall_time_s"]] = np.nan
    table.loc[failed, "state"] = "failed"
    return table


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_png_data_uri_and_svg_markup_close_the_figure():
    figure, axes = plt.subplots()
    axes.plot([0, 1], [0, 1])
    axes.set_title("a title")
    uri = figures.png_data_uri(figure)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG")
    assert not plt.fignum_exists(figure.number)

    figure, axes = plt.subplots()
    axes.set_title("a title")
    svg = figures.svg_markup(figure)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert ">a title</text>" in svg  # text as text, not glyph paths
    assert not plt.fignum_exists(figure.number)


def drawn_texts(figure) -> list[tuple[str, Bbox]]:
    """Every piece of text the figure draws (titles, axis labels, the tick labels inside the
    axes' view, texts, legends) with its box on the canvas, in pixels."""
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    texts = [t for legend in figure.legends for t in [legend.get_title(), *legend.get_texts()]]
    for axes in figure.axes:
        texts += [axes.title, axes.xaxis.label, axes.yaxis.label, *axes.texts]
        if axes.get_legend() is not None:
            texts += [axes.get_legend().get_title(), *axes.get_legend().get_texts()]
        for axis in (axes.xaxis, axes.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]:
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9 and tick.label1.get_visible():
                    texts.append(tick.label1)
    return [
        (t.get_text(), t.get_window_extent(renderer))
        for t in texts
        if t.get_visible() and t.get_text().strip()
    ]


def overlapping(figure) -> list[tuple[str, str]]:
    """The pairs of drawn texts whose boxes overlap by more than a pixel."""
    out = []
    for (a, box_a), (b, box_b) in combinations(drawn_texts(figure), 2):
        shrunk_a, shrunk_b = box_a.padded(-1), box_b.padded(-1)
        if shrunk_a.width > 0 and shrunk_b.width > 0 and shrunk_a.overlaps(shrunk_b):
            out.append((a, b))
    return out


def test_accuracy_dots_one_figure_per_dataset_on_one_range_with_each_interval():
    """A dot per colour at the mean, a line across the interval (the bootstrap's where the cell
    has one, else the t interval), one y line per column in the given order; the same x range
    for every dataset, holding every interval, up to 1; a failed cell says so."""
    table = summary()
    table = table.assign(
        test_acc_ci_low=table.test_acc_mean - 0.05, test_acc_ci_high=table.test_acc_mean + 0.03
    )
    booted = table.dataset.eq("dogs_vs_cats")  # these have a bootstrap interval
    table["boot_low"] = (table.test_acc_mean - 0.01).where(booted)
    table["boot_high"] = (table.test_acc_mean + 0.02).where(booted)
    limits = figures.accuracy_range(table)
    lowest = (table.test_acc_mean - 0.05).min()
    assert limits[1] == 1.0 and limits[0] <= lowest - 0.02 and limits[0] > lowest - 0.08
    assert round(limits[0] * 20, 9) == int(round(limits[0] * 20, 9))  # a multiple of 0.05
    for dataset in BASE:
        figure = figures.accuracy_dots(table, dataset, limits, STRATEGIES)
        (axes,) = figure.axes
        assert axes.get_title() == dataset and axes.get_xlim() == limits
        assert [t.get_text() for t in axes.get_yticklabels()] == STRATEGIES
        bars = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
        assert [b.get_label() for b in bars] == ["rgb", "gray"]
        mine = table[table.dataset == dataset].set_index(["colour", "strategy"])
        for bar, colour in zip(bars, ["rgb", "gray"], strict=True):
            means = bar.lines[0].get_xdata()
            expected = mine.loc[colour].reindex(STRATEGIES).test_acc_mean.to_numpy()
            assert means == pytest.approx(expected, nan_ok=True)
            (segments,) = bar.lines[2]
            low, high = (-0.01, 0.02) if dataset == "dogs_vs_cats" else (-0.05, 0.03)
            for segment, mean in zip(segments.get_segments(), expected, strict=True):
                if np.isfinite(mean):  # a failed cell: no line
                    (a, _), (b, _) = segment
                    assert (a - mean, b - mean) == pytest.approx((low, high))
        assert not overlapping(figure), overlapping(figure)
    failed = figures.accuracy_dots(table, "hymenoptera", limits, STRATEGIES)
    assert "gray: failed" in [t.get_text().strip() for t in failed.axes[0].texts]
    assert figures.accuracy_dots(table.drop(columns=["state"]), "hymenoptera").axes


def test_no_figure_draws_text_over_text():
    """Long column labels and titles, times within less than a decade and over four: every
    label, tick label, title and legend entry clear of the others (measured on the canvas)."""
    table = summary().assign(
        strategy=lambda t: t.strategy + " · tune=fair, tune.reuse_seed=0 · tuned (at most 8 trials)"
    )
    for times in ((30.0, 55.0), (0.7, 1400.0)):
        cost = table.assign(wall_time_s=np.linspace(*times, len(table)))
        figure = figures.cost_vs_accuracy(cost)
        assert not overlapping(figure), (times, overlapping(figure))
        # Plain numbers: mathtext ($10^{2}$) goes into the page's SVG glyph by glyph, each at a
        # position measured in matplotlib's font, and runs together in the browser's.
        ticks = [t.get_text() for t in figure.axes[0].get_xticklabels() if t.get_text()]
        assert ticks and not [t for t in ticks if "$" in t], ticks
    long_titles = [
        (f"hymenoptera / rgb\nfinetune · tune=fair, tune.reuse_seed=0 · tuned (at most 8 trials), "
         f"seed {i}",
         ["ants", "bees"], [[8, 2], [1, 9]])
        for i in range(4)
    ]  # fmt: skip
    grid = figures.confusion_grid(long_titles)
    assert not overlapping(grid), overlapping(grid)


def test_cost_vs_accuracy_log_time_marker_per_strategy_colour_per_dataset():
    table = summary()
    table.loc[0, "test_acc_mean"] = np.nan  # a time but no accuracy
    table.loc[1, "wall_time_s"] = np.nan  # an accuracy but no time
    figure = figures.cost_vs_accuracy(table)
    (axes,) = figure.axes
    assert axes.get_xscale() == "log"
    points = [c for c in axes.containers if isinstance(c, ErrorbarContainer)]
    done = table.dropna(subset=["test_acc_mean", "wall_time_s"])
    assert sum(len(p.lines[0].get_xdata()) for p in points) == len(done) == 12 - 3
    xs = np.concatenate([p.lines[0].get_xdata() for p in points])
    assert sorted(xs) == sorted(done.wall_time_s)
    marker = {}
    colour = {}
    for p in points:
        line = p.lines[0]
        (x, y) = line.get_xdata()[0], line.get_ydata()[0]
        cell = done[(done.wall_time_s == x) & np.isclose(done.test_acc_mean, y)].iloc[0]
        marker.setdefault(cell.strategy, set()).add(line.get_marker())
        colour.setdefault(cell.dataset + "/" + cell.colour, set()).add(line.get_color())
    assert all(len(m) == 1 for m in marker.values()) and len(set.union(*marker.values())) == 3
    assert all(len(c) == 1 for c in colour.values()) and len(set.union(*colour.values())) == 4
    legends = [[t.get_text() for t in legend.get_texts()] for legend in figure.legends]
    assert legends == [
        ["hymenoptera / rgb", "hymenoptera / gray", "dogs_vs_cats / rgb", "dogs_vs_cats / gray"],
        STRATEGIES,
    ]
    assert not axes.texts  # one backbone: no labels beside the points


def test_cost_vs_accuracy_names_backbones_and_survives_no_data():
    figure = figures.cost_vs_accuracy(summary(("resnet18", "vgg16")))
    labels = {t.get_text() for t in figure.axes[0].texts}
    assert labels == {"resnet18", "vgg16"}
    empty = figures.cost_vs_accuracy(summary().assign(wall_time_s=np.nan))
    assert empty.axes[0].get_xscale() == "log"


def test_learning_curves_share_the_y_scale():
    curves = pd.DataFrame(
        [
            {
                "dataset": dataset,
                "colour": colour,
                "strategy": strategy,
                "backbone": "efficientnet_lite0",
                "run_id": f"{dataset}-{colour}-{strategy}-{seed}",
                "epoch": epoch,
                "val_acc": start + 0.02 * epoch + 0.01 * seed,
            }
            for dataset, start in [("hymenoptera", 0.85), ("caltech256", 0.4)]
            for colour in ["rgb", "gray"]
            for strategy in ["finetune", "freeze"]
            for seed in range(2)
            for epoch in range(5)
        ]
    )
    figure = figures.learning_curves(curves)
    assert len(figure.axes) == 4
    limits = {axes.get_ylim() for axes in figure.axes}
    assert len(limits) == 1
    (low, high) = limits.pop()
    assert low <= 0.4 and high >= 0.85 + 0.08 + 0.01
    assert [len(axes.lines) for axes in figure.axes] == [4] * 4
    assert figure.axes[0].get_title() == "hymenoptera / rgb"


MATRICES = [
    ("hymenoptera / rgb", ["ants", "bees"], [[8, 2], [1, 9]]),
    ("three", ["a", "b", "c"], [[3, 1, 0], [0, 0, 0], [2, 2, 6]]),  # b: no test image
    ("many", [f"c{i}" for i in range(50)], (np.eye(50, dtype=int) * 5 + 1).tolist()),
]


def test_confusion_grid_row_normalised_in_order():
    figure = figures.confusion_grid(MATRICES)
    panels = [axes for axes in figure.axes if axes.images]
    assert [axes.get_title() for axes in panels] == [title for title, _, _ in MATRICES]
    assert len(figure.axes) == len(MATRICES) + 1  # and one colour bar
    for axes, (_, _, matrix) in zip(panels, MATRICES, strict=True):
        image = axes.images[0]
        fractions = np.ma.filled(image.get_array().astype(float), np.nan)
        counts = np.array(matrix)
        present = counts.sum(axis=1) > 0
        assert np.nansum(fractions, axis=1)[present] == pytest.approx(1.0)
        assert np.isnan(fractions[~present]).all()
        assert image.get_clim() == (0, 1)
    assert panels[0].images[0].get_array()[0, 0] == pytest.approx(0.8)
    assert "0.80" in [t.get_text() for t in panels[0].texts]
    assert not panels[2].texts  # 50 classes: no numbers


def test_confusion_in_counts_and_refusals():
    figure = figures.confusion([[8, 2], [1, 9]], ["ants", "bees"], "hymenoptera seed 0")
    image = figure.axes[0].images[0]
    assert image.get_array().tolist() == [[8, 2], [1, 9]]
    assert figure.axes[0].get_title() == "hymenoptera seed 0"
    with pytest.raises(ValueError, match="2 x 2"):
        figures.confusion([[1, 2, 3]], ["a", "b"], "bad")
    with pytest.raises(ValueError):
        figures.confusion_grid([])
