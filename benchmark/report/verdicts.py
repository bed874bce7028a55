"""Decided verdicts: per dataset x colour, a few declared questions, each answered "better",
"equivalent" or "undecided", with intervals that include both seeds and test images.

Pure functions of pandas frames and numpy arrays (statsmodels for Holm), no store involved:
`tables.load_predictions` reads the per-image predictions these take.

- `declared_contrasts`: the family of primary contrasts of each row (dataset x colour x
  backbone): (a) the best column whose strategy trains the backbone (`TRAINS`) against the best
  whose strategy does not (`FROZEN`), "best" by the mean test accuracy over the counted seeds;
  (b) each tuned column against its untuned self (same strategy and backbone, the same settings
  but the tuning's), where both ran. Picking "the best" of each side on the same test data is a
  selection step: the verdict on (a) is conditional on that choice (the chosen best's lead is,
  if anything, flattered by it). Every other pair is exploratory: reported apart, never in a
  verdict, never in the family the correction counts.
- `bootstrap`: the paired, hierarchical bootstrap: seeds drawn with replacement, then test
  images drawn with replacement, the same image draw for every seed and both columns (the test
  split is shared by the seeds and the columns), the accuracy (or the difference of two
  columns' accuracies) of each draw. Runs without per-image predictions (older ones): seeds
  drawn, then the test images' error drawn once per draw, binomially from the drawn seeds' mean
  test_acc x n_test (independent between the two columns: wider than a paired draw); without
  n_test, seeds only.
  The seeds' part of each draw is scaled to Student's t with S - 1 degrees of freedom (`Draws`):
  over 2-5 seeds a plain bootstrap claims a precision the seeds cannot give.
- `verdicts`: per primary contrast, Holm over the row's family (p from the bootstrap), the
  three words, and for an undecided one about how many more seeds would decide it.
- `looks`, `with_looks`, `looks_note`: the two-look design of `benchmark.tools.seeds` (more seeds
  where a contrast is undecided). The first look decides on the initial seeds, the second on
  those plus the seeds it added (runs tagged `benchmark.look`); alpha is split between the
  looks (Bonferroni: alpha/2 each, Holm within a row at each look), so the family-wise error
  over both looks stays <= alpha per row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.multitest import multipletests

from benchmark.report.trust import EXEMPT_STRATEGIES
from benchmark.tracking.identity import LOOK_TAG

TRAINS = ("finetune", "lp_ft", "partial", "two_stage")  # the backbone's weights move
FROZEN = ("freeze", "linear_probe", "freeze_bn_train")  # they do not (BN statistics at most)
ROW = ["dataset", "colour", "backbone"]
TRAINS_VS_FROZEN = "trains vs frozen"
TUNED_VS_UNTUNED = "tuned vs untuned"
BETTER, EQUIVALENT, UNDECIDED = "better", "equivalent", "undecided"
IMAGES = "seeds x test images"
BINOMIAL = "seeds; images binomial from test_acc x n_test (no per-image predictions)"
SEEDS_ONLY = "seeds only (no per-image predictions, no n_test)"
CHUNK = 250  # resamples drawn at once (memory: CHUNK x images)
MORE_SEEDS_CAP = 1000  # beyond this, "more than 1000"
CONTRAST_COLUMNS = [
    *ROW,
    "kind",
    "a",
    "b",
    "seeds",
    "images",
    "source",
    "difference",
    "ci_low",
    "ci_high",
    "level",
    "p_value",
    "p_holm",
    "eq_low",
    "eq_high",
    "verdict",
    "winner",
    "more_seeds",
    "text",
]


@dataclass(frozen=True)
class VerdictRule:
    """`margin` δ: a difference in accuracy smaller than this is too small to act on (default
    0.02: one test image in 50; a user choosing between fine-tuning and freezing would not switch
    for less, and on the smallest test split here, Hymenoptera's 153 images, it is three
    images). `alpha`: the family-wise error rate per row, over every look. `resamples`, `seed`:
    the bootstrap's. `looks`: how many times the verdicts are decided, each at `look_alpha`
    (alpha / looks, Bonferroni): 1, or 2 once `benchmark.tools.seeds` added seeds."""

    margin: float = 0.02
    alpha: float = 0.05
    resamples: int = 2000
    seed: int = 0
    looks: int = 1

    @property
    def look_alpha(self) -> float:
        """The alpha each look decides at: the rule's alpha split evenly between the looks."""
        return self.alpha / self.looks

    def __post_init__(self) -> None:
        if not 0 < self.margin < 1:
            raise ValueError(f"margin={self.margin}: use a value in (0, 1)")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"alpha={self.alpha}: use a value in (0, 0.5)")
        if self.resamples < 100:
            raise ValueError(f"resamples={self.resamples}: use 100 or more")
        if self.looks < 1:
            raise ValueError(f"looks={self.looks}: use 1 or more")


