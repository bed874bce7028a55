"""Decided verdicts (issue 33): per dataset x colour, the best strategy that trains the backbone
against the best that does not reads "better", "equivalent within ±δ" or "undecided" (with about
how many more seeds would decide it), on a bootstrap over seeds and test images; report.md opens
with them. Stores of constructed runs with per-image predictions, as the cell logs them."""

from __future__ import annotations

import re

import mlflow
import numpy as np
import pandas as pd
import pytest

from benchmark.report.verdicts import (
    BINOMIAL,
    IMAGES,
    TRAINS_VS_FROZEN,
    TUNED_VS_UNTUNED,
    declared_contrasts,
)
from tests.test_report import log_run, new_store, report_of

pytestmark = pytest.mark.foreign_runs  # runs written by hand


def predicted_run(
    client: mlflow.MlflowClient,
    experiment: str,
    cell: tuple[str, str, str],
    seed: int,
    correct: np.ndarray,
    order: int,
    predictions: bool = True,
) -> str:
    """A FINISHED run whose test images (`correct`: right or wrong, image by image; the same
    paths for every run) give its test_acc, with `test_predictions.json` as the cell logs it
    (`predictions=False`: an older run, test_acc and n_test only)."""
    n = len(correct)
    params = {"n_test": str(n)}
    run_id = log_run(
        client, experiment, (*cell, seed), "FINISHED", float(np.mean(correct)), order, params
    )
    if predictions:
        labels = ["ants" if i % 2 else "bees" for i in range(n)]
        other = {"ants": "bees", "bees": "ants"}
        predicted = [
            label if right else other[label] for label, right in zip(labels, correct, strict=True)
        ]
        paths = [f"{label}/{i:04d}.jpg" for i, label in enumerate(labels)]
        table = {"path": paths, "label": labels, "predicted": predicted}
        with mlflow.start_run(run_id=run_id):
            mlflow.log_table(table, "test_predictions.json")
    return run_id


def wrong_on(n: int, images: list[int] | range) -> np.ndarray:
    correct = np.ones(n, dtype=bool)
    correct[list(images)] = False
    return correct


