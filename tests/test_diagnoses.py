"""A cell's fits are diagnosed one way each, with its own mark and the seeds' numbers: diverged
(validation peaked early and fell far), below its start (a fine-tune from a fitted head that never
beat it), may be undertrained (still rising at the end, or low training accuracy), overfit
(training fitted while validation fell from its best). Constructed runs frames, no store."""

from __future__ import annotations

import pandas as pd
import pytest

from benchmark.report.trust import DEFAULT_RULE, ConvergenceRule, cell_checks

BY = ["dataset", "colour", "strategy"]
DIAGNOSIS_COLUMNS = ["diverged", "below_start", "undertrained", "overfit"]
# How a run of the current cell ends when nothing went wrong: best at epoch 5 of 10 (0-based 4),
# its last epoch a little under it, training fitted but not to 0.99.
FINE = {
    "final_train_loss": 0.1,
    "final_train_acc": 0.97,
    "best_val_epoch": 4,
    "epochs_run": 10,
    "best_val_acc": 0.93,
    "final_val_acc": 0.92,
}


def runs(strategy: str, *seeds: dict[str, object]) -> pd.DataFrame:
    """One cell's runs, seed i ending as `seeds[i]` says (FINE where it says nothing)."""
    return pd.DataFrame(
        [
            {"dataset": "hymenoptera", "colour": "rgb", "strategy": strategy, "seed": str(i)}
            | FINE
            | metrics
            for i, metrics in enumerate(seeds)
        ]
    )


def checked(frame: pd.DataFrame, rule: ConvergenceRule = DEFAULT_RULE) -> pd.Series:
    cells = cell_checks(frame, BY, rule)
    assert len(cells) == 1
    return cells.iloc[0]


def marked(cell: pd.Series) -> list[str]:
    return [c for c in DIAGNOSIS_COLUMNS if cell[c]]


def test_a_finetune_that_peaked_at_its_first_epoch_and_fell_diverged_not_undertrained():
    # The tuned Hymenoptera finetune: 0.98 after the first of 10 epochs, then 0.51-0.69 on every
    # seed, training accuracy 0.95: the number is a 1-epoch model rescued by selection.
    peak = {"best_val_epoch": 0, "best_val_acc": 0.98, "final_train_acc": 0.95}
    cell = checked(
        runs(
            "finetune",
            peak | {"final_val_acc": 0.512},
            peak | {"final_val_acc": 0.69},
            peak | {"final_val_acc": 0.6},
        )
    )
    assert cell.convergence == "diverged" and cell.marks == "§"
    assert marked(cell) == ["diverged"]
    assert cell.diverged_why == (
        "seed 0: val 0.980 at epoch 1 → 0.512 at epoch 10; "
        "seed 1: val 0.980 at epoch 1 → 0.690 at epoch 10; "
        "seed 2: val 0.980 at epoch 1 → 0.600 at epoch 10"
    )
    assert cell.convergence_why == "diverged: " + cell.diverged_why


def test_a_fall_from_a_late_peak_or_a_small_fall_is_not_divergence():
    late = {"best_val_epoch": 5, "best_val_acc": 0.98, "final_val_acc": 0.6}  # epoch 6 of 10
    small = {"best_val_epoch": 0, "best_val_acc": 0.98, "final_val_acc": 0.88}  # exactly 0.10
    for ending in (late, small):
        cell = checked(runs("finetune", ending))
        assert marked(cell) == [] and cell.convergence == "converged"
    # The threshold is the rule's: a lower one marks the small fall.
    cell = checked(runs("finetune", small), ConvergenceRule(diverged_drop=0.05))
    assert marked(cell) == ["diverged"]


def test_an_lp_ft_run_whose_fit_never_beat_its_probe_is_below_its_start():
    # Code from before the start was a candidate: the probe's accuracy (lp_val_acc) is the start,
    # and the best trained epoch fell short of it; no final_val_acc logged yet.
    old = {"lp_val_acc": 0.95, "best_val_acc": 0.93, "best_val_epoch": 3, "final_val_acc": None}
    cell = checked(runs("lp_ft", old))
    assert cell.convergence == "below its start" and cell.marks == "¶"
    assert marked(cell) == ["below_start"]
    assert cell.below_start_why == "seed 0: best trained val 0.930 at epoch 4 < probe's 0.950"
    assert cell.not_logged == "diverged, overfit"  # no final_val_acc: not taken for clear
    # The current cell: the start is a candidate, and selection kept it (best epoch -1).
    kept = {"start_val_acc": 0.95, "lp_val_acc": 0.951, "best_val_acc": 0.95, "best_val_epoch": -1}
    beat = {"start_val_acc": 0.9, "lp_val_acc": 0.9}  # seed 0 beat its start: 0.93
    cell = checked(runs("lp_ft", beat, kept | {"final_val_acc": 0.94}))
    assert marked(cell) == ["below_start"]
    assert cell.below_start_why == (
        "seed 1: selection kept the start (val 0.950): no trained epoch beat it and the fit "
        "ended below it; last val 0.940 at epoch 10"
    )
    assert cell.convergence == "below its start" and cell.not_logged == ""
    # A fit that ties its start (as at validation accuracy 1.0) lost nothing: not marked.
    tied = kept | {"final_val_acc": 0.95}
    cell = checked(runs("lp_ft", beat, tied))
    assert marked(cell) == [] and cell.convergence != "below its start"


