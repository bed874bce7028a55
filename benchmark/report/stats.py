"""How sure the answer is: seed summaries with t intervals, paired strategy comparisons, ranks.

Pure functions of pandas frames (scipy and statsmodels for the statistics), no tracking store
involved.

- `seed_summary`: per cell, n, mean, sd and a t interval of the mean over its seeds.
- `paired_differences`: per row (e.g. dataset x colour), every pair of columns (e.g. strategies)
  compared on the seeds both have: mean difference, its t interval, the paired t-test's p-value
  and a one-line verdict.
- `holm_adjusted`: those p-values adjusted for how many were tested (statsmodels' Holm).
- `average_ranks`, `best_in_row`: which column wins each row (1 = highest value), for a summary
  line and for bold cells.

Values within `TOLERANCE` of each other count as equal: accuracies are k/N, and the same fraction
reached through different float arithmetic must tie rather than be "better" by 1e-17.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

TOLERANCE = 1e-9
SUMMARY_COLUMNS = ["n", "mean", "sd", "ci_low", "ci_high"]
DIFFERENCE_COLUMNS = [
    "a",
    "b",
    "n_pairs",
    "mean_difference",
    "ci_low",
    "ci_high",
    "p_value",
    "test",
    "significant",
    "verdict",
]


def seed_summary(
    runs: pd.DataFrame,
    by: list[str],
    value: str = "test_acc",
    confidence: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """One row per group of `by` (in order of first appearance): `n` (non-missing values), `mean`,
    `sd` (n - 1 denominator) and the `confidence` t interval of the mean, `ci_low`, `ci_high`.

    n = 1: sd and the interval are NaN (one seed says nothing about the spread); n = 0 (only
    missing values): everything but n is NaN; sd = 0: the interval is the mean itself.
    `bounds`: the range the value cannot leave (an accuracy's [0, 1]); the interval is clipped to
    it, since with 2 or 3 seeds a t interval of a mean near 1 reaches past 1.
    """
    _check_confidence(confidence)
    rows = []
    for key, group in runs.groupby(by, sort=False, dropna=False):
        values = group[value].dropna().to_numpy(float)
        n = len(values)
        mean = values.mean() if n else np.nan
        sd = values.std(ddof=1) if n > 1 else np.nan
        low, high = _mean_interval(mean, sd, n, confidence)
        if bounds is not None and n > 1:
            low, high = float(np.clip(low, *bounds)), float(np.clip(high, *bounds))
        rows.append((*_key_tuple(key), n, mean, sd, low, high))
    return pd.DataFrame(rows, columns=[*by, *SUMMARY_COLUMNS]).astype({"n": int})


def paired_differences(
    runs: pd.DataFrame,
    row: list[str],
    column: str = "strategy",
    pair: str = "seed",
    value: str = "test_acc",
    confidence: float = 0.95,
    order: list[str] | None = None,
) -> pd.DataFrame:
    """Per group of `row`, every pair (a, b) of `column` values that group has, compared on the
    `pair` values (seeds) both have a `value` for: a paired t-test of a - b.

    Columns: the `row` keys, then `a`, `b`, `n_pairs`, `mean_difference` (mean of a - b),
    `ci_low`, `ci_high` (its t interval), `p_value`, `test`, `significant` (p < 1 - confidence)
    and `verdict`, one line naming the better of the two first, e.g.
    "finetune better than freeze by 0.040 [0.020, 0.060], p=0.01",
    "finetune vs freeze: no significant difference (+0.004 [-0.010, 0.018], p=0.45)",
    "finetune vs freeze: too few paired seeds (n=1)".

    a comes before b in `order` (default: order of first appearance in `runs`), the same in
    every row. `test` says where the p-value comes from:
    - "paired t": scipy.stats.ttest_rel, n_pairs >= 2 and the differences vary;
    - "none": n_pairs < 2, or every difference is 0 (no significant difference, p NaN);
    - "sign": every difference is the same nonzero number (typical of accuracies k/N on a few
      seeds). The t statistic is then undefined (zero spread), so no t interval is claimed
      (ci NaN) and the p-value is the exact two-sided sign test's (scipy.stats.binomtest: all
      n differences of one sign, p = 2 / 2**n), which only says how often chance alone would
      put every seed on one side: 0.5 for 2 seeds, 0.25 for 3, below 0.05 from 6 on.

    A (row, column, pair) with several values is refused: put whatever else varies (e.g.
    backbone) into `row` or `column`. Missing values are ignored.
    """
    _check_confidence(confidence)
    alpha = 1 - confidence
    present = runs.dropna(subset=[value])
    keys = [*row, column, pair]
    if present.duplicated(keys).any():
        raise ValueError(
            f"several {value!r} values for one {keys}: add what else varies to row or column"
        )
    names = list(pd.unique(runs[column].dropna())) if order is None else list(order)
    out = []
    for key, group in _row_groups(present, row):
        wide = group.pivot(index=pair, columns=column, values=value)
        for a, b in combinations([name for name in names if name in wide.columns], 2):
            both = wide[[a, b]].dropna()
            result = _compare(
                str(a), str(b), both[a].to_numpy(float), both[b].to_numpy(float), confidence, alpha
            )
            out.append((*key, a, b, *result))
    return pd.DataFrame(out, columns=[*row, *DIFFERENCE_COLUMNS]).astype(
        {"n_pairs": int, "significant": bool}
    )


def holm_adjusted(p_values: pd.Series) -> pd.Series:
    """Holm's step-down adjustment of `p_values` over the family of those present (NaN: no test,
    left NaN): p-values that hold at the family-wise level once every test made is counted."""
    adjusted = pd.Series(np.nan, index=p_values.index, dtype=float)
    tested = p_values.notna()
    if tested.any():
        adjusted[tested] = multipletests(p_values[tested].to_numpy(float), method="holm")[1]
    return adjusted


def average_ranks(table: pd.DataFrame, row: list[str], column: str, value: str) -> pd.DataFrame:
    """Per group of `row`, the `column` values ranked by `value` (1 = best = highest; ties get
    the average of their ranks, scipy.stats.rankdata), then per column the mean of its ranks.

    Index: the column values, best average first. Columns: `average_rank`, `rows` (how many
    rows it has a value in; only those count, so a rank over fewer rows, or against fewer
    competitors, compares less).
    """
    wide = _wide(table, row, column, value)
    ranks = wide.apply(_descending_ranks, axis=1, result_type="broadcast")
    result = pd.DataFrame({"average_rank": ranks.mean(), "rows": ranks.count()})
    result.index.name = column
    return result.sort_values("average_rank", kind="stable")


def best_in_row(table: pd.DataFrame, row: list[str], column: str, value: str) -> pd.Series:
    """For each entry of `table`, whether its `value` is the highest of its `row` group (every
    one of a tie; never a missing value), aligned with `table`'s index: which cells to bold."""
    _wide(table, row, column, value)  # refuses several entries per (row, column)
    values = table[value].astype(float)
    best = values.groupby([table[k] for k in row], sort=False, dropna=False).transform("max")
    return (values >= best - TOLERANCE) & values.notna()


