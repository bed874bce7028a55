"""`python -m benchmark.report [--experiment NAME] [--sweep DIR] [--out DIR]`: the answer tables
(report.md, report.csv, report.tex) and one self-contained page with the pictures (report.html)."""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from benchmark.report import figures
from benchmark.report.latex import escape as latex_escape
from benchmark.report.latex import latex_document, to_latex
from benchmark.report.markdown import escape, escape_names
from benchmark.report.stats import (
    average_ranks,
    best_in_row,
    holm_adjusted,
    paired_differences,
    rank_agreement,
)
from benchmark.report.tables import (
    GROUP,
    RULES,
    Runs,
    accuracy_table,
    column_legend,
    column_names,
    cost_table,
    finite_scores,
    latest_per_seed,
    load_predictions,
    load_ranks,
    load_runs,
    native,
    never_run,
    non_finite_note,
    not_run_note,
    split_note,
    split_protocols,
    summarise,
    trust_notes,
    with_shift_tests,
)
from benchmark.report.trust import (
    DEFAULT_RULE,
    DIAGNOSES,
    MIXED_COMMITS_MARK,
    Check,
    ConvergenceRule,
    Diagnosis,
    code_summary,
    run_diagnoses,
)
from benchmark.report.verdicts import (
    BETTER,
    EQUIVALENT,
    TRAINS_VS_FROZEN,
    VerdictRule,
    cell_intervals,
    looks_note,
    with_looks,
)
from benchmark.report.verdicts import (
    verdicts as decide,
)
from benchmark.runtime.progress import progress
from benchmark.tracking.identity import RANK_SCORES, store_uri, use_credentials
from benchmark.tracking.server import TrackingUnreachable, check_reachable
from benchmark.tracking.store import StoreError, artifact_file, check_sqlite

# After a failed run in the HTML's list, when the same cell and seed also FINISHED (a relaunch).
RERUN_NOTE = " (another run of this cell and seed FINISHED: that one counts)"


def val_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch validation accuracy of each counted FINISHED run."""
    client = mlflow.MlflowClient()
    runs = native(runs).assign(column=column_names(native(runs)))  # each fit once
    keys = [*GROUP, "column", "seed", "run_id"]
    rows = [
        {**run[keys].to_dict(), "epoch": m.step, "val_acc": m.value}
        for _, run in progress(list(runs.iterrows()), "reading learning curves")
        for m in client.get_metric_history(run.run_id, "val_acc")
    ]
    return pd.DataFrame(rows, columns=[*keys, "epoch", "val_acc"])


def best_confusions(
    runs: pd.DataFrame, table: pd.DataFrame, uri: str
) -> list[tuple[str, list[str], list[list[int]]]]:
    """Per cell, in the tables' order (rows dataset x colour, then the columns), the test
    confusion matrix of its run with the best validation accuracy (selected like everything
    else: on validation)."""
    out = []
    runs, table = native(runs), native(table)  # the native test's matrices: each fit once
    runs = runs.assign(column=column_names(runs))
    ranked = runs.sort_values("best_val_acc", ascending=False, na_position="last")
    cells = dict(list(ranked.groupby(GROUP, sort=False)))
    order = [tuple(row) for row in table[GROUP].itertuples(index=False) if tuple(row) in cells]
    missing = []  # every FINISHED run logs one: these were deleted from the artifact store
    for cell in progress(order, "reading confusion matrices"):
        for _, run in cells[cell].iterrows():
            file = artifact_file(uri, run.run_id, run.artifact_uri, "confusion_matrix.json")
            if file is None:
                missing.append(
                    f"{run.run_id} ({'/'.join(str(c) for c in cell if c)} seed {run.seed})"
                )
            else:
                matrix = json.loads(file.read_text())
                # Two short lines per small panel: the row, the column's short label and seed.
                title = f"{cell[0]} / {cell[1]}\n{run.column}, seed {run.seed}"
                out.append((title, matrix["classes"], matrix["matrix"]))
                break
    if missing:
        print(
            f"warning: {len(missing)} finished run(s) have no confusion_matrix.json in the "
            f"artifact store (deleted?): {', '.join(missing)}; a cell none of whose runs has one "
            "has no confusion matrix in report.html.",
            file=sys.stderr,
        )
    return out


def out_problem(out: Path) -> str | None:
    """Why the report cannot be written to the folder `out` (made here), or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a folder: give a folder (it is created if absent)."
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {out} cannot be created ({error.strerror or error}): choose another folder."
    if not os.access(out, os.W_OK):
        return f"--out {out} is read-only: choose a folder you can write."
    return None


def pairs_note(verdicts: pd.DataFrame) -> str:
    """How the paired comparisons were chosen and how many tests the Holm adjustment counts."""
    tested = int(verdicts.p_value.notna().sum())
    return (
        "Each line: the paired difference over the seeds both columns have, its 95 % t interval "
        "and the t-test's p (uncorrected). Compared: columns of one setting (e.g. all tune=fair), "
        "one strategy across settings (what tuning changed), and a column with no variant (e.g. "
        f"linear_probe, whose C grid is its tuning) against each; {tested} tests in all. Beside "
        "each p < 0.05, its Holm-adjusted p over those tests (statsmodels): a difference holds "
        "for the whole report only where that stays below 0.05."
    )


def _comparable(verdicts: pd.DataFrame, counted: pd.DataFrame) -> pd.Series:
    """Pairs of one setting, of one strategy, or with a column that has no variant: never, say,
    an untuned finetune against a tuned freeze, which answers no one's question."""
    kind = counted.drop_duplicates("column").set_index("column")
    strategy, variant = kind.strategy, kind.variant.fillna("")
    a, b = verdicts.a.map(variant), verdicts.b.map(variant)
    same_strategy = verdicts.a.map(strategy).eq(verdicts.b.map(strategy))
    return a.eq(b) | same_strategy | a.eq("") | b.eq("")