DEFAULT_VERDICT_RULE = VerdictRule()


@dataclass(frozen=True)
class Sample:
    """One column's seeds (or two columns' paired seeds) ready to resample: `a`, `b` seeds x
    images correctness (0/1) on the shared images, or (fallback) per-seed accuracies with
    `n_test` per seed (NaN: not logged); `b` None for one column's own accuracy."""

    a: np.ndarray
    b: np.ndarray | None
    source: str
    n_test: np.ndarray | None = None

    @property
    def seeds(self) -> int:
        return len(self.a)

    @property
    def images(self) -> int | None:
        return self.a.shape[1] if self.source == IMAGES else None

    def point(self) -> float:
        """The accuracy (or difference) on the data as observed: mean over seeds."""
        a = self.a.mean(axis=1) if self.a.ndim == 2 else self.a
        b = 0.0 if self.b is None else self.b.mean(axis=1) if self.b.ndim == 2 else self.b
        return float(np.mean(a - b))

    def variance_parts(self) -> tuple[float, float]:
        """(between-seed variance of the per-seed difference, NaN with one seed; the variance of
        the mean that comes from the test images, not shrunk by more seeds)."""
        b = np.zeros_like(self.a) if self.b is None else self.b
        if self.source == IMAGES:
            per_seed = (self.a - b).mean(axis=1)
            per_image = (self.a - b).mean(axis=0)
            images = per_image.var(ddof=1) / len(per_image) if len(per_image) > 1 else 0.0
        else:  # the binomial draw of the images, once for all seeds, each column apart
            per_seed, images = self.a - b, 0.0
            if self.source == BINOMIAL and self.n_test is not None:
                n = float(np.mean(self.n_test))
                columns = [self.a] + ([] if self.b is None else [self.b])
                images = sum(float(np.mean(c * (1 - c))) for c in columns) / n
        seeds = per_seed.var(ddof=1) if len(per_seed) > 1 else np.nan
        return float(seeds), float(images)


def sample(
    a_runs: pd.DataFrame,
    b_runs: pd.DataFrame | None,
    predictions: Mapping[str, pd.DataFrame],
) -> Sample:
    """The seeds both have (one column: its seeds), each run's correctness on the test images
    every one of those runs predicted (`predictions`: run_id -> frame with `path`, `correct`),
    or, when a run has none, the fallback: test_acc with n_test per seed."""
    a_runs = a_runs.drop_duplicates("seed").set_index("seed")
    seeds = list(a_runs.index)
    if b_runs is not None:
        b_runs = b_runs.drop_duplicates("seed").set_index("seed")
        seeds = [s for s in seeds if s in b_runs.index]
    seeds = sorted(seeds, key=str)
    runs = [a_runs.loc[seeds]] + ([] if b_runs is None else [b_runs.loc[seeds]])
    ids = [run_id for r in runs for run_id in r.run_id]
    if seeds and all(i in predictions for i in ids):
        frames = {i: predictions[i].drop_duplicates("path").set_index("path").correct for i in ids}
        shared = set.intersection(*(set(f.index) for f in frames.values()))
        paths = sorted(shared)
        if paths:
            matrices = [
                np.stack([frames[i].loc[paths].to_numpy(float) for i in r.run_id]) for r in runs
            ]
            return Sample(matrices[0], matrices[1] if len(matrices) > 1 else None, IMAGES)
    accuracies = [r.test_acc.to_numpy(float) for r in runs]
    n_test = pd.concat(
        [pd.to_numeric(r.get("n_test", pd.Series(np.nan, index=r.index)), errors="coerce")
         for r in runs],
        axis=1,
    )  # fmt: skip
    n = n_test.min(axis=1).to_numpy(float) if len(n_test.columns) else None
    source = BINOMIAL if n is not None and len(n) and np.isfinite(n).all() else SEEDS_ONLY
    return Sample(accuracies[0], accuracies[1] if len(accuracies) > 1 else None, source, n)


