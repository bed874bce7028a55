"""Issue 37, the report's weak cases: each ends right, in one line naming the problem and the fix
where it is an error. A run whose test_acc is NaN or infinite is never ranked, averaged or tested,
and the report names it; runs of a `benchmark.schema` this code does not know are left out in one
line; a sweep folder with a quote in its path is reported like any other."""

from __future__ import annotations

import math
import re

import pytest

from benchmark.report.__main__ import main as report
from benchmark.tracking.identity import SCHEMA_TAG, SCHEMA_VERSION
from tests.test_report import log_run, new_store, report_of

# ---------------------------------------------------------------- 1. a non-finite test_acc

# (colour, strategy, seed, test_acc): NaN, +inf and -inf among finite seeds.
SCORES = [
    ("rgb", "finetune", 0, 0.90),
    ("rgb", "finetune", 1, 0.92),
    ("rgb", "finetune", 2, math.nan),
    ("rgb", "freeze", 0, 0.80),
    ("rgb", "freeze", 1, math.inf),
    ("rgb", "freeze", 2, 0.82),
    ("gray", "finetune", 0, 0.70),
    ("gray", "finetune", 1, 0.72),
    ("gray", "freeze", 0, 0.60),
    ("gray", "freeze", 1, -math.inf),
    ("gray", "freeze", 2, 0.62),
]
# A number the report must never print: NaN or infinity in any spelling, or the largest float,
# which MLflow's SQL stores keep in place of an infinity.
NOT_A_NUMBER = re.compile(r"(?i)\b(nan|inf|infinity)\b|e\+?308|1\.79769")
LEFT_OUT = "not a finite number"  # in the one line that names those runs


def test_a_non_finite_test_acc_is_never_ranked_or_averaged_and_the_report_names_its_run(
    tmp_path, empty_store, capsys
):
    client, uri, experiment = new_store(tmp_path, empty_store)
    left_out = {}
    for order, (colour, strategy, seed, score) in enumerate(SCORES):
        cell = ("hymenoptera", colour, strategy, seed)
        run_id = log_run(client, experiment, cell, "FINISHED", 0.5, order)
        client.log_metric(run_id, "test_acc", score, step=1)  # its test went wrong, not its fit
        if not math.isfinite(score):
            left_out[run_id] = (colour, strategy, seed)

    table, markdown = report_of(uri, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    csv = (tmp_path / "out" / "report.csv").read_text()
    cells = table.set_index(["colour", "strategy"])
    assert cells.loc[("rgb", "finetune"), "n"] == 2  # the NaN seed: not silently one seed fewer
    assert cells.loc[("rgb", "finetune"), "test_acc_mean"] == pytest.approx(0.91)
    assert cells.loc[("rgb", "freeze"), "test_acc_mean"] == pytest.approx(0.81)  # never inf
    assert cells.loc[("gray", "freeze"), "test_acc_mean"] == pytest.approx(0.61)
    assert "**0.910" in markdown and "**0.810" not in markdown  # the best is finetune, not +inf

    # Named where it is seen (report.md, the page's top, the terminal), run by run, in one line.
    err = capsys.readouterr().err
    said = [line for line in markdown.splitlines() if LEFT_OUT in line]
    assert len(said) == 1, markdown[:2000]
    top = page.split("<h2>")[0]  # above the verdicts: not folded away in a detail
    for run_id, (colour, strategy, seed) in left_out.items():
        assert f"hymenoptera / {colour} / {strategy} / seed {seed} (run {run_id}" in said[0]
        assert run_id in top and run_id in err
    assert said[0].count("(run ") == len(left_out) == 3
    for text in (markdown, page, csv, err):  # the values: only in the line that names them
        shown = "\n".join(line for line in text.splitlines() if LEFT_OUT not in line)
        assert not NOT_A_NUMBER.search(shown), NOT_A_NUMBER.search(shown)


# ---------------------------------------------------------------- 2. a schema unknown here

FUTURE = str(int(SCHEMA_VERSION) + 1)


def test_runs_of_a_schema_this_code_does_not_know_are_left_out_in_one_line(
    tmp_path, empty_store, capsys
):
    client, uri, experiment = new_store(tmp_path, empty_store)
    for order, (strategy, score) in enumerate([("finetune", 0.9), ("freeze", 0.8)]):
        log_run(client, experiment, ("hymenoptera", "rgb", strategy, 0), "FINISHED", score, order)
    for seed in (1, 2, 3):  # written by a later harness: its tags and metrics may mean otherwise
        newer = log_run(
            client, experiment, ("hymenoptera", "rgb", "freeze", seed), "FINISHED", 0.99, 10 + seed
        )
        client.set_tag(newer, SCHEMA_TAG, FUTURE)

    table, markdown = report_of(uri, tmp_path / "out")
    assert table.n.tolist() == [1, 1] and sorted(table.test_acc_mean) == [0.8, 0.9]
    said = [line for line in capsys.readouterr().err.splitlines() if SCHEMA_TAG in line]
    assert len(said) == 1, said
    for part in (f"3 run(s) of benchmark.schema {FUTURE}", f"(schema {SCHEMA_VERSION})",
                 "Left out: ", "with the harness version that wrote them", "rerun"):  # fmt: skip
        assert part in said[0]
        assert part in markdown  # and in the report itself

    only_newer = tmp_path / "newer"  # nothing but runs this code cannot read: one line, no report
    only_newer.mkdir()
    client, uri, experiment = new_store(only_newer, empty_store)
    log_run(client, experiment, ("hymenoptera", "rgb", "freeze", 0), "FINISHED", 0.99, 0)
    client.set_tag(client.search_runs([experiment])[0].info.run_id, SCHEMA_TAG, FUTURE)
    assert report(["--tracking-uri", uri, "--out", str(only_newer / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and f"1 run(s) of benchmark.schema {FUTURE}" in err[-1]
    assert "with the harness version that wrote them" in err[-1]
    assert not (only_newer / "out" / "report.md").exists()


# ---------------------------------------------------------------- 3. a quote in --sweep's folder


@pytest.mark.parametrize("name", ["it's a sweep", 'a "quoted" sweep', "back\\slash ' and \""])
def test_a_sweep_folder_with_a_quote_in_its_path_is_reported(tmp_path, empty_store, name):
    client, uri, experiment = new_store(tmp_path, empty_store)
    # The other sweep's folder differs only where the quotes are: one LIKE matches both.
    folders = {"mine": tmp_path / name, "other": tmp_path / re.sub(r"['\"\\\\]", "_", name)}
    for order, (which, strategy, score) in enumerate(
        [("mine", "finetune", 0.9), ("mine", "freeze", 0.8), ("other", "freeze", 0.1)]
    ):
        folders[which].mkdir(exist_ok=True)
        run_id = log_run(
            client, experiment, ("hymenoptera", "rgb", strategy, 0), "FINISHED", score, order
        )
        client.set_tag(run_id, "sweep", str(folders[which].resolve()))

    table, markdown = report_of(uri, tmp_path / "out", "--sweep", str(folders["mine"]))
    assert sorted(table.test_acc_mean) == [0.8, 0.9]  # its two runs, not the other sweep's
    assert f", sweep {folders['mine']}`" in markdown
    none = tmp_path / "no such ' sweep"
    assert (
        report(["--tracking-uri", uri, "--out", str(tmp_path / "none"), "--sweep", str(none)]) == 1
    )