def _compare(
    a: str, b: str, first: np.ndarray, second: np.ndarray, confidence: float, alpha: float
) -> tuple:
    """(n_pairs, mean_difference, ci_low, ci_high, p_value, test, significant, verdict)."""
    differences = first - second
    n = len(differences)
    if n < 2:
        mean = differences.mean() if n else np.nan
        verdict = f"{a} vs {b}: too few paired seeds (n={n})"
        return n, mean, np.nan, np.nan, np.nan, "none", False, verdict
    mean = differences.mean()
    if np.ptp(differences) <= TOLERANCE:  # the same difference on every seed
        if abs(mean) <= TOLERANCE:
            verdict = f"{a} vs {b}: no significant difference (identical on all {n} paired seeds)"
            return n, 0.0, np.nan, np.nan, np.nan, "none", False, verdict
        p = float(stats.binomtest(n, n, 0.5).pvalue)
        seeds = f"on all {n} paired seeds"
        note = f"constant difference, no t interval; sign test {_p(p)}"
        if p < alpha:
            winner, loser = (a, b) if mean > 0 else (b, a)
            verdict = f"{winner} better than {loser} by {abs(mean):.3f} {seeds} ({note})"
        else:
            verdict = f"{a} vs {b}: no significant difference ({mean:+.3f} {seeds}: {note})"
        return n, mean, np.nan, np.nan, p, "sign", bool(p < alpha), verdict
    result = stats.ttest_rel(first, second)
    low, high = result.confidence_interval(confidence)
    p = float(result.pvalue)
    if p < alpha:
        if mean > 0:
            verdict = f"{a} better than {b} by {mean:.3f} [{low:.3f}, {high:.3f}], {_p(p)}"
        else:
            verdict = f"{b} better than {a} by {-mean:.3f} [{-high:.3f}, {-low:.3f}], {_p(p)}"
    else:
        verdict = (
            f"{a} vs {b}: no significant difference "
            f"({mean:+.3f} [{low:+.3f}, {high:+.3f}], {_p(p)})"
        )
    return n, mean, float(low), float(high), p, "paired t", bool(p < alpha), verdict