@dataclass(frozen=True)
class Draws:
    """A bootstrap's draws, kept in two parts around the observed `point`: what drawing the
    seeds moved (`seed_part`, the images as observed) and what drawing the images moved on top
    (`image_part`). An interval scales the seed part to Student's t with S - 1 degrees of
    freedom (`seed_scale`): a plain bootstrap over 2-5 seeds claims a precision they cannot give
    (over 2 seeds it never draws outside them, and its variance is the plug-in s²(S - 1)/S)."""

    point: float
    seed_part: np.ndarray
    image_part: np.ndarray
    seeds: int

    def seed_scale(self, level: float) -> float:
        """√(S/(S - 1)) t_{S-1} / z at `level`, two-sided (1 with one seed: no seed spread)."""
        if self.seeds < 2:
            return 1.0
        q = max((1 + level) / 2, 0.5 + 1e-6)  # at level 0: the limit, a ratio of densities
        s = self.seeds
        return float(math.sqrt(s / (s - 1)) * stats.t.ppf(q, s - 1) / stats.norm.ppf(q))

    def values(self, level: float) -> np.ndarray:
        return self.point + self.seed_scale(level) * self.seed_part + self.image_part

    def interval(self, level: float) -> tuple[float, float]:
        """The percentile interval at `level` of the draws with the seed part scaled."""
        low, high = np.quantile(self.values(level), [(1 - level) / 2, (1 + level) / 2])
        return float(low), float(high)

    def p_value(self) -> float:
        """Two-sided p of a difference of 0: the smallest a whose (1 - a) interval leaves 0 out
        (bisection; at least 1 / (R + 1)), so that p < a exactly when that interval excludes 0."""
        low, high = 1.0 / (len(self.seed_part) + 1), 1.0  # excluded at 1 - high, not at 1 - low
        if self.excludes_zero(1 - low):
            return low
        if not self.excludes_zero(0.0):  # the median itself is 0
            return 1.0
        for _ in range(30):
            middle = (low + high) / 2
            low, high = (low, middle) if self.excludes_zero(1 - middle) else (middle, high)
        return high

    def excludes_zero(self, level: float) -> bool:
        low, high = self.interval(level)
        return low > 0 or high < 0


def bootstrap(data: Sample, resamples: int, seed: int) -> Draws:
    """`resamples` draws of the accuracy (b None) or the difference a - b: seeds with
    replacement, then images with replacement (one image draw for every seed and both columns,
    their test split being the same); fallback: the drawn seeds' mean accuracy p of each column
    moved by one Binomial(n_test, p) / n_test - p draw (the same images for every seed), or
    seeds only. Vectorised: a draw's mean is
    w' D v / (S N), w and v the seeds' and images' multiplicities; its seed part w' D 1 / (S N)."""
    rng = np.random.default_rng(seed)
    s = data.seeds
    point = data.point()
    full, seeds_only = np.empty(resamples), np.empty(resamples)
    if data.source == IMAGES:
        d = data.a - (0.0 if data.b is None else data.b)
        n = d.shape[1]
        for start in range(0, resamples, CHUNK):
            r = min(CHUNK, resamples - start)
            w = rng.multinomial(s, np.full(s, 1 / s), size=r)
            v = rng.multinomial(n, np.full(n, 1 / n), size=r)
            weighted = w @ d
            full[start : start + r] = np.einsum("rn,rn->r", weighted, v) / (s * n)
            seeds_only[start : start + r] = weighted.mean(axis=1) / s
    else:
        picks = rng.integers(0, s, size=(resamples, s))
        columns = [data.a] + ([] if data.b is None else [data.b])
        means = [accuracy[picks].mean(axis=1) for accuracy in columns]
        seeds_only = means[0] - (means[1] if len(means) > 1 else 0.0)
        full = seeds_only.copy()
        if data.source == BINOMIAL and data.n_test is not None:
            # The test images are the same for every seed: one draw of them per resample (not
            # one per seed, which more seeds would average away), each column apart.
            n_test = max(round(float(np.mean(data.n_test))), 1)
            for sign, mean in zip((1, -1), means, strict=False):
                noise = rng.binomial(n_test, np.clip(mean, 0, 1)) / n_test - mean
                full += sign * noise
    return Draws(point, seeds_only - point, full - seeds_only, s)