def verdict_rows(markdown: str) -> pd.DataFrame:
    """The table report.md opens with, as a frame."""
    assert "**Verdicts**" in markdown, markdown[:500]
    block = markdown.split("**Verdicts**", 1)[1].strip().split("\n\n")[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return pd.DataFrame(rows, columns=header)


def test_a_wide_margin_reads_better(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    rng = np.random.default_rng(1)
    order = iter(range(100))
    for seed in range(3):
        finetune = rng.random(200) > 0.05  # ~0.95
        freeze = rng.random(200) > 0.30  # ~0.70
        predicted_run(client, experiment, ("hymenoptera", "rgb", "finetune"), seed, finetune,
                      next(order))  # fmt: skip
        predicted_run(client, experiment, ("hymenoptera", "rgb", "freeze"), seed, freeze,
                      next(order))  # fmt: skip
    _, markdown = report_of(uri, tmp_path / "out")
    head = markdown.split("**Verdicts**")[0]
    assert "| dataset" not in head  # the verdicts come first, before any table
    (row,) = verdict_rows(markdown).to_dict("records")
    assert row["recommendation"] == "finetune" and row["dataset"] == "hymenoptera"
    assert row["seeds"] == "3" and row["a (trains) vs b (frozen)"] == "finetune vs freeze"
    number = r"([-+]\d\.\d+)"
    said = re.fullmatch(rf"{number} \[{number}, {number}\]", row["difference a - b, interval"])
    assert said, row
    difference, low, high = map(float, said.groups())
    assert 0.15 < difference < 0.35 and 0 < low < difference < high
    assert "finetune better than freeze by" in markdown
    assert "## Exploratory" in markdown  # the t-tests: kept, labelled, out of the verdict


def test_the_same_to_within_0002_over_10_seeds_reads_equivalent(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    rng = np.random.default_rng(2)
    order = iter(range(100))
    n = 500
    for seed in range(10):
        finetune = rng.random(n) > 0.1
        freeze = finetune.copy()
        flip = int(np.flatnonzero(finetune if seed % 2 else ~finetune)[0])
        freeze[flip] = not freeze[flip]  # one image in 500 the other way: ±0.002
        predicted_run(client, experiment, ("hymenoptera", "rgb", "finetune"), seed, finetune,
                      next(order))  # fmt: skip
        predicted_run(client, experiment, ("hymenoptera", "rgb", "freeze"), seed, freeze,
                      next(order))  # fmt: skip
    _, markdown = report_of(uri, tmp_path / "out")
    (row,) = verdict_rows(markdown).itertuples(index=False)
    assert row.recommendation == "equivalent within ±0.02"
    assert row.seeds == "10"
    # A margin narrower than what the data can show: no longer equivalent, undecided instead.
    _, narrow = report_of(uri, tmp_path / "narrow", "--margin", "0.001")
    (row,) = verdict_rows(narrow).itertuples(index=False)
    assert row.recommendation.startswith("undecided")


def test_two_seeds_and_a_small_gap_read_undecided_with_the_seeds_that_would_decide(
    tmp_path, empty_store
):
    """finetune wrong on 100 of 1,000 images; freeze on the same 100 and 30 more on seed 0,
    10 more on seed 1: +0.03 and +0.01. Every bootstrap draw of 2 seeds lies between the two
    (a plain bootstrap would call it), but two seeds say little about the seeds' spread."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    n, order = 1000, iter(range(100))
    for seed, extra in ((0, 30), (1, 10)):
        predicted_run(client, experiment, ("hymenoptera", "rgb", "finetune"), seed,
                      wrong_on(n, range(100)), next(order))  # fmt: skip
        predicted_run(client, experiment, ("hymenoptera", "rgb", "freeze"), seed,
                      wrong_on(n, range(100 + extra)), next(order))  # fmt: skip
    _, markdown = report_of(uri, tmp_path / "out")
    (row,) = verdict_rows(markdown).itertuples(index=False)
    assert row.seeds == "2"
    assert row.recommendation.startswith("undecided, ~"), row.recommendation
    more = int(row.recommendation.split("~")[1].split()[0])
    assert 1 <= more <= 10  # t_{S-1} √(s²/S + v) < 0.02 at S = 6 (s² = 0.0002): 4 more
    assert "more seeds would decide it" in markdown


def test_a_cells_bootstrap_interval_widens_with_fewer_test_images(tmp_path, empty_store):
    """The same per-seed accuracies (0.90, 0.875, 0.90) on 400 and on 40 test images: the seeds
    spread them alike, the test images' own error is larger on 40. With per-image predictions,
    and (another colour) from test_acc x n_test alone, as for runs that logged none."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    for dataset, n in (("hymenoptera", 400), ("simpsons", 40)):
        for colour, predictions in (("rgb", True), ("gray", False)):
            for seed, accuracy in enumerate((0.90, 0.875, 0.90)):
                correct = wrong_on(n, range(round(n * (1 - accuracy))))
                predicted_run(client, experiment, (dataset, colour, "freeze"), seed, correct,
                              next(order), predictions)  # fmt: skip
    table, _ = report_of(uri, tmp_path / "out")
    table = table.set_index(["dataset", "colour"])
    width = table.boot_high - table.boot_low
    assert (table.boot_low <= table.test_acc_mean).all()
    assert (table.test_acc_mean <= table.boot_high).all()
    for colour, source in (("rgb", IMAGES), ("gray", BINOMIAL)):
        assert table.loc[("hymenoptera", colour)].boot_source == source
        assert width[("simpsons", colour)] > 1.3 * width[("hymenoptera", colour)], width


def test_the_declared_family_is_the_best_of_each_side_and_each_tuned_column_against_itself():
    """finetune and freeze, tuned (tune=fair) and not, with linear_probe: the best trained column
    against the best frozen one, and each tuned strategy against its untuned self; linear_probe
    (no trials: its C grid is its fit) is in no tuned pair."""
    rows = []
    means = {
        ("finetune", "tune=fair"): 0.90,
        ("finetune", "tune=none"): 0.80,
        ("freeze", "tune=fair"): 0.70,
        ("freeze", "tune=none"): 0.75,
        ("linear_probe", "tune=fair"): 0.85,
    }
    for (strategy, variant), mean in means.items():
        for seed in range(3):
            rows.append({
                "dataset": "hymenoptera", "colour": "rgb", "backbone": "b", "seed": seed,
                "strategy": strategy, "variant": variant, "column": f"{strategy} · {variant}",
                "tune_name": "fair" if variant == "tune=fair" else None,
                "test_acc": mean + 0.01 * seed,
            })  # fmt: skip
    contrasts = declared_contrasts(pd.DataFrame(rows))
    pairs = set(contrasts[["kind", "a", "b"]].itertuples(index=False, name=None))
    assert pairs == {
        (TRAINS_VS_FROZEN, "finetune · tune=fair", "linear_probe · tune=fair"),
        (TUNED_VS_UNTUNED, "finetune · tune=fair", "finetune · tune=none"),
        (TUNED_VS_UNTUNED, "freeze · tune=fair", "freeze · tune=none"),
    }


def test_one_setting_has_one_column_label_in_every_row_and_linear_probe_is_never_tuned(
    tmp_path, empty_store
):
    """The issue's case: rgb has a 10-epoch and a 2-epoch finetune, gray only the 2-epoch one;
    both 2-epoch cells sit in one column, labelled the same. linear_probe under tune=fair (its
    C grid is its fit: no trials) is not labelled tuned."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    for colour, epochs in (("rgb", "10"), ("rgb", "2"), ("gray", "2")):
        for seed in range(2):
            log_run(client, experiment, ("hymenoptera", colour, "finetune", seed), "FINISHED",
                    0.9 if epochs == "10" else 0.8, next(order),
                    {"trainer.max_epochs": epochs})  # fmt: skip
    fair = {"tune.name": "fair", "tune.trials": "16"}
    log_run(client, experiment, ("hymenoptera", "rgb", "linear_probe", 0), "FINISHED", 0.85,
            next(order), fair)  # fmt: skip
    table, markdown = report_of(uri, tmp_path / "out")
    header = next(line for line in markdown.splitlines() if line.startswith("| dataset"))
    columns = [c.strip() for c in header.strip("|").split("|") if not c.strip().startswith("study")]
    assert columns == [
        "dataset",
        "colour",
        "finetune · trainer.max_epochs=10",
        "finetune · trainer.max_epochs=2",
        "linear_probe",
    ], columns
    two = table[table.variant == "trainer.max_epochs=2"].set_index("colour")
    assert two.loc["gray"].n == 2 and two.loc["rgb"].n == 2