def comparisons(runs: pd.DataFrame, rule: ConvergenceRule = DEFAULT_RULE) -> pd.DataFrame:
    """Per dataset x colour (x backbone), the comparable pairs of columns (`_comparable`) compared
    on the seeds both have (paired: a seed fixes the split), significant ones with their
    Holm-adjusted p over every test made; a verdict resting on a cell with a diagnosis (`rule`:
    diverged, below its start, may be undertrained, overfit) says which."""
    counted = latest_per_seed(runs)
    counted = counted[counted.status == "FINISHED"]
    if counted.empty:
        return pd.DataFrame(columns=["dataset", "colour", "where", "verdict", "p_value"])
    counted = counted.assign(column=column_names(counted))
    rows = ["dataset", "colour", "backbone"]
    verdicts = paired_differences(counted, rows, column="column", pair="seed", value="test_acc")
    verdicts = verdicts[_comparable(verdicts, counted)].reset_index(drop=True)
    holm = holm_adjusted(verdicts.p_value)
    adjusted = [
        f" (Holm-adjusted p={p:.2g})" if significant else ""
        for p, significant in zip(holm, verdicts.significant, strict=True)
    ]
    verdicts = verdicts.assign(p_holm=holm, verdict=verdicts.verdict + adjusted)
    where = verdicts.dataset + " / " + verdicts.colour
    if counted.backbone.nunique() > 1:
        where += " / " + verdicts.backbone
    checks = run_diagnoses(counted, rule)
    cells = list(counted[[*rows, "column"]].itertuples(index=False, name=None))
    marked = {
        d: {c for c, s in zip(cells, checks[d.key], strict=True) if s == Check.marked}
        for d in DIAGNOSES
    }
    caveat = [
        _rests_on(
            {
                d: [c for c in (r.a, r.b) if (r.dataset, r.colour, r.backbone, c) in marked[d]]
                for d in DIAGNOSES
            }
        )
        for r in verdicts.itertuples()
    ]
    return verdicts.assign(where=where, verdict=where + ": " + verdicts.verdict + caveat)


def _rests_on(columns: dict[Diagnosis, list[str]]) -> str:
    """What a verdict rests on, per diagnosis: "(§ rests on a, which diverged; † rests on ...)"."""
    said = [
        f"{d.mark} rests on {' and '.join(c)}, which {d.rests}" for d, c in columns.items() if c
    ]
    return f" ({'; '.join(said)})" if said else ""


def ranks(table: pd.DataFrame) -> pd.DataFrame:
    """Each column's average rank over the rows of the native tests (a shift test's row is not
    another dataset)."""
    table = native(table)
    done = table[table.n > 0].assign(column=column_names(table[table.n > 0]))
    if done.empty:
        return pd.DataFrame(columns=["average_rank", "rows"])
    ranked = average_ranks(done, ["dataset", "colour"], "column", "test_acc_mean")
    for d in DIAGNOSES:  # the ranks that rest on cells with a diagnosis
        if d.key in done and done[d.key].any():
            marked = done.groupby("column")[d.key].sum().astype(int)
            ranked[f"rows with {d.mark}"] = marked.reindex(ranked.index).fillna(0).astype(int)
    return ranked


def bold_best(table: pd.DataFrame, accuracy: pd.DataFrame) -> pd.DataFrame:
    """Which accuracy-table cells hold the best mean of their row."""
    done = table[table.n > 0].assign(column=column_names(table[table.n > 0]))
    flags = pd.DataFrame(False, index=accuracy.index, columns=accuracy.columns)
    if done.empty:
        return flags
    best = done[best_in_row(done, ["dataset", "colour"], "column", "test_acc_mean")]
    where = {(r.dataset, r.colour): i for i, r in accuracy.iterrows()}
    for _, row in best.iterrows():
        flags.loc[where[(row.dataset, row.colour)], row.column] = True
    return flags


def ranking_before_training(table: pd.DataFrame, uri: str, experiment: str) -> pd.DataFrame:
    """`python -m benchmark.tools.rank`'s scores against the measured accuracy of each backbone."""
    scores = load_ranks(uri, experiment)
    if scores.empty:
        return pd.DataFrame()
    table = native(table)
    measured = table[(table.n > 0) & table.variant.fillna("").eq("")]
    present = tuple(c for c in RANK_SCORES if scores[c].notna().any())
    agreement = rank_agreement(measured, scores, present)
    return agreement.round(3) if not agreement.empty else agreement


@dataclass(frozen=True)
class Decided:
    """The primary contrasts (`verdicts.verdicts`), the verdict-first table made of them, and
    the rule they were decided by."""

    contrasts: pd.DataFrame
    headline: pd.DataFrame
    rule: VerdictRule

    def note(self) -> str:
        return f"{verdict_note(self.rule)} {looks_note(self.rule)}"

    def details(self) -> pd.DataFrame:
        """Every primary contrast, one line each: the verdicts' family."""
        c = self.contrasts
        shown = pd.DataFrame(
            {
                "dataset": c.dataset,
                "colour": c.colour,
                "contrast": c.kind,
                "difference a - b, interval": [_difference(r) for r in c.itertuples()],
                "level": c.level.map(lambda v: "" if pd.isna(v) else f"{v:.1%}"),
                "p (Holm)": c.p_holm.map(lambda v: "" if pd.isna(v) else f"{v:.2g}"),
                "seeds": c.seeds,
                "images": c.images.map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
                "verdict": c.text,
                "interval from": c.source,
            }
        )
        if c.backbone.nunique() > 1:
            shown.insert(2, "backbone", c.backbone)
        return shown


