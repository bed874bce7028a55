"""Simpsons' second test (dataset.shift_test): the same trained model scored again on Kaggle's
official test set, its frames downscaled x0.357 (metrics shift_test_acc, artifact
shift_predictions.json). The report shows it as a row of its own, `simpsons · x0.357 shift`,
with its bootstrap interval from shift_predictions.json, never pooled with the native test and
in no verdict. Runs written with MLflow's client, as the cell logs them."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from benchmark.report.verdicts import IMAGES
from tests.test_report import log_run, new_store, report_of
from tests.test_verdicts import verdict_rows, wrong_on

pytestmark = pytest.mark.foreign_runs  # runs written by hand

SHIFT_ROW = "simpsons · x0.357 shift"
N_TEST, N_SHIFT = 400, 60


def shifted_run(client, experiment, cell, seed, native, shift, order):
    """A FINISHED run with both tests' per-image predictions, as the cell logs them."""
    params = {"n_test": str(len(native)), "n_shift": str(len(shift)), "dataset.shift_test": "True"}
    run_id = log_run(
        client, experiment, (*cell, seed), "FINISHED", float(np.mean(native)), order, params
    )
    client.log_metric(run_id, "shift_test_acc", float(np.mean(shift)))
    client.log_metric(run_id, "shift_test_loss", 1.0)
    with mlflow.start_run(run_id=run_id):
        for name, correct in (("test", native), ("shift", shift)):
            paths = [f"{name}/bart_simpson/{i:04d}.jpg" for i in range(len(correct))]
            predicted = ["bart_simpson" if right else "homer_simpson" for right in correct]
            table = {
                "path": paths,
                "label": ["bart_simpson"] * len(correct),
                "predicted": predicted,
            }
            mlflow.log_table(table, f"{name}_predictions.json")
    return run_id


@pytest.fixture
def shift_store(tmp_path, empty_store) -> str:
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    # An older finetune of seed 0 without the shift test: superseded by the one with it, and
    # never a column of its own (dataset.shift_test changes no native split).
    log_run(client, experiment, ("simpsons", "rgb", "finetune", 0), "FINISHED", 0.5, next(order),
            {"n_test": str(N_TEST)})  # fmt: skip
    for seed in range(3):
        for strategy, native_wrong, shift_wrong in (("finetune", 40, 24), ("freeze", 120, 36)):
            shifted_run(
                client, experiment, ("simpsons", "rgb", strategy), seed,
                wrong_on(N_TEST, range(native_wrong + 4 * seed)),
                wrong_on(N_SHIFT, range(shift_wrong + 2 * seed)), next(order),
            )  # fmt: skip
        for strategy, accuracy in (("finetune", 0.95), ("freeze", 0.93)):  # no shift test
            log_run(client, experiment, ("hymenoptera", "rgb", strategy, seed), "FINISHED",
                    accuracy + 0.01 * seed, next(order))  # fmt: skip
    return uri


def test_the_shift_test_is_a_row_of_its_own_with_its_bootstrap_interval(shift_store, tmp_path):
    table, markdown = report_of(shift_store, tmp_path / "out")
    cells = table.set_index(["dataset", "colour", "strategy"])
    assert set(table.dataset) == {"hymenoptera", "simpsons", SHIFT_ROW}
    assert table.variant.isna().all()  # dataset.shift_test labels no column
    native = cells.loc[("simpsons", "rgb", "finetune")]
    shift = cells.loc[(SHIFT_ROW, "rgb", "finetune")]
    # The native test: seeds 0-2 with it (0.5 superseded), (360 + 356 + 352) / 1200.
    assert native.n == 3 and native.test_acc_mean == pytest.approx(1068 / 1200, abs=1e-4)
    # The shift test: its own numbers, (36 + 34 + 32) / 180, never pooled with the native ones.
    assert shift.n == 3 and shift.test_acc_mean == pytest.approx(102 / 180, abs=1e-4)
    assert shift.boot_source == IMAGES  # from shift_predictions.json, image by image
    assert shift.boot_low < shift.test_acc_mean < shift.boot_high < native.boot_low
    assert shift.boot_high - shift.boot_low > 1.5 * (native.boot_high - native.boot_low)  # 60
    assert cells.loc[(SHIFT_ROW, "rgb", "freeze")].test_acc_mean == pytest.approx(
        (24 + 22 + 20) / 180, abs=1e-4
    )
    assert pd.notna(cells.loc[("hymenoptera", "rgb", "finetune")].boot_low)

    # The table: a row of its own, right after the native one.
    rows = [line.split("|")[1:3] for line in markdown.splitlines() if line.startswith("| ")]
    named = [(d.strip(), c.strip()) for d, c in rows if d.strip() not in ("dataset", ":---")]
    assert ("simpsons", "rgb") in named and (SHIFT_ROW, "rgb") in named
    assert named.index((SHIFT_ROW, "rgb")) == named.index(("simpsons", "rgb")) + 1
    header = next(line for line in markdown.splitlines() if line.startswith("| dataset"))
    assert "shift_test" not in header
    # In no verdict: its contrasts are exploratory.
    assert set(verdict_rows(markdown).dataset) == {"hymenoptera", "simpsons"}
    contrasts = markdown.split("## Primary contrasts")[1].split("## ")[0]
    assert "x0.357" not in contrasts
    exploratory = markdown.split("## Exploratory")[1].split("## ")[0]
    assert f"- {SHIFT_ROW} / rgb: finetune vs freeze: " in exploratory
    assert "a second test of the same trained models" in markdown  # the note says what it is
    # The cost and the diagnoses are the fits': said once, under the native row.
    cost = markdown.split("## Cost per cell")[1]
    assert "x0.357" not in cost
    # Its figure, beside the native one, in report.md and report.html.
    assert (
        "![simpsons · x0.357 shift: test accuracy per column](accuracy-3-simpsons-x0.357-shift.svg)"
        in (markdown)
    )
    assert (tmp_path / "out" / "accuracy-3-simpsons-x0.357-shift.svg").exists()
    page = (tmp_path / "out" / "report.html").read_text()
    assert f'<figure aria-label="{SHIFT_ROW}"><svg' in page
    csv = pd.read_csv(tmp_path / "out" / "report.csv")
    assert csv["shift"].tolist() == [d == SHIFT_ROW for d in csv.dataset]
