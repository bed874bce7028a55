"""The report marks what may not be a trustworthy number: a cell whose seeds diverged, ended below
the fitted head they started from, may be undertrained (validation accuracy still rising at the
last epoch, or a low final training accuracy) or overfit, each with its own mark; a cell whose
convergence was never logged, a cell whose seeds ran on different commits; and it names the
commits its runs came from. Runs written with MLflow's client, as the cell logs them."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from benchmark.tracking.identity import GIT_COMMIT_TAG, GIT_DIRTY_TAG
from tests.test_report import log_run, new_store, report_of

pytestmark = pytest.mark.foreign_runs  # runs written by hand

A, B = "a" * 40, "b" * 40
CONVERGED = {
    "final_train_loss": 0.1,
    "final_train_acc": 0.98,
    "best_val_epoch": 4,
    "epochs_run": 10,
}
RISING = CONVERGED | {"best_val_epoch": 9}  # best at the last of 10 epochs: still rising
LOW = CONVERGED | {"final_train_acc": 0.6}
NEAR_END = CONVERGED | {"best_val_epoch": 8}  # best at the one before the last


def cell_run(
    client, experiment, cell, seed, accuracy, order, metrics=None, commit=A, dirty="false",
    params=None,
):  # fmt: skip
    run_id = log_run(client, experiment, (*cell, seed), "FINISHED", accuracy, order, params)
    if metrics and "final_val_acc" not in metrics:
        # The cell logs its last epoch's validation accuracy with the others: the best's when
        # the best is the last epoch, else (unless said) a little under it.
        last = metrics["best_val_epoch"] == metrics["epochs_run"] - 1
        metrics = metrics | {"final_val_acc": accuracy if last else accuracy - 0.02}
    for name, value in (metrics or {}).items():
        client.log_metric(run_id, name, value)
    if commit is not None:
        client.set_tag(run_id, GIT_COMMIT_TAG, commit)
        client.set_tag(run_id, GIT_DIRTY_TAG, dirty)
    return run_id


@pytest.fixture
def trust_store(tmp_path, empty_store) -> str:
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    for seed, accuracy in enumerate([0.90, 0.91, 0.93]):  # converged, all on commit A
        cell_run(client, experiment, ("hymenoptera", "rgb", "finetune"), seed, accuracy,
                 next(order), CONVERGED)  # fmt: skip
    for seed, accuracy in enumerate([0.95, 0.96, 0.98]):  # seed 1 still rising
        metrics = RISING if seed == 1 else CONVERGED
        cell_run(client, experiment, ("hymenoptera", "rgb", "freeze"), seed, accuracy,
                 next(order), metrics)  # fmt: skip
    # gray: finetune's seed 0 trained to a low accuracy, seed 1 best one epoch before the end;
    # freeze's seeds ran on two commits (one with uncommitted changes) and never logged it.
    cell_run(client, experiment, ("hymenoptera", "gray", "finetune"), 0, 0.8, next(order), LOW)
    cell_run(client, experiment, ("hymenoptera", "gray", "finetune"), 1, 0.82, next(order),
             NEAR_END)  # fmt: skip
    cell_run(client, experiment, ("hymenoptera", "gray", "freeze"), 0, 0.85, next(order))
    cell_run(client, experiment, ("hymenoptera", "gray", "freeze"), 1, 0.86, next(order),
             commit=B, dirty="true")  # fmt: skip
    # linear_probe: no epochs, no convergence metrics; exempt, not "not logged".
    cell_run(client, experiment, ("hymenoptera", "rgb", "linear_probe"), 0, 0.9, next(order))
    return uri


def cell(table: pd.DataFrame, colour: str, strategy: str) -> pd.Series:
    return table.set_index(["dataset", "colour", "strategy"]).loc[("hymenoptera", colour, strategy)]


def row(markdown: str, colour: str) -> str:
    lines = markdown.splitlines()
    return next(line for line in lines if re.match(rf"\| hymenoptera +\| {colour} ", line))


def test_a_cell_still_rising_at_its_last_epoch_is_marked_and_a_converged_one_is_not(
    trust_store, tmp_path
):
    table, markdown = report_of(trust_store, tmp_path / "out")
    assert cell(table, "rgb", "freeze").convergence == "may be undertrained"
    assert cell(table, "rgb", "finetune").convergence == "converged"
    rgb = row(markdown, "rgb")
    assert "0.963 ± 0.015 [0.925, 1.000] (n=3) †" in rgb  # freeze: marked
    assert re.search(r"0\.913 ± 0\.015 \[0\.875, 0\.951\] \(n=3\) +\|", rgb)  # finetune: not
    note = next(line for line in markdown.splitlines() if line.startswith("† May be"))
    assert "hymenoptera / rgb / freeze (seed 1: val acc best at epoch 10 of 10)" in note
    assert "rgb / finetune" not in note
    # The verdict and the ranking that rest on it say so.
    verdict = next(line for line in markdown.splitlines() if "rgb: finetune vs freeze" in line)
    assert "(† rests on freeze, which may be undertrained)" in verdict
    assert re.search(r"\| +rows with † \|", markdown)
    # the same in the page and the LaTeX
    assert "hymenoptera / rgb / freeze (seed 1" in (tmp_path / "out" / "report.html").read_text()
    assert r"(n=3) \dag{}" in (tmp_path / "out" / "report.tex").read_text()


def test_a_low_final_training_accuracy_is_marked_and_both_thresholds_are_options(
    trust_store, tmp_path
):
    table, markdown = report_of(trust_store, tmp_path / "out")
    gray = cell(table, "gray", "finetune")
    assert gray.undertrained and gray.undertrained_why == "seed 0: train acc 0.600"  # not seed 1
    assert gray.convergence_why == "may be undertrained: seed 0: train acc 0.600"
    assert "below 0.9" in markdown
    table, markdown = report_of(trust_store, tmp_path / "lenient", "--min-train-acc", "0.5")
    assert cell(table, "gray", "finetune").convergence == "converged"
    assert "below 0.5" in markdown
    table, _ = report_of(trust_store, tmp_path / "window", "--rising-epochs", "2")
    assert cell(table, "gray", "finetune").convergence_why == (
        "may be undertrained: seed 0: train acc 0.600; seed 1: val acc best at epoch 9 of 10"
    )


def test_old_runs_say_convergence_not_logged_and_linear_probe_is_exempt(trust_store, tmp_path):
    table, markdown = report_of(trust_store, tmp_path / "out")
    freeze = cell(table, "gray", "freeze")
    assert freeze.convergence == "convergence not logged" and not freeze.undertrained
    probe = cell(table, "rgb", "linear_probe")
    assert probe.convergence == "exempt (no epochs)" and not probe.undertrained
    lines = markdown.splitlines()
    unlogged = next(line for line in lines if line.startswith("Convergence not logged"))
    assert unlogged.endswith(": hymenoptera / gray / freeze.")  # linear_probe is not listed
    assert any(line.startswith("linear_probe: exempt") for line in lines)


def test_seeds_on_different_commits_are_marked_and_the_commits_listed(trust_store, tmp_path):
    table, markdown = report_of(trust_store, tmp_path / "out")
    assert cell(table, "gray", "freeze").mixed_commits
    assert not cell(table, "rgb", "freeze").mixed_commits
    assert cell(table, "rgb", "finetune").commits == A[:10]
    assert "(n=2) ‡" in row(markdown, "gray")
    mixed = next(line for line in markdown.splitlines() if line.startswith("‡ Seeds"))
    assert f"hymenoptera / gray / freeze (seed 0: {A[:10]}; seed 1: {B[:10]}+dirty)" in mixed
    assert mixed.count("hymenoptera /") == 1
    code = next(line for line in markdown.splitlines() if line.startswith("Code of the"))
    assert f"{A[:10]} (10 runs)" in code and f"{B[:10]} with uncommitted changes (1 run)" in code


def test_a_threshold_out_of_range_is_one_clear_line(trust_store, tmp_path, capsys):
    from benchmark.report.__main__ import main as report

    assert (
        report(["--tracking-uri", trust_store, "--min-train-acc", "90", "--out", str(tmp_path)])
        == 1
    )
    assert capsys.readouterr().err.strip() == "error: min_train_acc=90.0: use a value in [0, 1]"


def test_each_diagnosis_has_its_own_mark_note_and_caveat_on_a_verdict(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    # finetune: best at its first epoch, then fell far (seed 1 from 0.98 to 0.51): diverged.
    peaked = CONVERGED | {"best_val_epoch": 0, "final_train_acc": 0.95}
    for seed, (best, last) in enumerate([(0.97, 0.60), (0.98, 0.512), (0.96, 0.69)]):
        cell_run(client, experiment, ("hymenoptera", "rgb", "finetune"), seed, best, next(order),
                 peaked | {"final_val_acc": last})  # fmt: skip
    # lp_ft: selection kept the probe's head on seed 0 (no trained epoch beat it).
    probe = {"strategy.head_init": "probe"}
    for seed, accuracy in enumerate([0.94, 0.95, 0.96]):
        start = accuracy if seed == 0 else accuracy - 0.05
        kept = {"best_val_epoch": -1} if seed == 0 else {}
        metrics = CONVERGED | kept | {"start_val_acc": start, "lp_val_acc": start}
        cell_run(client, experiment, ("hymenoptera", "rgb", "lp_ft"), seed, accuracy, next(order),
                 metrics, params=probe)  # fmt: skip
    # freeze: training fitted to 1.0 while validation fell 0.08 from its best: overfit.
    for seed, accuracy in enumerate([0.90, 0.91, 0.92]):
        metrics = CONVERGED | {"final_train_acc": 1.0, "final_val_acc": accuracy - 0.08}
        cell_run(client, experiment, ("hymenoptera", "rgb", "freeze"), seed, accuracy, next(order),
                 metrics)  # fmt: skip

    table, markdown = report_of(uri, tmp_path / "out")
    assert cell(table, "rgb", "finetune").convergence == "diverged"
    assert cell(table, "rgb", "lp_ft").convergence == "below its start"
    assert cell(table, "rgb", "freeze").convergence == "overfit"
    rgb = row(markdown, "rgb")
    # finetune (the best mean: bold), freeze, lp_ft
    assert re.search(r"\(n=3\) §\*\* +\|.*\(n=3\) ‖ +\|.*\(n=3\) ¶ +\|", rgb)
    lines = markdown.splitlines()
    diverged = next(line for line in lines if line.startswith("§ Diverged"))
    assert "more than 0.1 below that best" in diverged  # the rule's threshold
    assert "seed 1: val 0.980 at epoch 1 → 0.512 at epoch 10" in diverged
    below = next(line for line in lines if line.startswith("¶ Below its start"))
    assert "hymenoptera / rgb / lp_ft (seed 0: selection kept the start (val 0.940)" in below
    assert "seed 1" not in below
    overfit = next(line for line in lines if line.startswith("‖ Overfit"))
    assert "at least 0.99" in overfit and "seed 2: train acc 1.000, val 0.920 at epoch 5" in overfit
    assert next(line for line in lines if line.startswith("† May be")).endswith(": no cell.")
    # A verdict says which mark it rests on; the ranking counts each mark's rows.
    verdict = next(line for line in lines if "rgb: finetune vs lp" in line)
    assert (
        "(§ rests on finetune, which diverged; ¶ rests on lp_ft, which ended below its start)"
        in verdict
    )
    assert re.search(r"\| +rows with § \| +rows with ¶ \| +rows with ‖ \|", markdown)
    # Thresholds are options.
    table, _ = report_of(
        uri, tmp_path / "lenient", "--diverged-drop", "0.5", "--overfit-drop", "0.1"
    )
    assert cell(table, "rgb", "finetune").convergence == "converged"
    assert cell(table, "rgb", "freeze").convergence == "converged"
    # the same marks in the page and the LaTeX
    assert (
        "hymenoptera / rgb / finetune (seed 0: val 0.970"
        in (tmp_path / "out" / "report.html").read_text()
    )
    latex = (tmp_path / "out" / "report.tex").read_text()
    assert r"(n=3) \S{}" in latex and r"(n=3) \P{}" in latex and r"(n=3) \textbardbl{}" in latex