def more_seeds(
    data: Sample, difference: float, margin: float, level_better: float, level_equal: float
) -> tuple[float, str]:
    """About how many more seeds would decide an undecided contrast at the variance observed.

    With s² the between-seed variance of the per-seed difference and v the part of the mean's
    variance that comes from the test images (fixed: the same images for every seed), the
    interval's half-width at S seeds is about h(S) = t_{S-1} √(s²/S + v), t at the interval's
    level (two-sided). It decides "better" once h(S) < |d| (at the Holm level 1 - alpha/m),
    "equivalent" once h(S) < δ - |d| (at 1 - 2alpha/m); the answer is the smallest S, found by
    counting up, for the target that needs fewer, less the seeds there are. None when even
    z √v (infinitely many seeds) misses both: more seeds alone cannot, more test images would.
    Returns (more seeds, NaN when none will do; a phrase)."""
    seeds_var, images_var = data.variance_parts()
    if data.seeds < 2 or not np.isfinite(seeds_var):
        return np.nan, "a 2nd seed is needed to see the seeds' spread"
    d = abs(difference)
    targets = [(d, level_better), (margin - d, level_equal)]
    reachable = [
        (t, lv)
        for t, lv in targets
        if t > 0 and stats.norm.ppf((1 + lv) / 2) * math.sqrt(images_var) < t
    ]
    if not reachable:
        return np.nan, "more seeds alone would not: the test images' own error is too large"
    for total in range(data.seeds + 1, data.seeds + MORE_SEEDS_CAP + 1):
        for target, level in reachable:
            q = stats.t.ppf((1 + level) / 2, total - 1)
            if q * math.sqrt(seeds_var / total + images_var) < target:
                more = total - data.seeds
                return float(more), f"about {more} more seed{'s' * (more != 1)} would decide it"
    return np.nan, f"more than {MORE_SEEDS_CAP} more seeds"


def is_tuned(runs: pd.DataFrame) -> pd.Series:
    """A run tuned its values: a tune group (`tune_name`) or tune.trials set, unless its strategy
    runs no trials (linear_probe: its C grid is its fit)."""
    name = runs.get("tune_name", pd.Series(pd.NA, index=runs.index)).astype(object)
    named = name.notna() & ~name.astype(str).isin(["None", "none", "default", "null", ""])
    trials = pd.to_numeric(runs.get("tune_trials", pd.Series(np.nan, index=runs.index)))
    return (named | trials.gt(0)) & ~runs.strategy.isin(EXEMPT_STRATEGIES)


def untuned_key(variant: object) -> str:
    """A variant label without its tuning's keys (`tune=fair, tune.reuse_seed=0` -> ``)."""
    parts = [] if pd.isna(variant) else str(variant).split(", ")  # type: ignore[arg-type]
    return ", ".join(p for p in parts if p and not p.startswith("tune"))