def verdict_note(rule: VerdictRule) -> str:
    """How the verdicts above the tables were reached, in one paragraph."""
    return (
        "Verdicts: per dataset x colour, the best strategy that trains the backbone (finetune, "
        "lp_ft, partial, two_stage) against the best that does not (freeze, linear_probe, "
        "freeze_bn_train), each chosen by its mean test accuracy over seeds: the verdict is "
        "conditional on that choice, made on the same data. With each tuned column against its "
        "untuned self (under the table), these are the row's declared family; Holm's correction "
        "(statsmodels) runs over it alone, every other comparison is exploratory and in no "
        "verdict. Intervals: a paired, hierarchical bootstrap "
        f"({rule.resamples:,} draws, seed {rule.seed}) over seeds and then test images (one "
        "image draw for every seed and both columns: the test split is shared), the seeds' "
        "part of each draw scaled to Student's t with seeds - 1 degrees of freedom (a bootstrap "
        "over a few seeds alone claims too much), at the level Holm tests the contrast at; "
        "runs without per-image predictions draw their images "
        "binomially from test_acc x n_test (said per contrast). "
        f"Better: Holm rejects no difference at alpha={rule.alpha:g}. Equivalent within "
        f"±{rule.margin:g} (--margin; one test image in {1 / rule.margin:.0f}): the "
        "(1 - 2alpha/m) interval lies inside ±δ (two one-sided tests). Otherwise undecided, with "
        "about how many more seeds would decide it at the variance seen."
    )


def _difference(row: object) -> str:
    difference, low, high = (getattr(row, k) for k in ("difference", "ci_low", "ci_high"))
    if pd.isna(difference):
        return ""
    if pd.isna(low):
        return f"{difference:+.3f}"
    return f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]"


