"""benchmark.report.stats on small synthetic runs whose answers can be checked by hand (and
against scipy called directly)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from benchmark.report.stats import (
    average_ranks,
    best_in_row,
    holm_adjusted,
    paired_differences,
    seed_summary,
)

pytestmark = pytest.mark.filterwarnings("error")  # no RuntimeWarning from scipy on degenerate data

PROJECT = Path(__file__).resolve().parents[1]
ROW = ["dataset", "colour"]
FINETUNE = [0.90, 0.92, 0.94]
FREEZE = [0.85, 0.88, 0.89]  # differences 0.05, 0.04, 0.05


def runs(*cells: tuple[str, str, str, list[float | None]], seeds: list[int] | None = None):
    """(dataset, colour, strategy, values): one run per value, seeds 0.. (or `seeds`)."""
    return pd.DataFrame(
        [
            (dataset, colour, strategy, seed, value)
            for dataset, colour, strategy, values in cells
            for seed, value in zip(seeds or range(len(values)), values, strict=True)
        ],
        columns=[*ROW, "strategy", "seed", "test_acc"],
    )


def one(frame: pd.DataFrame) -> pd.Series:
    assert len(frame) == 1, frame
    return frame.iloc[0]


def test_report_modules_import_no_torch_lightning_or_tracking():
    code = (
        "import sys, benchmark.report.stats, benchmark.report.latex, benchmark.report.figures\n"
        "heavy = [m for m in ('torch', 'lightning', 'torchmetrics', 'benchmark.cell.mlflow_run')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(benchmark.report.stats.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(PROJECT / "benchmark" / "report" / "stats.py")


def test_seed_summary_mean_sd_and_t_interval():
    table = seed_summary(
        runs(("h", "rgb", "finetune", FINETUNE), ("h", "rgb", "freeze", FREEZE)),
        ["dataset", "colour", "strategy"],
    )
    assert list(table.columns) == [
        "dataset",
        "colour",
        "strategy",
        *["n", "mean", "sd", "ci_low", "ci_high"],
    ]
    assert list(table.strategy) == ["finetune", "freeze"]  # order of first appearance
    row = table.iloc[0]
    assert row.n == 3
    assert row["mean"] == pytest.approx(0.92)
    assert row.sd == pytest.approx(0.02)
    # By hand: 0.92 ± t(0.975, df=2) 0.02 / sqrt(3) = 0.92 ± 4.3027 x 0.011547 = 0.92 ± 0.04968.
    assert (row.ci_low, row.ci_high) == pytest.approx((0.870317, 0.969683), abs=1e-6)
    expected = scipy_stats.ttest_1samp(FREEZE, 0).confidence_interval(0.95)
    assert (table.ci_low[1], table.ci_high[1]) == pytest.approx((expected.low, expected.high))
    wider = seed_summary(runs(("h", "rgb", "finetune", FINETUNE)), ["strategy"], confidence=0.99)
    assert wider.ci_low[0] < row.ci_low and wider.ci_high[0] > row.ci_high


def test_seed_summary_one_seed_no_seed_and_no_spread():
    table = seed_summary(
        runs(
            ("h", "rgb", "finetune", [0.9]),
            ("h", "rgb", "freeze", [None, None]),
            ("h", "rgb", "linear_probe", [0.8, 0.8, None]),
        ),
        ["strategy"],
    ).set_index("strategy")
    assert table.n.to_dict() == {"finetune": 1, "freeze": 0, "linear_probe": 2}
    assert table.loc["finetune", "mean"] == 0.9
    assert table.loc["finetune", ["sd", "ci_low", "ci_high"]].isna().all()
    assert table.loc["freeze", ["mean", "sd", "ci_low", "ci_high"]].isna().all()
    assert table.loc["linear_probe", ["sd", "ci_low", "ci_high"]].tolist() == [0.0, 0.8, 0.8]


def test_seed_summary_clips_the_interval_to_the_bounds():
    # Two seeds near 1: the t interval (df = 1) reaches far past 1, which no accuracy can.
    near_one = runs(("h", "rgb", "finetune", [0.99, 0.95]))
    free = seed_summary(near_one, ["strategy"]).iloc[0]
    assert free.ci_high > 1 and free.ci_low < 0.95
    clipped = seed_summary(near_one, ["strategy"], bounds=(0.0, 1.0)).iloc[0]
    assert clipped.ci_high == 1.0
    assert clipped.ci_low == pytest.approx(free.ci_low)  # inside the bounds: unchanged
    assert clipped["mean"] == free["mean"] and clipped.sd == free.sd


def test_paired_difference_known_case_against_scipy():
    result = one(
        paired_differences(
            runs(("h", "rgb", "finetune", FINETUNE), ("h", "rgb", "freeze", FREEZE)), ROW
        )
    )
    assert (result.dataset, result.colour, result.a, result.b) == ("h", "rgb", "finetune", "freeze")
    assert result.n_pairs == 3
    assert result.mean_difference == pytest.approx(0.14 / 3)
    # By hand: differences 0.05, 0.04, 0.05: sd 0.005774, t = 0.04667 / (0.005774 / sqrt 3) = 14.
    direct = scipy_stats.ttest_rel(FINETUNE, FREEZE)
    assert direct.statistic == pytest.approx(14.0)
    assert result.p_value == pytest.approx(direct.pvalue) and result.p_value < 0.01
    low, high = direct.confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high))
    assert result.test == "paired t" and result.significant
    assert result.verdict == "finetune better than freeze by 0.047 [0.032, 0.061], p=0.0051"


def test_paired_difference_names_the_better_first_and_keeps_the_order():
    # freeze appears first in the runs: a = freeze, b = finetune in every row, mean negative.
    frame = runs(
        ("h", "rgb", "freeze", FREEZE),
        ("h", "rgb", "finetune", FINETUNE),
        ("h", "gray", "finetune", FINETUNE),  # finetune first in this row: order still global
        ("h", "gray", "freeze", FREEZE),
    )
    table = paired_differences(frame, ROW)
    assert list(zip(table.a, table.b, strict=True)) == [("freeze", "finetune")] * 2
    assert table.mean_difference.tolist() == pytest.approx([-0.14 / 3] * 2)
    assert table.ci_high.lt(0).all()
    assert table.verdict[0] == "finetune better than freeze by 0.047 [0.032, 0.061], p=0.0051"
    ordered = paired_differences(frame, ROW, order=["finetune", "freeze"])
    assert ordered.a.tolist() == ["finetune"] * 2
    assert ordered.mean_difference.tolist() == pytest.approx([0.14 / 3] * 2)


def test_paired_difference_no_significant_difference():
    result = one(
        paired_differences(
            runs(
                ("h", "rgb", "finetune", [0.91, 0.90, 0.93]),
                ("h", "rgb", "freeze", [0.90, 0.91, 0.91]),
            ),
            ROW,
        )
    )
    direct = scipy_stats.ttest_rel([0.91, 0.90, 0.93], [0.90, 0.91, 0.91])
    assert result.p_value == pytest.approx(direct.pvalue) and result.p_value > 0.05
    assert not result.significant
    assert result.ci_low < 0 < result.ci_high
    assert result.verdict.startswith("finetune vs freeze: no significant difference (+0.007 [")
    assert result.verdict.endswith(f"], p={direct.pvalue:.2g})")


def test_paired_difference_alpha_follows_confidence():
    # p = 0.0051: significant at 0.95 and 0.99, not at 0.999.
    frame = runs(("h", "rgb", "finetune", FINETUNE), ("h", "rgb", "freeze", FREEZE))
    assert one(paired_differences(frame, ROW, confidence=0.99)).significant
    strict = one(paired_differences(frame, ROW, confidence=0.999))
    assert not strict.significant and "no significant difference" in strict.verdict
    wide = (strict.ci_low, strict.ci_high)
    narrow = one(paired_differences(frame, ROW))
    assert wide[0] < narrow.ci_low and wide[1] > narrow.ci_high


def test_paired_difference_uses_only_seeds_both_have():
    frame = pd.concat(
        [
            runs(("h", "rgb", "finetune", [0.90, 0.92, 0.94, 0.91]), seeds=[0, 1, 2, 3]),
            runs(("h", "rgb", "freeze", [0.86, 0.90, 0.89, 0.80, None]), seeds=[1, 2, 3, 4, 0]),
        ]
    )
    result = one(paired_differences(frame, ROW))
    assert result.n_pairs == 3  # seeds 1, 2, 3; seed 0 of freeze has no value, seed 4 no partner
    assert result.mean_difference == pytest.approx(np.mean([0.92 - 0.86, 0.94 - 0.90, 0.91 - 0.89]))
    direct = scipy_stats.ttest_rel([0.92, 0.94, 0.91], [0.86, 0.90, 0.89])
    assert result.p_value == pytest.approx(direct.pvalue)


def test_paired_difference_too_few_paired_seeds():
    frame = pd.concat(
        [
            runs(("h", "rgb", "finetune", [0.9, 0.8]), seeds=[0, 1]),
            runs(("h", "rgb", "freeze", [0.7, 0.6]), seeds=[1, 2]),
            runs(("h", "rgb", "linear_probe", [0.5]), seeds=[5]),
        ]
    )
    table = paired_differences(frame, ROW).set_index(["a", "b"])
    assert table.n_pairs.to_dict() == {
        ("finetune", "freeze"): 1,
        ("finetune", "linear_probe"): 0,
        ("freeze", "linear_probe"): 0,
    }
    single = table.loc[("finetune", "freeze")]
    assert single.mean_difference == pytest.approx(0.1)
    assert np.isnan(single.p_value) and np.isnan(single.ci_low) and not single.significant
    assert single.verdict == "finetune vs freeze: too few paired seeds (n=1)"
    assert table.verdict.iloc[1] == "finetune vs linear_probe: too few paired seeds (n=0)"
    assert (table.test == "none").all()


def test_paired_difference_identical_values():
    result = one(
        paired_differences(
            runs(("h", "rgb", "finetune", [0.9] * 3), ("h", "rgb", "freeze", [0.9] * 3)), ROW
        )
    )
    assert result.mean_difference == 0 and not result.significant and result.test == "none"
    assert result.verdict == (
        "finetune vs freeze: no significant difference (identical on all 3 paired seeds)"
    )


def test_paired_difference_constant_nonzero_difference_uses_the_sign_test():
    # The same 0.1 on every seed, reached through float arithmetic that is not bit-exact.
    finetune, freeze = [0.9, 0.81, 0.7], [0.8, 0.71, 0.6]  # 0.1 - 2e-17, + 9e-17, - 2e-17
    result = one(
        paired_differences(
            runs(("h", "rgb", "finetune", finetune), ("h", "rgb", "freeze", freeze)), ROW
        )
    )
    assert result.test == "sign" and result.p_value == pytest.approx(0.25)  # 2 / 2**3
    assert not result.significant and np.isnan(result.ci_low) and np.isnan(result.ci_high)
    assert np.ptp(np.subtract(finetune, freeze)) > 0
    assert result.mean_difference == pytest.approx(0.1)
    assert result.verdict == (
        "finetune vs freeze: no significant difference (+0.100 on all 3 paired seeds: "
        "constant difference, no t interval; sign test p=0.25)"
    )
    six = one(
        paired_differences(
            runs(("h", "rgb", "finetune", [0.8] * 6), ("h", "rgb", "freeze", [0.9] * 6)), ROW
        )
    )
    assert six.p_value == pytest.approx(2 / 2**6) and six.significant
    assert six.verdict == (
        "freeze better than finetune by 0.100 on all 6 paired seeds "
        "(constant difference, no t interval; sign test p=0.031)"
    )


def test_paired_difference_refuses_several_values_per_seed():
    frame = runs(("h", "rgb", "finetune", FINETUNE), ("h", "rgb", "freeze", FREEZE))
    twice = pd.concat([frame.assign(backbone="resnet18"), frame.assign(backbone="vgg16")])
    with pytest.raises(ValueError, match="several"):
        paired_differences(twice, ROW)
    both = paired_differences(twice, [*ROW, "backbone"])
    assert both.backbone.tolist() == ["resnet18", "vgg16"]


SUMMARY = pd.DataFrame(
    [
        ("h", "rgb", "finetune", 0.9),
        ("h", "rgb", "freeze", 0.9),  # tie with finetune
        ("h", "rgb", "linear_probe", 0.8),
        ("h", "gray", "finetune", 0.7),
        ("h", "gray", "freeze", 0.8),
        ("h", "gray", "linear_probe", np.nan),  # not run: no rank, not best
        ("d", "rgb", "finetune", 0.1 + 0.2),  # 0.30000000000000004: ties with 0.3
        ("d", "rgb", "freeze", 0.3),
    ],
    columns=[*ROW, "strategy", "mean"],
)


def test_holm_adjusts_over_the_tests_made_and_leaves_no_test_alone():
    # Worked by hand: sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04, then each at
    # least the one before it (step-down): 0.03, 0.06, 0.06. The NaN (no test) is not counted.
    p = pd.Series([0.01, 0.04, np.nan, 0.03], index=list("abcd"))
    adjusted = holm_adjusted(p)
    assert adjusted.index.tolist() == list("abcd") and np.isnan(adjusted["c"])
    assert adjusted.drop("c").tolist() == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted(pd.Series([np.nan])).isna().all()  # nothing tested, nothing adjusted


def test_average_ranks_ties_and_missing():
    ranks = average_ranks(SUMMARY, ROW, "strategy", "mean")
    assert list(ranks.columns) == ["average_rank", "rows"]
    # finetune 1.5, 2, 1.5; freeze 1.5, 1, 1.5; linear_probe 3 on its one row.
    assert ranks.index.tolist() == ["freeze", "finetune", "linear_probe"]  # best first
    assert ranks.average_rank.tolist() == pytest.approx([4 / 3, 5 / 3, 3.0])
    assert ranks.rows.tolist() == [3, 3, 1]
    first = scipy_stats.rankdata([-0.9, -0.9, -0.8])
    assert first.tolist() == [1.5, 1.5, 3.0]


def test_best_in_row_ties_all_best_missing_never():
    shuffled = SUMMARY.sample(frac=1, random_state=0)
    best = best_in_row(shuffled, ROW, "strategy", "mean")
    assert best.index.equals(shuffled.index)
    assert best.sort_index().tolist() == [True, True, False, False, True, False, True, True]


def test_ranks_refuse_several_entries_per_cell():
    with pytest.raises(ValueError, match="several"):
        average_ranks(pd.concat([SUMMARY, SUMMARY]), ROW, "strategy", "mean")
    with pytest.raises(ValueError, match="several"):
        best_in_row(pd.concat([SUMMARY, SUMMARY]), ROW, "strategy", "mean")