def test_below_its_start_is_for_a_fitted_start_only_and_needs_the_start_logged():
    kept = {"start_val_acc": 0.5, "best_val_acc": 0.5, "best_val_epoch": -1, "final_val_acc": 0.4}
    random_head = checked(runs("finetune", kept))  # a random head: nothing to fall below
    assert not random_head.below_start and "below its start" not in random_head.checked
    probe_head = runs("finetune", kept).assign(head_init="probe")  # finetune from a fitted head
    assert checked(probe_head).below_start
    unlogged = checked(runs("lp_ft", FINE))  # lp_ft without lp_val_acc or start_val_acc
    assert not unlogged.below_start and unlogged.not_logged == "below its start"
    assert unlogged.convergence == "convergence not logged"


def test_still_rising_at_the_end_is_undertrained_only():
    rising = {"best_val_epoch": 9, "best_val_acc": 0.93, "final_val_acc": 0.93}
    cell = checked(runs("freeze", FINE, rising))
    assert marked(cell) == ["undertrained"] and cell.marks == "†"
    assert cell.convergence == "may be undertrained"
    assert cell.undertrained_why == "seed 1: val acc best at epoch 10 of 10"


def test_training_fitted_while_validation_fell_from_its_best_is_overfit():
    fitted = {"final_train_acc": 1.0, "best_val_epoch": 5, "best_val_acc": 0.9}
    cell = checked(runs("finetune", fitted | {"final_val_acc": 0.82}))
    assert cell.convergence == "overfit" and cell.marks == "‖"
    assert marked(cell) == ["overfit"]
    assert cell.overfit_why == "seed 0: train acc 1.000, val 0.900 at epoch 6 → 0.820 at epoch 10"
    # Training fitted with validation at its best, or a fall within the noise: not overfit.
    for ending in ({"final_val_acc": 0.9}, {"final_val_acc": 0.86}):
        assert marked(checked(runs("finetune", fitted | ending))) == []


def test_a_run_carries_every_mark_it_earns_and_the_cell_names_each_seed():
    # seed 0 diverged with a low training accuracy; seed 1 fine; seed 2 still rising.
    broke = {"best_val_epoch": 1, "best_val_acc": 0.9, "final_val_acc": 0.5, "final_train_acc": 0.6}
    rising = {"best_val_epoch": 9, "final_val_acc": 0.93}
    cell = checked(runs("finetune", broke, FINE, rising))
    assert cell.convergence == "diverged, may be undertrained"
    assert marked(cell) == ["diverged", "undertrained"] and cell.marks == "§ †"
    assert cell.convergence_why == (
        "diverged: seed 0: val 0.900 at epoch 2 → 0.500 at epoch 10; "
        "may be undertrained: seed 0: train acc 0.600; seed 2: val acc best at epoch 10 of 10"
    )


def test_runs_without_the_metrics_are_not_logged_and_linear_probe_is_exempt():
    older = {"final_val_acc": None}  # a cell from before final_val_acc: undertraining checked
    cell = checked(runs("finetune", older))
    assert marked(cell) == [] and cell.convergence == "convergence not logged"
    assert (cell.checked, cell.not_logged) == ("undertrained", "diverged, overfit")
    nothing = dict.fromkeys(FINE)
    cell = checked(runs("freeze", nothing))
    assert cell.checked == "" and cell.not_logged == "diverged, undertrained, overfit"
    probe = checked(runs("linear_probe", nothing))
    assert probe.convergence == "exempt (no epochs)" and marked(probe) == []
    assert probe.not_logged == "" and probe.checked == ""


@pytest.mark.parametrize("option", ["diverged_drop", "overfit_train_acc", "overfit_drop"])
def test_a_threshold_out_of_range_is_refused(option):
    with pytest.raises(ValueError, match=f"{option}=2: use a value in"):
        ConvergenceRule(**{option: 2})


def test_a_report_of_runs_from_before_final_val_acc_says_which_rules_went_unchecked():
    from benchmark.report.tables import trust_notes

    older = {"final_val_acc": None}
    frame = pd.concat([runs("finetune", older, older), runs("freeze", older)], ignore_index=True)
    frame = frame.assign(backbone="efficientnet_lite0", variant="")
    table = cell_checks(frame, [*BY, "backbone", "variant"], DEFAULT_RULE).assign(n=2)
    notes = trust_notes(table, DEFAULT_RULE)
    assert notes[0].startswith("† May be undertrained") and notes[0].endswith(": no cell.")
    assert not any(n.startswith(("§", "¶", "‖")) for n in notes)  # no cell could be checked
    assert notes[1].endswith("not taken for clear of it): every cell (diverged, overfit).")