def headline(contrasts: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """The verdict-first table: per row with a trains-vs-frozen contrast, the recommendation
    (the better column, or equivalent, or undecided with the seeds that would decide it), the
    difference with its interval, the paired seeds and the marks of the cells it rests on."""
    first = contrasts[contrasts.kind == TRAINS_VS_FROZEN]
    done = table[table.n > 0].assign(column=column_names(table[table.n > 0]))
    marks = {
        (r.dataset, r.colour, r.backbone, r.column): " ".join(
            m for m in (r.marks, MIXED_COMMITS_MARK if r.mixed_commits else "") if m
        )
        for r in done.itertuples()
    }
    rows = []
    for r in first.itertuples():
        if r.verdict == BETTER:
            said = str(r.winner)
        elif r.verdict == EQUIVALENT:
            said = f"equivalent within ±{r.margin:g}"
        else:
            more = "" if pd.isna(r.more_seeds) else f", ~{r.more_seeds:.0f} more seeds"
            more = ", seeds alone will not" if "would not" in r.text else more
            said = f"undecided{more}"
        behind = "; ".join(
            f"{c}: {m}"
            for c in (r.a, r.b)
            if (m := marks.get((r.dataset, r.colour, r.backbone, c), ""))
        )
        rows.append(
            {
                "recommendation": said,
                "dataset": r.dataset,
                "colour": r.colour,
                "backbone": r.backbone,
                "a (trains) vs b (frozen)": f"{r.a} vs {r.b}",
                "difference a - b, interval": _difference(r),
                "seeds": r.seeds,
                "diagnoses": behind,
            }
        )
    columns = ["recommendation", "dataset", "colour", "backbone", "a (trains) vs b (frozen)"]
    columns += ["difference a - b, interval", "seeds", "diagnoses"]
    out = pd.DataFrame(rows, columns=columns)
    rows_in_order = dict.fromkeys(zip(table.dataset, table.colour, strict=True))
    place = {row: i for i, row in enumerate(rows_in_order)}
    out = out.iloc[  # in the tables' order of rows
        sorted(
            range(len(out)), key=lambda i: place.get((out.dataset[i], out.colour[i]), len(place))
        )
    ].reset_index(drop=True)
    if out.backbone.nunique() <= 1:
        out = out.drop(columns="backbone")
    return out


def decided(
    counted: pd.DataFrame, table: pd.DataFrame, uri: str, rule: VerdictRule
) -> tuple[Decided, pd.DataFrame]:
    """The verdicts of the counted FINISHED runs and `table` with each cell's bootstrap
    interval (`boot_low`, `boot_high`, `boot_source`)."""
    counted = counted.assign(column=column_names(counted))
    predictions = load_predictions(counted, uri)
    contrasts = decide(native(counted), predictions, rule)  # a shift test: exploratory only
    contrasts = contrasts.assign(margin=rule.margin)
    intervals = cell_intervals(counted, predictions, GROUP, rule)
    table = table.merge(intervals, on=GROUP, how="left")
    return Decided(contrasts, headline(contrasts, table), rule), table


TITLE = "Transfer learning: which strategy, per dataset"


@dataclass(frozen=True)
class Dots:
    """The dot-and-interval figure of each dataset shown (`figures.accuracy_dots`), as SVG
    markup, on one x range for all (`limits`)."""

    limits: tuple[float, float]
    svgs: list[tuple[str, str]]  # (dataset, markup)

    def caption(self) -> str:
        low, high = self.limits
        return (
            "Each column's test accuracy: a dot at its mean over seeds, a line across its 95 % "
            "interval (the bootstrap's over seeds and test images; a cell of one seed: its test "
            "images alone), one marker per colour. The x axis runs from "
            f"{low:.2f} to {high:.2f} in every dataset's figure: it holds every interval with "
            "at least 0.02 to spare, and is never narrowed to one dataset's values, so no figure "
            "magnifies small differences."
        )

    def files(self) -> list[str]:
        """A file name per figure, for report.md (`accuracy-1-hymenoptera.svg`)."""
        return [
            f"accuracy-{i}-{re.sub(r'[^A-Za-z0-9_.]+', '-', d).strip('-.') or 'dataset'}.svg"
            for i, (d, _) in enumerate(self.svgs, start=1)
        ]


def dot_figures(table: pd.DataFrame) -> Dots:
    """Per dataset with a run (the shift test's row, `simpsons · x0.357 shift`, its own), its
    columns' accuracy, the columns the accuracy table shows in its order, one x range for all."""
    shown = table[~table.dataset.isin(list(never_run(table)))]
    if shown.empty:
        return Dots((0.0, 1.0), [])
    visible = set(accuracy_table(table).columns)
    columns = [c for c in dict.fromkeys(column_names(shown)) if c in visible]
    limits = figures.accuracy_range(shown)
    return Dots(
        limits,
        [
            (d, figures.svg_markup(figures.accuracy_dots(shown, d, limits, columns)))
            for d in dict.fromkeys(shown.dataset)
        ],
    )


def _verdicts_markdown(decided: Decided, names: tuple[str, ...]) -> str:
    """The verdict-first table and its rule: what report.md opens with (no "## " heading above
    the accuracy table, which readers of report.md find as the first section)."""
    if decided.headline.empty:
        return (
            "**Verdicts**: none yet (no row has both a strategy that trains the backbone and "
            "one that does not, each with FINISHED seeds).\n\n"
        )
    shown = escape_names(decided.headline, (*names, "recommendation", "a (trains) vs b (frozen)"))
    shown = shown.assign(diagnoses=decided.headline.diagnoses.map(escape))
    return f"**Verdicts**\n\n{shown.to_markdown(index=False)}\n\n{decided.note()}\n\n"


def _contrasts_markdown(decided: Decided, names: tuple[str, ...]) -> str:
    details = decided.details()
    if details.empty:
        return ""
    shown = escape_names(details, (*names, "verdict"))
    return (
        "## Primary contrasts (the verdicts' family; Holm per row)\n\n"
        f"{shown.to_markdown(index=False)}\n\n"
    )


def _legend_markdown(legend: list[tuple[str, str]]) -> str:
    if not legend:
        return ""
    lines = "\n".join(f"- **{escape(short)}**: {escape(full)}" for short, full in legend)
    return f"Columns, each by the settings it stands for:\n\n{lines}\n\n"


def _dots_markdown(dots: Dots) -> str:
    if not dots.svgs:
        return ""
    images = "\n".join(
        f"![{escape(d)}: test accuracy per column]({name})"
        for (d, _), name in zip(dots.svgs, dots.files(), strict=True)
    )
    return f"**Test accuracy per dataset**: {dots.caption()}\n\n{images}\n\n"


# The columns whose values come from the runs (names the user chose): escaped for Markdown.
_NAMES = ("dataset", "colour", "column", "backbone")
# How report.md's tables are written: a cost a cell does not have (no GPU...) as a dash.
_MARKDOWN = {"index": False, "missingval": "—"}


def write_tables(
    table: pd.DataFrame, verdicts: pd.DataFrame, ranking: pd.DataFrame, out: Path, source: str,
    footnote: str, predicted: pd.DataFrame | None = None, notes: Sequence[str] = (),
    decided: Decided | None = None, dots: Dots | None = None, left_out: Sequence[str] = (),
) -> list[Path]:  # fmt: skip
    """report.md (the verdicts, a dot figure per dataset, the table and its legend, then the
    details in sections), report.csv (every cell, shown or not), report.tex (the tables) and the
    figures report.md shows (`Dots.files`); `left_out`: the lines that say which runs were left
    out and why, under the source, before anything else."""
    accuracy, cost = accuracy_table(table), cost_table(table)
    legend = column_legend(table, list(accuracy.columns[2:]))
    idle = not_run_note(table)
    bold = bold_best(table, accuracy)
    cost = cost.astype(object).where(cost.notna(), None)  # tabulate prints NaN as "nan"
    dots = dots or Dots((0.0, 1.0), [])
    paths = [out / "report.md", out / "report.csv", out / "report.tex", *_write_dots(dots, out)]
    paths[0].write_text(
        _markdown_top(source, left_out, decided)
        + _accuracy_markdown(accuracy, bold, idle, dots, legend)
        + _notes_markdown(notes, footnote, decided)
        + _pairs_markdown(verdicts)
        + _ranks_markdown(ranking)
        + _predicted_markdown(predicted)
        + _cost_markdown(cost)
    )
    table.to_csv(paths[1], index=False, float_format="%.4f")
    paths[2].write_text(
        _latex_report(accuracy, bold, cost, notes, _latex_below(legend, idle, left_out))
    )
    return paths


def _write_dots(dots: Dots, out: Path) -> list[Path]:
    """Each dataset's dot figure as an SVG file in `out`, named as report.md shows it."""
    for (_, svg), name in zip(dots.svgs, dots.files(), strict=True):
        (out / name).write_text(svg)
    return [out / name for name in dots.files()]


def _markdown_top(source: str, left_out: Sequence[str], decided: Decided | None) -> str:
    """report.md's title, its source, the lines on the runs left out and the verdicts."""
    return (
        f"# {TITLE}\n\n"
        f"Source: `{source}`.\n\n"
        + "".join(f"{escape(line)}\n\n" for line in left_out)
        + (_verdicts_markdown(decided, _NAMES) if decided is not None else "")
    )


def _accuracy_markdown(
    accuracy: pd.DataFrame,
    bold: pd.DataFrame,
    idle: str,
    dots: Dots,
    legend: list[tuple[str, str]],
) -> str:
    """The dot figures, the accuracy table (the best of each row in bold) with the cells not run
    said above and below it, its legend and the rules."""
    shown = accuracy.copy()
    for column in accuracy.columns:
        shown[column] = [
            f"**{v}**" if b else v for v, b in zip(shown[column], bold[column], strict=True)
        ]
    shown = escape_names(shown, _NAMES)
    idle_line = f"{escape(idle)}.\n\n" if idle else ""
    return (
        idle_line
        + _dots_markdown(dots)
        + "**Test accuracy per cell**\n\n"
        + f"{shown.to_markdown(**_MARKDOWN)}\n\n"
        + idle_line
        + _legend_markdown(legend)
        + f"{RULES}\n\n"
    )


def _notes_markdown(notes: Sequence[str], footnote: str, decided: Decided | None) -> str:
    """The section of notes on the table, then the primary contrasts'."""
    return (
        "## Notes on the table (diagnoses, code, splits)\n\n"
        + "".join(f"{escape(note)}\n\n" for note in notes)
        + (f"{footnote}\n\n" if footnote else "")
        + (_contrasts_markdown(decided, _NAMES) if decided is not None else "")
    )


def _pairs_markdown(verdicts: pd.DataFrame) -> str:
    """The section of every comparable pair (`comparisons`), one line each."""
    lines = "\n".join(  # the row's names escaped, not the interval's brackets
        f"- {escape(w)}{v[len(w) :]}"
        for w, v in zip(verdicts["where"], verdicts.verdict, strict=True)
    )
    lines = lines or "- (no two strategies to compare)"
    return (
        "## Exploratory: every comparable pair (paired t-tests, not in the verdicts)\n\n"
        + f"{pairs_note(verdicts)}\n\n"
        + lines
        + "\n\n"
    )


def _ranks_markdown(ranking: pd.DataFrame) -> str:
    """The section of each column's average rank (`ranks`)."""
    ranked = ranking.reset_index().rename(columns={"index": "column", "rows": "rows ranked"})
    ranked = escape_names(ranked, _NAMES)
    return f"## Average rank across rows (1 = best)\n\n{ranked.to_markdown(index=False)}\n\n"


def _predicted_markdown(predicted: pd.DataFrame | None) -> str:
    """The section of the ranking before training (`ranking_before_training`), if any."""
    if predicted is None or predicted.empty:
        return ""
    predicted = escape_names(predicted, _NAMES)
    return (
        "## Ranking before training (python -m benchmark.tools.rank)\n\nKendall's tau between "
        "each score, computed on frozen features before any training, and the measured "
        "test accuracy, over the backbones of each row (p: two-sided).\n\n"
        f"{predicted.to_markdown(index=False)}\n\n"
    )


def _cost_markdown(cost: pd.DataFrame) -> str:
    """The last section of report.md: the cost table."""
    shown = escape_names(cost, _NAMES)
    return f"## Cost per cell (mean over finished seeds)\n\n{shown.to_markdown(**_MARKDOWN)}\n"


def _latex_below(legend: list[tuple[str, str]], idle: str, left_out: Sequence[str]) -> list[str]:
    """The lines report.tex sets under the accuracy table, before the rules: the runs left out,
    the cells not run, the columns' legend."""
    said = "; ".join(f"{short}: {full}" for short, full in legend)
    return [*left_out, *([f"{idle}."] if idle else []), *([f"Columns: {said}."] if said else [])]


def _latex_report(
    accuracy: pd.DataFrame,
    bold: pd.DataFrame,
    cost: pd.DataFrame,
    notes: Sequence[str],
    below: list[str],
) -> str:
    """report.tex: the accuracy table (`bold`: the best of each row), the lines `below` it, the
    rules and `notes`, then the cost table."""
    return latex_document(
        [
            to_latex(
                accuracy,
                "Test accuracy per cell (what each column stands for, the rules and the "
                "diagnoses: under the table).",
                "tab:accuracy",
                bold=bold,
            ),
            # Text, not the caption: LaTeX sets a caption on one line first, and the notes of
            # a large grid are longer than the longest line it can measure.
            "\n\n".join(latex_escape(text) for text in [*below, RULES, *notes]),
            to_latex(cost, "Cost per cell.", "tab:cost"),
        ]
    )


# The most columns a table keeps a number and its interval each on one line in (`_UNBROKEN`):
# at 1280 px, 11 columns of "[0.886, 0.983]" and a dataset's name fill the page's width.
UNBROKEN_COLUMNS = 13


def _table_html(frame: pd.DataFrame, bold: pd.DataFrame | None = None, css: str = "") -> str:
    """`frame` as an HTML table, every header and cell escaped, the `bold` cells in <strong>; in
    a table narrow enough, a number and its interval each on one line (`_UNBROKEN`)."""
    together = len(frame.columns) <= UNBROKEN_COLUMNS
    shown = frame.astype(object).where(frame.notna(), "").map(lambda v: _html_cell(v, together))
    if bold is not None:
        flags = bold.reindex(index=frame.index, columns=frame.columns).fillna(False)
        shown = shown.where(~flags.astype(bool), "<strong>" + shown + "</strong>")
    shown = shown.rename(columns=lambda c: html.escape(str(c)))
    return shown.to_html(index=False, border=0, escape=False, classes=css or None)


# The parts of an accuracy cell that read as one: "0.935 ± 0.020" and "[0.886, 0.983]" (a cell
# wraps between them, not inside them).
_UNBROKEN = re.compile(r"[-+]?\d\.\d+ ± \d\.\d+|\[[-+]?\d\.\d+, [-+]?\d\.\d+\]")


def _html_cell(value: object, together: bool = True) -> str:
    """A table cell's text, escaped: a float with at most 3 decimals; `together`: a number and
    its interval each kept on one line."""
    if isinstance(value, float):
        text = f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else str(value)
    else:
        text = str(value)
    text = html.escape(text)
    if not together:
        return text
    return _UNBROKEN.sub(lambda m: f'<span class="nowrap">{m.group(0)}</span>', text)


def _details(summary: str, body: str, open_: bool = False) -> str:
    return (
        f"<details{' open' if open_ else ''}><summary>{html.escape(summary)}</summary>"
        f"{body}</details>\n"
    )


def _verdicts_html(decided: Decided | None) -> str:
    if decided is None:
        return ""
    if decided.headline.empty:
        return "<h2>Verdicts</h2><p>None yet: no row has both a strategy that trains the " \
            "backbone and one that does not, each with FINISHED seeds.</p>"  # fmt: skip
    return (
        "<h2>Verdicts</h2>"
        + _table_html(decided.headline, css="verdicts")
        + _details("How a verdict is decided", f"<p>{html.escape(decided.note())}</p>")
    )


def _contrasts_html(decided: Decided | None) -> str:
    if decided is None or decided.contrasts.empty:
        return ""
    return _details(
        "Primary contrasts (the verdicts' family; Holm per row)", _table_html(decided.details())
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px;
       padding: 0 1rem; color: #222; line-height: 1.35; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
code { overflow-wrap: anywhere; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.75rem; width: 100%; }
th, td { border-bottom: 1px solid #ccc; padding: 0.2rem 0.3rem; text-align: left;
         vertical-align: top; overflow-wrap: break-word; }
.nowrap { white-space: nowrap; }
th { background: #f3f3f3; }
table.verdicts { font-size: 0.85rem; }
table.verdicts td:first-child { font-weight: 600; }
.small, figcaption { color: #555; font-size: 0.82rem; }
ul.legend { font-size: 0.82rem; padding-left: 1.2rem; }
details { margin: 0.4rem 0; } summary { cursor: pointer; font-weight: 600; }
details > :not(summary) { margin-left: 1rem; }
.dots { display: grid; grid-template-columns: repeat(auto-fill, minmax(540px, 1fr));
        gap: 0.5rem 1.5rem; }
figure { margin: 0.8rem 0; } svg { max-width: 100%; height: auto; }
.left-out { border-left: 4px solid #c60; padding: 0.3rem 0.6rem; background: #fff4e5; }
"""


def write_html(
    table: pd.DataFrame, runs: pd.DataFrame, verdicts: pd.DataFrame, out: Path, source: str,
    footnote: str, uri: str, notes: Sequence[str] = (), decided: Decided | None = None,
    ranking: pd.DataFrame | None = None, predicted: pd.DataFrame | None = None,
    dots: Dots | None = None, left_out: Sequence[str] = (),
) -> Path:  # fmt: skip
    """report.html: the runs left out and why (`left_out`, unfolded), the verdicts, a dot figure
    per dataset, the table and its legend, then every detail folded (<details>): notes,
    contrasts, ranks, cost, failed runs, curves, matrices."""
    counted = latest_per_seed(runs)
    counted = counted[counted.status == "FINISHED"]
    figured = _pictures(table, counted, uri)
    accuracy = accuracy_table(table)
    legend = column_legend(table, list(accuracy.columns[2:]))
    idle = not_run_note(table)
    idle_html = f'<p class="small">{html.escape(idle)}.</p>' if idle else ""
    failed = _failed_html(runs, counted)
    details = [
        _details(
            "Notes on the table (diagnoses, code, splits)",
            "".join(f"<p>{html.escape(note)}</p>" for note in [*notes, footnote] if note),
        ),
        _contrasts_html(decided),
        _pairs_html(verdicts),
        _ranks_html(ranking),
        _predicted_html(predicted),
        _cost_html(table, *figured[0]),
        _details(f"Failed runs ({failed.count('<li>')})", f"<ul>{failed}</ul>") if failed else "",
        *(_details(title, f"<figure>{svg}</figure>") for title, svg in figured[1:]),
    ]
    page = out / "report.html"
    page.write_text(
        _page(
            source,
            [
                "".join(f'<p class="left-out">{html.escape(line)}</p>' for line in left_out),
                _verdicts_html(decided),
                idle_html,
                _dots_html(dots or Dots((0.0, 1.0), [])),
                "<h2>Test accuracy per cell</h2>",
                _table_html(accuracy, bold_best(table, accuracy)),
                idle_html,
                _legend_html(legend),
                f'<p class="small">{html.escape(RULES)}</p>',
                "<h2>Details</h2>",
                "".join(details),
            ],
        )
    )
    return page


def _pictures(table: pd.DataFrame, counted: pd.DataFrame, uri: str) -> list[tuple[str, str]]:
    """report.html's pictures as (title, SVG markup): cost against accuracy, then the learning
    curves and the confusion matrices of the counted FINISHED runs where there are any."""
    curves = val_curves(counted)
    pictures = [
        (
            "Cost against accuracy (wall time per cell, log scale)",
            figures.cost_vs_accuracy(native(table)),
        )
    ]
    if not curves.empty:
        pictures.append(("Learning curves (validation accuracy)", figures.learning_curves(curves)))
    if matrices := best_confusions(counted, table, uri):
        pictures.append(
            (
                "Confusion matrices (test, row-normalised), best validation run per cell",
                figures.confusion_grid(matrices),
            )
        )
    return [(title, figures.svg_markup(figure)) for title, figure in pictures]


def _failed_html(runs: pd.DataFrame, counted: pd.DataFrame) -> str:
    """The <li> of each (cell, seed) whose latest failed run failed (the first line of its
    error), with `RERUN_NOTE` where another run of it FINISHED (`counted`)."""
    failures = native(runs)
    failures = failures[failures.status == "FAILED"].drop_duplicates([*GROUP, "seed"], keep="last")
    finished = set(counted[[*GROUP, "seed"]].itertuples(index=False))  # counted: FINISHED ones
    failures = failures.assign(column=column_names(failures))  # the cell as the tables name it
    return "".join(
        f"<li>{html.escape(f'{r.dataset} / {r.colour} / {r.column} / seed {r.seed}')}: "
        f"{html.escape(str(r.error).splitlines()[0] if pd.notna(r.error) else 'failed')}"
        f"{RERUN_NOTE if tuple(r[[*GROUP, 'seed']]) in finished else ''}</li>"
        for _, r in failures.iterrows()
    )


def _pairs_html(verdicts: pd.DataFrame) -> str:
    """The folded list of every comparable pair (`comparisons`)."""
    verdict_list = "".join(f"<li>{html.escape(v)}</li>" for v in verdicts.verdict)
    return _details(
        "Exploratory: every comparable pair (paired t-tests, not in the verdicts)",
        f"<p>{html.escape(pairs_note(verdicts))}</p><ul>{verdict_list}</ul>",
    )


def _ranks_html(ranking: pd.DataFrame | None) -> str:
    """The folded table of each column's average rank (`ranks`), if any."""
    ranked = (ranking if ranking is not None else pd.DataFrame()).reset_index()
    ranked = ranked.rename(columns={"index": "column", "rows": "rows ranked"})
    if ranked.empty:
        return ""
    return _details("Average rank across rows (1 = best)", _table_html(ranked))


def _predicted_html(predicted: pd.DataFrame | None) -> str:
    """The folded ranking before training (`ranking_before_training`), if any."""
    if predicted is None or predicted.empty:
        return ""
    return _details(
        "Ranking before training (python -m benchmark.tools.rank)",
        "<p>Kendall's tau between each score, computed on frozen features before any "
        "training, and the measured test accuracy, over the backbones of each row (p: "
        "two-sided).</p>" + _table_html(predicted),
    )


def _cost_html(table: pd.DataFrame, title: str, svg: str) -> str:
    """The folded cost table with the cost-against-accuracy figure (`title`, `svg`)."""
    return _details(
        "Cost per cell (mean over finished seeds)",
        _table_html(cost_table(table))
        + f"<figure>{svg}<figcaption>{html.escape(title)}</figcaption></figure>",
    )


def _dots_html(dots: Dots) -> str:
    """The section of the dot figures, one per dataset, with their caption; "" without any."""
    if not dots.svgs:
        return ""
    dot_html = "".join(  # each figure's title names its dataset
        f'<figure aria-label="{html.escape(d)}">{svg}</figure>' for d, svg in dots.svgs
    )
    return (
        "<h2>Test accuracy per dataset</h2>"
        f'<p class="small">{html.escape(dots.caption())}</p><div class="dots">{dot_html}</div>'
    )


def _legend_html(legend: list[tuple[str, str]]) -> str:
    """The accuracy table's legend as a list; "" without any."""
    items = "".join(
        f"<li><strong>{html.escape(short)}</strong>: {html.escape(full)}</li>"
        for short, full in legend
    )
    return f'<ul class="legend">{items}</ul>' if items else ""


def _page(source: str, sections: Sequence[str]) -> str:
    """The page: its head, title and `source`, then `sections`, one a line."""
    body = "\n".join(sections)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>benchmark report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style></head><body>
<h1>{html.escape(TITLE)}</h1>
<p class="small">Source: <code>{html.escape(source)}</code></p>
{body}
</body></html>
"""


def _parser() -> argparse.ArgumentParser:
    """The command line: the store and what to read of it, where to write, and the rules."""
    parser = argparse.ArgumentParser(prog="python -m benchmark.report", description=__doc__)
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument("--sweep", default=None, help="only the cells of this sweep (its dir)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument(
        "--datasets",
        default="",
        help="comma-separated datasets whose rows are shown even without runs ('not run')",
    )
    parser.add_argument(
        "--include-debug",
        action="store_true",
        help="count runs with a partial budget (limit_*_batches < 1, fast_dev_run, max_steps)",
    )
    _add_convergence_options(parser)
    _add_verdict_options(parser)
    return parser


def _add_convergence_options(parser: argparse.ArgumentParser) -> None:
    """The thresholds of the diagnoses (`ConvergenceRule`): undertrained, diverged, overfit."""
    parser.add_argument(
        "--min-train-acc",
        type=float,
        default=ConvergenceRule.min_train_acc,
        help="a seed whose final training accuracy is below this may be undertrained (†)",
    )
    parser.add_argument(
        "--rising-epochs",
        type=int,
        default=ConvergenceRule.rising_epochs,
        help="a seed whose best validation epoch is among its last N may be undertrained (†)",
    )
    parser.add_argument(
        "--diverged-drop",
        type=float,
        default=ConvergenceRule.diverged_drop,
        help="a seed whose validation accuracy peaked in the first half of its epochs and ended "
        "more than this below the peak diverged (§)",
    )
    parser.add_argument(
        "--overfit-train-acc",
        type=float,
        default=ConvergenceRule.overfit_train_acc,
        help="a seed whose final training accuracy is at least this while its last validation "
        "accuracy is more than --overfit-drop below its best overfit (‖)",
    )
    parser.add_argument(
        "--overfit-drop",
        type=float,
        default=ConvergenceRule.overfit_drop,
        help="see --overfit-train-acc (‖)",
    )


def _add_verdict_options(parser: argparse.ArgumentParser) -> None:
    """The verdicts' rule (`VerdictRule`): the margin of equivalence and the bootstrap."""
    parser.add_argument(
        "--margin",
        type=float,
        default=VerdictRule.margin,
        help="δ: a difference in accuracy within ±δ is equivalent for the verdicts (default "
        "0.02, one test image in 50)",
    )
    parser.add_argument(
        "--bootstrap-resamples",
        type=int,
        default=VerdictRule.resamples,
        help="draws of the seeds x test images bootstrap behind the verdicts' intervals",
    )
    parser.add_argument(
        "--bootstrap-seed", type=int, default=VerdictRule.seed, help="the bootstrap's RNG seed"
    )


@dataclass(frozen=True)
class Options:
    """The command line, parsed and its rules checked (`from_args`)."""

    tracking_uri: str | None
    experiment: str
    sweep: str | None
    out: Path
    datasets: tuple[str, ...]  # rows shown even without runs
    include_debug: bool
    rule: ConvergenceRule
    verdict_rule: VerdictRule

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        """The options of `_parser`'s namespace; ValueError for a rule's invalid threshold."""
        verdict_rule = VerdictRule(
            margin=args.margin, resamples=args.bootstrap_resamples, seed=args.bootstrap_seed
        )
        rule = ConvergenceRule(
            args.min_train_acc,
            args.rising_epochs,
            diverged_drop=args.diverged_drop,
            overfit_train_acc=args.overfit_train_acc,
            overfit_drop=args.overfit_drop,
        )
        return cls(
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            sweep=args.sweep,
            out=args.out,
            datasets=tuple(d for d in args.datasets.split(",") if d),
            include_debug=args.include_debug,
            rule=rule,
            verdict_rule=verdict_rule,
        )

    def source(self, uri: str) -> str:
        """Where the runs come from, as the report says it."""
        return f"{uri}, experiment {self.experiment}" + (
            f", sweep {self.sweep}" if self.sweep else ""
        )


@dataclass(frozen=True)
class Findings:
    """What the report says, computed once (`_analyse`) and written by `write_tables` and
    `write_html`."""

    runs: pd.DataFrame  # the runs with a test score (shift tests as rows of their own)
    table: pd.DataFrame  # `summarise`'s, with each cell's bootstrap interval
    verdicts: pd.DataFrame  # every comparable pair (`comparisons`)
    ranking: pd.DataFrame
    footnote: str
    notes: list[str]
    decided: Decided
    predicted: pd.DataFrame
    dots: Dots
    left_out: list[str]  # which runs were left out and why


def _read_runs(options: Options, uri: str) -> Runs:
    """The runs of the store `uri`, after checking it can be read (LookupError,
    TrackingUnreachable, StoreError where not)."""
    check_reachable(uri)  # a tracking server that is down: said at once
    check_sqlite(uri, write=False)  # a misspelt path: no empty store created
    print(f"reading runs from {uri} ...", file=sys.stderr, flush=True)
    return load_runs(uri, options.experiment, options.sweep, options.include_debug)


def _no_runs(loaded: Runs, options: Options, uri: str) -> int:
    """What is said when no run can be reported: nothing yet (0) while cells are starting,
    else an error (1)."""
    if loaded.starting:
        print(loaded.nothing_yet)
        return 0
    said = " ".join(note for note in (loaded.footnote(), loaded.schema_note()) if note)
    print(
        f"error: no runs of the harness in experiment {options.experiment!r} of {uri}"
        + (f" for sweep {options.sweep}" if options.sweep else "")
        + (f" ({said})" if said else ""),
        file=sys.stderr,
    )
    return 1


def _scored_runs(loaded: Runs, uri: str) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Our protocol's runs (shift tests as rows of their own) and the study protocol's, each
    without a non-finite score, and the lines that say what was left out (warned here)."""
    runs, study_runs = split_protocols(loaded.frame)
    runs = with_shift_tests(runs)  # a second test of the same fits: rows of their own
    # A NaN or infinite score: never averaged, ranked or tested, and said where it is seen.
    runs, dropped = finite_scores(runs, "test_acc", uri)
    study_runs, dropped_study = finite_scores(study_runs, "max_val_acc", uri)
    left_out = [loaded.schema_note(), non_finite_note(dropped), non_finite_note(dropped_study)]
    left_out = [line for line in left_out if line]
    for line in left_out:
        print(f"warning: {line}", file=sys.stderr)
    return runs, study_runs, left_out


def _analyse(loaded: Runs, options: Options, uri: str) -> Findings:
    """The table, the comparisons, ranks, notes, verdicts and figures of the loaded runs."""
    runs, study_runs, left_out = _scored_runs(loaded, uri)
    table = summarise(runs, study_runs, options.datasets, options.rule)
    verdicts, ranking, footnote = comparisons(runs, options.rule), ranks(table), loaded.footnote()
    footnote = " ".join(note for note in (footnote, split_note(runs)) if note)
    counted = latest_per_seed(runs)
    counted = counted[counted.status == "FINISHED"]
    notes = [*trust_notes(table, options.rule), code_summary(native(counted))]
    notes = [note for note in notes if note]
    rule = with_looks(options.verdict_rule, loaded.frame)
    decided_, table = decided(counted, table, uri, rule)
    predicted = ranking_before_training(table, uri, options.experiment)
    return Findings(
        runs=runs,
        table=table,
        verdicts=verdicts,
        ranking=ranking,
        footnote=footnote,
        notes=notes,
        decided=decided_,
        predicted=predicted,
        dots=dot_figures(table),
        left_out=left_out,
    )


def _write(found: Findings, out: Path, source: str, uri: str) -> list[Path]:
    """report.md, .csv, .tex, the dot figures (`write_tables`) and report.html (`write_html`)."""
    tables = write_tables(
        found.table,
        found.verdicts,
        found.ranking,
        out,
        source,
        found.footnote,
        predicted=found.predicted,
        notes=found.notes,
        decided=found.decided,
        dots=found.dots,
        left_out=found.left_out,
    )
    page = write_html(
        found.table,
        found.runs,
        found.verdicts,
        out,
        source,
        found.footnote,
        uri,
        notes=found.notes,
        decided=found.decided,
        ranking=found.ranking,
        predicted=found.predicted,
        dots=found.dots,
        left_out=found.left_out,
    )
    return [*tables, page]


def main(argv: list[str] | None = None) -> int:
    """The report of the store's runs (`__doc__`): 0 when written (or nothing to report yet),
    1 after an error said on stderr."""
    args = _parser().parse_args(argv)
    try:
        options = Options.from_args(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if problem := out_problem(options.out):  # said before the runs are read, not after
        print(f"error: {problem}", file=sys.stderr)
        return 1
    given = options.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    use_credentials(given)
    uri = store_uri(given)
    try:
        loaded = _read_runs(options, uri)
    except (LookupError, TrackingUnreachable, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if loaded.frame.empty:
        return _no_runs(loaded, options, uri)
    found = _analyse(loaded, options, uri)
    for path in _write(found, options.out, options.source(uri), uri):
        print(f"wrote {path}")
    print(accuracy_table(found.table).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