def declared_contrasts(counted: pd.DataFrame) -> pd.DataFrame:
    """Per row (dataset x colour x backbone) of the counted FINISHED runs (with `column`, the
    report's column name), the primary contrasts (module docstring): `kind`, `a`, `b`."""
    out = []
    runs = counted.assign(_tuned=is_tuned(counted), _key=counted.variant.map(untuned_key))
    for key, row in runs.groupby(ROW, sort=False, dropna=False):
        means = row.groupby("column", sort=False).test_acc.mean()
        kind = row.drop_duplicates("column").set_index("column")
        trains = means[kind.strategy.reindex(means.index).isin(TRAINS)]
        frozen = means[kind.strategy.reindex(means.index).isin(FROZEN)]
        if len(trains) and len(frozen):  # the best of each by its mean over seeds
            out.append((*key, TRAINS_VS_FROZEN, trains.idxmax(), frozen.idxmax()))
        for column, info in kind[kind._tuned].iterrows():
            selves = kind[
                ~kind._tuned
                & kind.strategy.eq(info.strategy)
                & kind._key.eq(info._key)
            ]  # fmt: skip
            if len(selves) == 1:
                out.append((*key, TUNED_VS_UNTUNED, column, selves.index[0]))
    return pd.DataFrame(out, columns=[*ROW, "kind", "a", "b"])


def verdicts(
    counted: pd.DataFrame,
    predictions: Mapping[str, pd.DataFrame],
    rule: VerdictRule = DEFAULT_VERDICT_RULE,
) -> pd.DataFrame:
    """Each declared contrast of `counted` (columns `CONTRAST_COLUMNS`; alpha below is the rule's
    `look_alpha`, its alpha split between the looks):

    - `difference` a - b (mean over paired seeds), its bootstrap `p_value` and `p_holm`
      (statsmodels' Holm over the contrasts of its row that could be tested: two paired seeds at
      least); `ci_low`, `ci_high`: the percentile interval at the `level` Holm's step-down tests
      that contrast at (1 - alpha/(m - k + 1) for the k-th smallest p of m), so that an interval
      clear of 0 is a contrast Holm rejects (but for a step after one that was not rejected);
      `eq_low`, `eq_high`: the (1 - 2alpha/m) interval, for the two one-sided tests.
    - `verdict`: "equivalent" when the (1 - 2alpha/m) interval lies inside (-δ, δ) (TOST at
      alpha/m each: whatever the difference, it is smaller than the margin; said first, even if
      also nonzero);
      else "better" when Holm rejects a difference of 0 (`winner`: the better column); else
      "undecided", with `more_seeds` (about how many more seeds would decide it; NaN: more seeds
      alone would not, or one seed so far) and why in `text`.
    """
    contrasts = declared_contrasts(counted)
    groups = dict(list(counted.groupby(ROW, sort=False, dropna=False)))
    rows = []
    for key, family in contrasts.groupby(ROW, sort=False, dropna=False):
        where = groups[key]
        found: list[tuple[Any, Sample, float, float, Draws | None]] = []
        for c in family.itertuples(index=False):
            data = sample(where[where.column == c.a], where[where.column == c.b], predictions)
            if data.seeds < 2:
                found.append((c, data, np.nan, np.nan, None))
                continue
            draws = bootstrap(data, rule.resamples, rule.seed)
            found.append((c, data, draws.point, draws.p_value(), draws))
        p = pd.Series([f[3] for f in found], dtype=float)
        m = int(p.notna().sum())
        holm = pd.Series(np.nan, index=p.index)
        rejected = pd.Series(False, index=p.index)
        if m:
            reject, adjusted, _, _ = multipletests(p.dropna(), rule.look_alpha, method="holm")
            holm[p.notna()], rejected[p.notna()] = adjusted, reject
        step = p.rank(method="first")  # k: 1 = smallest p
        for i, (c, data, difference, p_value, drawn) in enumerate(found):
            rows.append(_verdict(c, data, difference, p_value, holm[i], bool(rejected[i]),
                                 drawn, m, step[i], rule))  # fmt: skip
    return pd.DataFrame(rows, columns=CONTRAST_COLUMNS)