def _mean_interval(mean: float, sd: float, n: int, confidence: float) -> tuple[float, float]:
    if n < 2:
        return np.nan, np.nan
    if sd <= TOLERANCE:
        return mean, mean
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sd / np.sqrt(n))
    return float(low), float(high)


def _descending_ranks(values: pd.Series) -> pd.Series:
    """Ranks of the present values, 1 = highest, ties averaged; NaN stays NaN."""
    ranks = pd.Series(np.nan, index=values.index)
    present = values.dropna().astype(float)
    # Rounded to the tolerance so that float noise ties, as in best_in_row.
    rounded = np.round(present.to_numpy() / TOLERANCE) * TOLERANCE
    ranks[present.index] = stats.rankdata(-rounded, method="average")
    return ranks


def _wide(table: pd.DataFrame, row: list[str], column: str, value: str) -> pd.DataFrame:
    """Rows: the `row` groups; columns: the `column` values; cells: `value` (NaN: none)."""
    if table.duplicated([*row, column]).any():
        raise ValueError(
            f"several entries for one {[*row, column]}: add what else varies to row or column"
        )
    index = table[row].apply(tuple, axis=1) if row else pd.Series(0, index=table.index)
    return (
        table.assign(_row=index.to_numpy())
        .pivot(index="_row", columns=column, values=value)
        .astype(float)
        .rename_axis(columns=column)
    )


def _row_groups(frame: pd.DataFrame, row: list[str]):
    if not row:
        yield (), frame
        return
    for key, group in frame.groupby(row, sort=False, dropna=False):
        yield _key_tuple(key), group


def _key_tuple(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _p(p: float) -> str:
    if not np.isfinite(p):  # never "p=nan" in a verdict: no test could be made
        return "no p-value"
    return "p<0.001" if p < 0.001 else f"p={p:.2g}"


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")


def rank_agreement(
    measured: pd.DataFrame, scores: pd.DataFrame, score_columns: tuple[str, ...]
) -> pd.DataFrame:
    """Per dataset x colour x strategy, how well each score (computed before training, one per
    backbone) orders the backbones as their measured test accuracy does: Kendall's tau and its
    p-value over the backbones that have both (at least 2), with the two orders."""
    joined = measured.merge(scores, on=["dataset", "colour", "backbone"])
    rows = []
    for (dataset, colour, strategy), group in joined.groupby(
        ["dataset", "colour", "strategy"], sort=False
    ):
        group = group.dropna(subset=["test_acc_mean"])
        if group.backbone.nunique() < 2:
            continue
        row = {"dataset": dataset, "colour": colour, "strategy": strategy, "n": len(group)}
        for score in score_columns:
            tau, p = stats.kendalltau(group[score], group.test_acc_mean)
            row[f"tau_{score}"], row[f"p_{score}"] = float(tau), float(p)
        row["measured"] = " > ".join(group.sort_values("test_acc_mean", ascending=False).backbone)
        first = score_columns[0]
        row["predicted"] = " > ".join(group.sort_values(first, ascending=False).backbone)
        rows.append(row)
    return pd.DataFrame(rows)