def _verdict(
    c, data: Sample, difference: float, p_value: float, p_holm: float, rejected: bool,
    draws: Draws | None, m: int, k: float, rule: VerdictRule,
) -> tuple:  # fmt: skip
    head: tuple[object, ...] = (c.dataset, c.colour, c.backbone, c.kind, c.a, c.b, data.seeds)
    head += (data.images, data.source)
    if draws is None:
        text = f"{c.a} vs {c.b}: undecided ({data.seeds} paired seed: 2 are needed)"
        return (*head, difference, np.nan, np.nan, np.nan, p_value, p_holm, np.nan, np.nan,
                UNDECIDED, "", np.nan, text)  # fmt: skip
    level = 1 - rule.look_alpha / (m - k + 1)
    low, high = draws.interval(level)
    eq_low, eq_high = draws.interval(1 - 2 * rule.look_alpha / m)
    delta = rule.margin
    said = f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]"
    more = np.nan
    if -delta < eq_low and eq_high < delta:
        verdict, winner = EQUIVALENT, ""
        text = f"{c.a} vs {c.b}: equivalent within ±{delta:g} ({said}; "
        text += f"{1 - 2 * rule.look_alpha / m:.1%}"
        text += f" interval [{eq_low:+.3f}, {eq_high:+.3f}])"
    elif rejected and difference != 0:
        verdict = BETTER
        winner, loser = (c.a, c.b) if difference > 0 else (c.b, c.a)
        lo, hi = (low, high) if difference > 0 else (-high, -low)
        text = f"{winner} better than {loser} by {abs(difference):.3f} [{lo:.3f}, {hi:.3f}]"
    else:
        verdict, winner = UNDECIDED, ""
        more, why = more_seeds(data, difference, delta, level, 1 - 2 * rule.look_alpha / m)
        if data.source == BINOMIAL:
            why += "; per-image predictions would pair the images and narrow it"
        text = f"{c.a} vs {c.b}: undecided ({said}; {why})"
    return (*head, difference, low, high, level, p_value, p_holm, eq_low, eq_high, verdict,
            winner, more, text)  # fmt: skip


LOOK = "look"  # the runs' column of the tag `benchmark.look` (tables.load_runs)


def looks(runs: pd.DataFrame) -> int:
    """How many looks the store's runs (any status) hold: 1, or the largest look a run was added
    by (`benchmark.tools.seeds` launches its runs tagged `benchmark.look` = 2)."""
    added = pd.to_numeric(runs.get(LOOK, pd.Series(dtype=object)), errors="coerce").dropna()
    return max(1, int(added.max())) if len(added) else 1


def with_looks(rule: VerdictRule, runs: pd.DataFrame) -> VerdictRule:
    """`rule` deciding at alpha / looks (`looks(runs)`): the report's last look, once more
    seeds were added where a contrast was undecided, at the alpha the first look spent too."""
    return dataclasses.replace(rule, looks=looks(runs))


def looks_note(rule: VerdictRule) -> str:
    """Which looks ran and the alpha each decides at, in a sentence or two."""
    if rule.looks == 1:
        return (
            f"Looks: one (the seeds as launched; no seeds were added where a verdict was "
            f"undecided), at alpha={rule.alpha:g}."
        )
    return (
        f"Looks: {rule.looks}, the first on the initial seeds (benchmark.tools.seeds chose there "
        f"which undecided contrasts get more seeds), the last on those plus the added seeds "
        f"(runs tagged {LOOK_TAG}); alpha={rule.alpha:g} is split between them (Bonferroni: "
        f"{rule.look_alpha:g} per look, Holm within a row at each look), so the family-wise "
        f"error over all looks stays at most {rule.alpha:g} per row. The verdicts here are the "
        f"last look's, at {rule.look_alpha:g}."
    )


def cell_intervals(
    counted: pd.DataFrame,
    predictions: Mapping[str, pd.DataFrame],
    by: list[str],
    rule: VerdictRule = DEFAULT_VERDICT_RULE,
    level: float = 0.95,
) -> pd.DataFrame:
    """Per cell (`by`) of the counted FINISHED runs, the bootstrap interval of its accuracy
    (seeds and test images; `boot_low`, `boot_high`, `boot_source`); a cell of one seed gets
    the test images' interval alone (its `boot_source` says so)."""
    rows = []
    for key, cell in counted.groupby(by, sort=False, dropna=False):
        data = sample(cell, None, predictions)
        draws = bootstrap(data, rule.resamples, rule.seed)
        low, high = draws.interval(level)
        source = data.source + (" (one seed: test images only)" if data.seeds == 1 else "")
        rows.append((*(key if isinstance(key, tuple) else (key,)), low, high, source))
    return pd.DataFrame(rows, columns=[*by, "boot_low", "boot_high", "boot_source"])
