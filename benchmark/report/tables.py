"""MLflow runs -> pandas -> the answer tables.

Rules, stated in the report too: of each (cell, seed) the latest FINISHED run counts, else the
latest run (a rerun that finished replaces what it reran; a failed retry does not hide a result,
as a relaunch would skip that cell too); a cell's accuracy is the mean ± sd over its FINISHED
seeds; failed, running and never-run cells are shown as such, never dropped or averaged in.
Marks on those numbers (diverged, below its start, may be undertrained, overfit, seeds on
different commits): report/trust.py.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from benchmark.report.stats import seed_summary
from benchmark.report.trust import (
    BELOW_START,
    CONVERGENCE_METRICS,
    DEFAULT_RULE,
    DIAGNOSES,
    DIVERGED,
    EXEMPT_STRATEGIES,
    MIXED_COMMITS_MARK,
    OVERFIT,
    UNDERTRAINED,
    Convergence,
    ConvergenceRule,
    cell_checks,
)
from benchmark.tracking.identity import (
    CELL_GROUP_TAG,
    CELL_PARAMS,
    DEBUG_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    HARNESS_TAG,
    KIND_TAG,
    LOGGED_PARAMS,
    LOOK_TAG,
    RANK_SCORES,
    SCHEMA_TAG,
    SCHEMA_VERSION,
    TRIAL_KIND,
    content_labels,
    is_volatile,
)
from benchmark.tracking.store import artifact_file, end_stale_runs

CELL = list(CELL_PARAMS)
GROUP = [*CELL, "variant"]  # one experiment: runs that differ only in their seed
RULES = (
    "Each cell: held-out test accuracy of the checkpoint selected on validation accuracy, "
    "mean ± sd over seeds (n = FINISHED seeds). Of each (cell, seed) the latest FINISHED run "
    "counts (as for a relaunch, which skips it), else the latest run; failed, running and "
    "never-run cells are marked, never averaged in (a column with no run in any row is left "
    "out, and so is a dataset with no run at all: one line names it). Runs that differ in "
    "anything but the seed are separate columns, each under one short label in every row (the "
    "legend under the table says the settings it stands for). [a, b]: 95 % t interval of the "
    "mean, clipped to [0, 1]. "
    "The study's numbers (ResNet-18, 15 epochs, maximum validation accuracy over epochs) are "
    "another backbone and protocol: shown beside ours, not subtracted. Where protocol=study "
    "ran (the study's recipe on our backbone, its maximum validation accuracy over epochs read "
    "off the evaluation split: optimistic), its number has a column of its own and the "
    "difference to ours is against it. "
    "Marks on a cell when any of its seeds' fits went wrong (the rules with their thresholds, "
    "and each marked cell's seeds with their numbers, are under the table): "
    f"{DIVERGED.mark} diverged (validation accuracy peaked early and fell far); "
    f"{BELOW_START.mark} below its start (a fine-tune from a fitted head, lp_ft's probe, ended "
    f"below that head); {UNDERTRAINED.mark} may be undertrained (validation accuracy still rising "
    "at its last epoch, or a low final training accuracy); "
    f"{OVERFIT.mark} overfit (training fitted while validation fell from its best). "
    "Cells whose runs did not log what a rule needs say so and are not taken for clear of it; "
    f"{', '.join(EXEMPT_STRATEGIES)} (closed-form/LBFGS, no epochs) is exempt. "
    f"{MIXED_COMMITS_MARK}: the cell's seeds ran on different code commits."
)
COST_METRICS = ["wall_time_s", "train_images_per_s", "peak_rss_mb", "peak_gpu_mem_mb"]

# The study's table (fine-tune / freeze), for the rows it covers.
REFERENCE = pd.DataFrame(
    [
        ("hymenoptera", "rgb", 0.954, 0.961),
        ("hymenoptera", "gray", 0.922, 0.902),
        ("simpsons", "rgb", 0.925, 0.642),
        ("simpsons", "gray", 0.902, 0.543),
        ("dogs_vs_cats", "rgb", 0.989, 0.981),
        ("dogs_vs_cats", "gray", 0.989, 0.976),
        ("caltech256", "rgb", 0.674, 0.543),
        ("caltech256", "gray", 0.613, 0.435),
    ],
    columns=["dataset", "colour", "finetune", "freeze"],
).melt(["dataset", "colour"], var_name="strategy", value_name="study_val_acc")
# The data the study's numbers come from: classes and images of each dataset.
STUDY_DATA = {
    "hymenoptera": (2, 397),
    "simpsons": (20, 19_548),
    "dogs_vs_cats": (2, 25_000),
    "caltech256": (257, 30_607),
}


# The `benchmark.schema` versions this code reads (identity.SCHEMA_TAG): a run of another was
# written by a harness whose tags and metrics may mean something else, and is left out.
KNOWN_SCHEMAS = (SCHEMA_VERSION,)


@dataclass
class Runs:
    """The harness's cell runs, and what was left out of them (counted for a footnote)."""

    frame: pd.DataFrame
    foreign: int = 0  # runs in the experiment that the harness did not make
    debug: int = 0  # partial-budget runs left out (--include-debug counts them)
    starting: int = 0  # cell runs opened that have not logged their params yet
    # The harness's runs of a schema this code does not know: schema -> how many, left out.
    schemas: dict[str, int] = field(default_factory=dict)

    def schema_note(self) -> str:
        """The one line that says which runs of an unknown schema were left out, and the fix."""
        if not self.schemas:
            return ""
        counted = " and ".join(
            f"{n} run(s) of {SCHEMA_TAG} {schema}" for schema, n in sorted(self.schemas.items())
        )
        return (
            f"Left out: {counted}, which this code (schema {', '.join(KNOWN_SCHEMAS)}) does not "
            "know: their tags and metrics may mean something else. Report them with the harness "
            "version that wrote them, or rerun their cells with this one."
        )

    @property
    def nothing_yet(self) -> str:
        """The one line said when no run can be placed in a row yet (cells just starting)."""
        return f"nothing to report yet: {self.starting} cell run(s) starting, no params logged."

    def footnote(self) -> str:
        notes = []
        if self.foreign:
            notes.append(f"{self.foreign} run(s) not made by the harness were ignored")
        if self.debug:
            notes.append(
                f"{self.debug} debug run(s) with a partial budget (limit_*_batches, "
                "fast_dev_run, max_steps) were left out (--include-debug counts them)"
            )
        if self.starting:
            notes.append(f"{self.starting} cell run(s) just starting (no params logged yet)")
        return "; ".join(notes) + "." if notes else ""


def split_note(runs: pd.DataFrame) -> str:
    """Which test split each dataset's FINISHED runs used (the `test_split` param; runs from
    before it was logged say nothing), e.g. "Test split: simpsons official; ..."."""
    shifted = sorted(set(runs.dataset[runs["shift"].astype(bool)])) if "shift" in runs else []
    runs = native(runs)
    done = runs[(runs.status == "FINISHED") & runs.test_split.notna()]
    shift = (
        f" {', '.join(shifted)}: a second test of the same trained models on another "
        "distribution (dataset.shift_test; Kaggle's Simpsons test set, its frames downscaled "
        "x0.357), a row of its own, never pooled with the native test; its comparisons are "
        "exploratory, in no verdict."
        if shifted
        else ""
    )
    if done.empty:
        return shift.strip()
    counts = done.groupby("dataset").test_split.value_counts()
    per = [
        f"{dataset} "
        + ", ".join(
            f"{split}" if len(splits) == 1 else f"{split} ({n} runs)"
            for split, n in splits.droplevel(0).items()
        )
        for dataset, splits in counts.groupby(level=0)
    ]
    return (
        f"Test split: {'; '.join(per)} (official: the dataset's own test set, e.g. Hymenoptera's "
        "val/ or Kaggle's Simpsons test set; carved: held out from its images by "
        "dataset.test_split)."
    ) + shift


# What varies between runs without being an experiment of its own: never labels a row. Besides
# these, what a cell logs of its data (LOGGED_PARAMS) and where it writes or logs (VOLATILE_KEYS:
# paths, tracking, logger...), which its cell_group leaves out too.
# dataset.shift_test adds a second test of the same model (its native splits are what they would
# be without it): a cell with it is the same column as one without, its shift test a row of its
# own (`with_shift_tests`).
NOT_A_VARIANT = {"seed", "probe_c_chosen", *LOGGED_PARAMS, "dataset.shift_test", "n_shift"}


def _is_setting(key: str) -> bool:
    """Whether a logged param is part of what a cell computes (so it may name a variant)."""
    return not is_volatile(key) and key not in NOT_A_VARIANT


# What a tuned run logs of its outcome (values chosen per seed, the donor run), not a setting.
TUNE_OUTCOMES = ("tune.chosen.", "tune.searched", "tune.reused_from")
# Named by the tune group's choice (tune=fair) when runs differ in it, not key by key.
TUNE_CHOICE, TUNE_OWN = "tune.name", ("tune.reuse_seed",)


def _setting(key: str, value: object) -> str | None:
    unset = str(value) in ("default", "None")  # never set, or logged null
    if key == TUNE_CHOICE:  # the group's choice, as on the command line
        return f"tune={'none' if unset else value}"
    if key in TUNE_OWN and unset:  # an option of the tuning: nothing to say without it
        return None
    return f"{key}={value}"


def _variant_keys(first: pd.DataFrame, params: list[str]) -> list[str]:
    """The settings that tell these cell groups apart: a `tune` group's keys by its name
    (`tune=fair`), never what tuning chose."""
    differ = [c for c in params if first[c].astype(str).nunique() > 1]
    differ = [c for c in differ if not c.removeprefix("params.").startswith(TUNE_OUTCOMES)]
    return _tune_keys(differ)


def load_runs(
    tracking_uri: str, experiment: str, sweep: str | None = None, include_debug: bool = False
) -> Runs:
    """The harness's cell runs: cell params, variant, seed, status, start time, test accuracy
    and cost. Runs without the harness's tags are ignored and counted; so are debug runs."""
    every = _experiment_runs(tracking_uri, experiment, sweep)
    if every.empty:
        return Runs(every)
    # A cell's run before it logged its params (a sweep's first cell) has no params columns.
    every = every.reindex(columns=[*every.columns, *_TAGS.difference(every.columns)])
    every = every.reindex(columns=[*every.columns, *_PARAMS.difference(every.columns)])
    cells, foreign, schemas = _run_kinds(every)
    runs = every[cells]
    starting = runs["params.dataset"].isna()  # opened, its params not logged yet
    runs = runs[~starting]
    debug = runs[f"tags.{DEBUG_TAG}"].eq("true")
    if not include_debug:
        runs = runs[~debug]
    left_out = 0 if include_debug else int(debug.sum())
    return Runs(_cell_frame(runs), foreign, left_out, int(starting.sum()), schemas)


def _experiment_runs(tracking_uri: str, experiment: str, sweep: str | None) -> pd.DataFrame:
    """Every run of `experiment` (of the sweep in the folder `sweep` alone, when given), as
    MLflow's `search_runs` gives them; stale RUNNING runs ended first (FAILED)."""
    mlflow.set_tracking_uri(tracking_uri)
    if (experiment_ := mlflow.get_experiment_by_name(experiment)) is None:
        raise LookupError(f"no experiment {experiment!r} in {tracking_uri}: run a sweep first.")
    # A run left RUNNING by a process that is gone is FAILED: the rule a relaunch applies too.
    end_stale_runs(mlflow.MlflowClient(tracking_uri), [experiment_.experiment_id])
    folder = str(Path(sweep).resolve()) if sweep else None
    query = sweep_filter(folder) if folder else ""
    every = mlflow.search_runs(experiment_names=[experiment], filter_string=query)
    if folder and not every.empty:  # sweep_filter's LIKE: the runs of this folder exactly
        every = every[every.get("tags.sweep", pd.Series(None, index=every.index)).eq(folder)]
    return every


def _run_kinds(every: pd.DataFrame) -> tuple[pd.Series, int, dict[str, int]]:
    """Which runs are the harness's cell runs (a mask), how many runs the harness did not make,
    and the harness's runs of a schema this code does not know (schema -> how many)."""
    harness, schema = every[f"tags.{HARNESS_TAG}"].eq("benchmark"), every[f"tags.{SCHEMA_TAG}"]
    unknown = harness & schema.notna() & ~schema.isin(KNOWN_SCHEMAS)
    cells = harness & schema.isin(KNOWN_SCHEMAS) & every[f"tags.{KIND_TAG}"].eq("cell")
    # A sweep's parent run, a backbone's ranking scores and a tuned cell's trials (child runs)
    # are the harness's too (a sweep's before schema 2's tag, by its kind alone).
    sweeps = harness & ~unknown & every[f"tags.{KIND_TAG}"].isin(["sweep", "rank", TRIAL_KIND])
    schemas = {str(k): int(n) for k, n in schema[unknown].value_counts().items()}
    foreign = int((~cells & ~sweeps & ~unknown).sum())
    return cells, foreign, schemas


def _wanted_columns() -> dict[str, str]:
    """The columns of MLflow's runs that the report reads -> its names for them."""
    wanted = {f"params.{p}": p for p in [*CELL, "seed"]}
    wanted |= {f"metrics.{m}": m for m in ["test_acc", "max_val_acc", *COST_METRICS, "tune_s"]}
    wanted |= {"params.protocol.selection": "selection", "params.n_classes": "n_classes"}
    wanted |= {"params.tune.trials": "tune_trials", "params.tune.reuse_seed": "tune_reuse_seed"}
    wanted |= {"params.tune.name": "tune_name"}
    wanted |= {f"params.n_{split}": f"n_{split}" for split in (*SPLITS, SHIFT)}
    wanted |= {"params.dataset.shift_test": "shift_test", f"metrics.{SHIFT_METRIC}": SHIFT_METRIC}
    wanted |= {"metrics.best_val_acc": "best_val_acc", "tags.device": "device"}
    wanted |= {"tags.error": "error", "params.test_split": "test_split"}
    wanted |= {f"metrics.{m}": m for m in CONVERGENCE_METRICS}
    wanted |= {"params.strategy.head_init": "head_init"}  # probe: it starts from a fitted head
    wanted |= {f"tags.{GIT_COMMIT_TAG}": "git_commit", f"tags.{GIT_DIRTY_TAG}": "git_dirty"}
    wanted |= {f"tags.{LOOK_TAG}": "look"}  # added by a second look (benchmark.tools.seeds)
    return wanted


def _cell_frame(runs: pd.DataFrame) -> pd.DataFrame:
    """The cell runs (MLflow's columns) as the report's frame: labels, variant, the columns of
    `_wanted_columns` under their names (NA where no run logged one), image counts, column
    labels."""
    runs = runs.assign(**{"params.backbone": backbone_labels(runs)})
    runs = runs.assign(variant=variants(runs), dataset_label=dataset_labels(runs))
    wanted = _wanted_columns()
    runs = runs.rename(columns=wanted)
    for column in set(wanted.values()) - set(runs.columns):
        runs[column] = pd.NA
    images = sum(pd.to_numeric(runs[f"n_{s}"], errors="coerce").fillna(0) for s in SPLITS)
    runs = runs.assign(
        dataset=runs.dataset_label,
        selection=runs.selection.fillna("held_out").astype(object),
        n_classes=pd.to_numeric(runs.n_classes, errors="coerce"),
        n_images=images.where(images > 0),
        tune_trials=pd.to_numeric(runs.tune_trials, errors="coerce"),  # "None": untuned
        tune_reuse_seed=pd.to_numeric(runs.tune_reuse_seed, errors="coerce"),
    )
    runs = runs.assign(**column_labels(runs))  # once, over every run: one label per setting
    columns = ["run_id", "artifact_uri", "status", "start_time", *wanted.values()]
    columns += ["variant", "n_images", "column", "column_full"]
    return runs[columns].reset_index(drop=True)


# What MLflow's filter strings cannot hold inside a quoted value: they have no escape for its
# quote, and a backslash there escapes what follows.
_UNQUOTABLE = re.compile(r"['\"\\]")


def sweep_filter(folder: str) -> str:
    """MLflow's filter for the runs of the sweep in `folder` (their tag `sweep`). A folder with a
    quote or a backslash in its path is matched with LIKE, each of those as `_` (any one
    character): a superset, which `load_runs` narrows to the folder exactly."""
    if not _UNQUOTABLE.search(folder):
        return f"tags.sweep = '{folder}'"
    return f"tags.sweep LIKE '{_UNQUOTABLE.sub('_', folder)}'"


# The largest float: MLflow's SQL stores keep it (or its negative) in place of an infinity.
LARGEST_FLOAT = sys.float_info.max


def finite_scores(runs: pd.DataFrame, score: str, uri: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`runs` less each FINISHED run whose `score` (test_acc; a shift test's row: its run's
    shift_test_acc) was logged but is not a finite number: NaN, +inf or -inf (as MLflow's SQL
    stores keep it: the largest float). Such a score is never averaged, ranked or tested; the
    seed counts as if that run had not been made (an earlier FINISHED run of it counts, else it
    has none). Also those runs, each with `score` (its name) and `value` ("NaN", "+inf", "-inf"),
    less any that a later FINISHED run of the same cell and seed replaces anyway. A run that
    logged no score at all is kept, as before (MLflow reads that as NaN too: the store says
    which)."""
    empty = runs.iloc[0:0].assign(score=score, value="")
    if runs.empty or score not in runs:
        return runs, empty
    values = pd.to_numeric(runs[score], errors="coerce").astype(float)
    finished = runs.status.eq("FINISHED")
    infinite = finished & values.abs().ge(LARGEST_FLOAT)
    logged_nan = pd.Series(False, index=runs.index)
    client = mlflow.MlflowClient(uri)
    for i in runs.index[finished & values.isna()]:
        run_id = str(runs.run_id[i])
        shift = run_id.endswith(SHIFT_RUN)
        metrics = client.get_run(run_id.removesuffix(SHIFT_RUN)).data.metrics
        logged_nan[i] = (SHIFT_METRIC if shift else score) in metrics
    bad = infinite | logged_nan
    if not bad.any():
        return runs, empty
    kept, dropped = runs[~bad], runs[bad]
    done = kept.loc[kept.status.eq("FINISHED"), [*GROUP, "seed", "start_time"]]
    pairs = dropped[[*GROUP, "seed", "start_time", "run_id"]].merge(
        done, on=[*GROUP, "seed"], suffixes=("", "_kept")
    )
    dropped = dropped[~dropped.run_id.isin(pairs.run_id[pairs.start_time_kept > pairs.start_time])]
    said = values[dropped.index].map(
        lambda v: "NaN" if np.isnan(v) else "+inf" if v > 0 else "-inf"
    )
    shifts = dropped.run_id.astype(str).str.endswith(SHIFT_RUN)
    return kept, dropped.assign(score=shifts.map({True: SHIFT_METRIC, False: score}), value=said)


def non_finite_note(left_out: pd.DataFrame) -> str:
    """The one line naming the runs `finite_scores` left out, and what to do about them."""
    if left_out.empty:
        return ""
    named = "; ".join(
        f"{r.dataset} / {r.colour} / {c} / seed {r.seed} "
        f"(run {str(r.run_id).removesuffix(SHIFT_RUN)}: {r.score} {r.value})"
        for r, c in zip(left_out.itertuples(), column_names(left_out), strict=True)
    )
    return (
        f"Left out: {len(left_out)} FINISHED run(s) whose score is not a finite number, never "
        "averaged, ranked or tested (an earlier FINISHED run of the same seed counts instead, if "
        f"any): {named}. Rerun those seeds (rerun=true: a relaunch skips a FINISHED cell) "
        "to measure them."
    )


_TAGS = {f"tags.{t}" for t in (HARNESS_TAG, SCHEMA_TAG, KIND_TAG, DEBUG_TAG)}
_PARAMS = {f"params.{p}" for p in (*CELL, "seed")}


PREDICTIONS = "test_predictions.json"  # the cell's per-image test predictions (mlflow.log_table)
# The second test of the same model (dataset.shift_test): its accuracy, its predictions (the same
# format), the suffix of its row's run_id (`with_shift_tests`) and what its row is called.
SHIFT, SHIFT_METRIC, SHIFT_PREDICTIONS, SHIFT_RUN = (
    "shift", "shift_test_acc", "shift_predictions.json", "#shift"
)  # fmt: skip
SHIFT_NAMES = {"simpsons": "x0.357 shift"}  # Kaggle's test set: frames downscaled x0.357
SHIFT_LABEL = " · "  # between a dataset and its shift's name: "simpsons · x0.357 shift"
SHIFT_DEFAULT = "shift test"  # another dataset's


def shift_label(dataset: str) -> str:
    """The row of `dataset`'s shift test: "simpsons · x0.357 shift"."""
    return f"{dataset}{SHIFT_LABEL}{SHIFT_NAMES.get(dataset, SHIFT_DEFAULT)}"


def with_shift_tests(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` (`shift` False) and, for each run made with dataset.shift_test (or that logged
    shift_test_acc), its second test as a run of its own (`shift` True): the same cell, seed,
    status and diagnoses, in the dataset row `shift_label` (never pooled with the native test),
    its test_acc the shift's, its n_test n_shift, its run_id suffixed `SHIFT_RUN` (its
    predictions: `SHIFT_PREDICTIONS`)."""
    runs = runs.assign(shift=False)
    flag = runs.get("shift_test", pd.Series(pd.NA, index=runs.index)).astype(str).str.lower()
    accuracy = pd.to_numeric(runs.get(SHIFT_METRIC, pd.Series(np.nan, index=runs.index)))
    shifted = runs[flag.eq("true") | accuracy.notna()]
    if shifted.empty:
        return runs
    copies = shifted.assign(
        dataset=shifted.dataset.map(shift_label),
        test_acc=accuracy[shifted.index],
        n_test=shifted.get("n_shift", pd.Series(pd.NA, index=shifted.index)),
        run_id=shifted.run_id.astype(str) + SHIFT_RUN,
        test_split=SHIFT,
        shift=True,
    )
    return pd.concat([runs, copies], ignore_index=True)


def native(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` less its shift-test rows (`with_shift_tests`): what the verdicts, the ranks, the
    cost and the learning curves read, each fit once."""
    if "shift" not in frame:
        return frame
    return frame[~frame["shift"].fillna(False).astype(bool)]


def load_predictions(runs: pd.DataFrame, uri: str) -> dict[str, pd.DataFrame]:
    """Per run that logged `test_predictions.json` (columns path, label, predicted), its test
    images and whether each was predicted right: run_id -> frame (`path`, `correct`); a shift
    test's row (run_id ending `SHIFT_RUN`): its run's `shift_predictions.json`. Runs from
    before the cell logged it are absent (the verdicts fall back to test_acc x n_test)."""
    out = {}
    for run in runs.itertuples():
        run_id = str(run.run_id)
        name = SHIFT_PREDICTIONS if run_id.endswith(SHIFT_RUN) else PREDICTIONS
        file = artifact_file(uri, run_id.removesuffix(SHIFT_RUN), str(run.artifact_uri), name)
        if file is None:
            continue
        table = json.loads(file.read_text())
        frame = pd.DataFrame(table["data"], columns=table["columns"])
        correct = frame.label.astype(str).eq(frame.predicted.astype(str))
        out[run_id] = pd.DataFrame({"path": frame.path.astype(str), "correct": correct})
    return out


def dataset_labels(runs: pd.DataFrame) -> pd.Series:
    """The study's datasets by name; a user's own by its folder or file (imagefolder:my_photos),
    so two folders are two rows."""
    labels = runs["params.dataset"].astype(object).copy()
    for name, key in (("imagefolder", "params.dataset.root"), ("csv", "params.dataset.file")):
        if key in runs:
            own = runs["params.dataset"].eq(name) & runs[key].notna()
            labels[own] = name + ":" + runs.loc[own, key].map(lambda p: Path(p).name)
    return content_labels(labels, runs)  # two datasets in folders named alike: @<content>


def backbone_labels(runs: pd.DataFrame) -> pd.Series:
    """The backbone by name; a timm model by its own (timm:convnext_small.fb_in22k_ft_in1k)."""
    labels = runs["params.backbone"].astype(object).copy()
    if "params.backbone.model" in runs:
        named = labels.eq("timm") & runs["params.backbone.model"].notna()
        labels[named] = "timm:" + runs.loc[named, "params.backbone.model"].astype(str)
    return labels


def variants(runs: pd.DataFrame) -> pd.Series:
    """For runs of one dataset x colour x strategy x backbone made with different settings (the
    tag cell_group: the config less the seed), the keys that differ, as `key=value, ...`; empty
    when no row has two settings of that strategy x backbone. Such runs are separate columns,
    never averaged together. The keys are chosen over the whole report (those that tell two
    settings of a strategy x backbone apart in any row) and say every row's setting of them, so
    one setting has one label, in every row: a lone 2-epoch finetune in one row sits in the
    same column as the 2-epoch finetune beside a 10-epoch one in another."""
    label = pd.Series("", index=runs.index, dtype=object)
    logged = [c for c in runs.columns if c.startswith("params.")]
    params = [c for c in logged if _is_setting(c.removeprefix("params."))]
    keys = ["params.dataset", *dataset_keys(runs), *[f"params.{c}" for c in CELL[1:]]]
    keys += [k for k in ("params.protocol",) if k in runs]  # a protocol is compared, not a variant
    group = f"tags.{CELL_GROUP_TAG}"
    column = ["params.strategy", "params.backbone"]
    cells = []
    differ: dict[tuple, set[str]] = {}
    for _, cell in runs.groupby(keys, dropna=False):
        # Each group as its latest run says it (an older run may predate a key, or be superseded).
        latest = cell.sort_values("start_time").drop_duplicates(group, keep="last")
        first = latest.set_index(group)[params].astype(object)
        # A key one run logged as null and another (older code) did not log is the same setting.
        first = first.where(first.notna() & first.ne("None"), "default")
        where = tuple(cell[column].iloc[0])
        cells.append((cell, first, where))
        if cell[group].nunique() > 1:
            differ.setdefault(where, set()).update(_variant_keys(first, params))
    for cell, first, where in cells:
        said_keys = _tune_keys(sorted(differ.get(where, ())))
        for key, row in first.iterrows():
            said = (_setting(c.removeprefix("params."), row[c]) for c in said_keys)
            label[cell.index[cell[group] == key]] = ", ".join(s for s in said if s)
    return label


def _tune_keys(differ: list[str]) -> list[str]:
    """A `tune` group's keys by its name, never what tuning chose; in one order whatever order
    the store lists params in: the tune group first, as typed (also on keys gathered from
    several rows)."""
    if f"params.{TUNE_CHOICE}" in differ:
        keep = {TUNE_CHOICE, *TUNE_OWN}
        differ = [
            c
            for c in differ
            if not c.startswith("params.tune.") or c.removeprefix("params.") in keep
        ]
    return sorted(differ, key=lambda c: (c != f"params.{TUNE_CHOICE}", c))


def dataset_keys(runs: pd.DataFrame) -> list[str]:
    return [k for k in ("params.dataset.root", "params.dataset.file") if k in runs]


SPLITS = ("train", "val", "test")
STUDY_PROTOCOL = "max_eval"  # protocol=study's selection: its runs are read apart from ours


def split_protocols(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Our runs (held-out test accuracy) and protocol=study's (max validation accuracy over
    epochs): two different numbers, never pooled."""
    study = runs.selection.eq(STUDY_PROTOCOL)
    return runs[~study], runs[study]


def latest_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Of each (cell, seed): its latest FINISHED run, else its latest run. The rule a relaunch
    applies: a cell that FINISHED is done, whatever a later attempt did."""
    ordered = runs.assign(_done=runs.status == "FINISHED").sort_values(["_done", "start_time"])
    return ordered.groupby([*GROUP, "seed"]).tail(1).drop(columns="_done")


def summarise(
    runs: pd.DataFrame,
    study_runs: pd.DataFrame | None = None,
    datasets: Sequence[str] = (),
    rule: ConvergenceRule = DEFAULT_RULE,
) -> pd.DataFrame:
    """One row per cell: each dataset x colour of the runs (and of `datasets`, expected even
    without runs), crossed with each strategy x backbone x variant they hold, missing cells
    included. Accuracy: n, mean, sd and a 95 % t interval over the counted FINISHED seeds; cost
    means; failed and running counts; the study's number (its own protocol and backbone) beside
    it, never subtracted; protocol=study's on the same backbone (`study_runs`), with ours minus
    it; whether its seeds converged (`rule`) and which code they ran (report/trust.py)."""
    latest = latest_per_seed(runs)
    finished = latest[latest.status == "FINISHED"]
    summary = seed_summary(finished, GROUP, "test_acc", bounds=(0.0, 1.0)).set_index(GROUP)
    accuracy = summary.rename(
        columns={
            "mean": "test_acc_mean",
            "sd": "test_acc_sd",
            "ci_low": "test_acc_ci_low",
            "ci_high": "test_acc_ci_high",
        }
    )
    cost = finished.groupby(GROUP)[COST_METRICS].mean()
    # The tuning, paid once by the seed that tuned (a seed reusing its choice logs 0).
    cost = cost.join(finished.groupby(GROUP).tune_s.max())
    devices = finished.groupby(GROUP).device.agg(lambda d: ", ".join(sorted(set(d.dropna()))))
    data = latest.groupby(GROUP)[["n_classes", "n_images", "tune_trials", "tune_reuse_seed"]].max()
    states = pd.crosstab([latest[c] for c in GROUP], latest.status)
    every = pd.concat([runs, study_runs]) if study_runs is not None else runs
    expected = pd.Series([*every.dataset.dropna().unique(), *datasets], dtype=object)
    rows = pd.MultiIndex.from_product(
        [_ordered(expected), _ordered(every.colour)], names=["dataset", "colour"]
    )
    columns = runs[GROUP[2:]].drop_duplicates()
    columns = columns.iloc[sorted(range(len(columns)), key=lambda i: _order_key(columns.iloc[i]))]
    grid = pd.MultiIndex.from_tuples(
        [(*row, *column) for row in rows for column in columns.itertuples(index=False)],
        names=GROUP,
    )
    checks = cell_checks(finished, GROUP, rule).set_index(GROUP)
    table = pd.DataFrame(index=grid).join([accuracy, cost, devices, data, checks])
    flags = [*(d.key for d in DIAGNOSES), "mixed_commits"]
    table = table.fillna({**dict.fromkeys(flags, False), "marks": ""})
    table = table.astype(dict.fromkeys(flags, bool))
    for status in ("FAILED", "RUNNING"):
        table[status.lower()] = states.get(status, 0)
    table = table.fillna({"n": 0, "failed": 0, "running": 0}).astype(
        {"n": int, "failed": int, "running": int}
    )
    table = table.reset_index().merge(REFERENCE, on=["dataset", "colour", "strategy"], how="left")
    table["state"] = table.apply(_state, axis=1)
    if {"column", "column_full"} <= set(runs.columns):  # the labels load_runs gave the runs
        labels = runs.drop_duplicates(GROUP[2:]).set_index(GROUP[2:])[["column", "column_full"]]
        table = table.join(labels, on=GROUP[2:])
    else:
        table = table.assign(**column_labels(table))
    shifted = set(runs.dataset[runs["shift"].astype(bool)]) if "shift" in runs else set()
    table["shift"] = table.dataset.isin(shifted)
    return with_study_protocol(table, study_runs)


SAME_BACKBONE = ["dataset", "colour", "strategy", "backbone"]


def with_study_protocol(table: pd.DataFrame, study_runs: pd.DataFrame | None) -> pd.DataFrame:
    """protocol=study's max validation accuracy over epochs per dataset x colour x strategy x
    backbone (n, mean, sd, interval over its FINISHED seeds), and ours minus its mean."""
    columns = [f"study_protocol_{c}" for c in ("n", "mean", "sd", "ci_low", "ci_high")]
    if study_runs is None or study_runs.empty:
        return table.assign(**{c: pd.NA for c in columns}, delta_vs_study_protocol=pd.NA)
    latest = latest_per_seed(study_runs)
    finished = latest[latest.status == "FINISHED"]
    summary = seed_summary(finished, SAME_BACKBONE, "max_val_acc", bounds=(0.0, 1.0))
    summary.columns = [*SAME_BACKBONE, *columns]
    table = table.merge(summary, on=SAME_BACKBONE, how="left")
    table["study_protocol_n"] = table.study_protocol_n.fillna(0).astype(int)
    table["delta_vs_study_protocol"] = table.test_acc_mean - table.study_protocol_mean
    return table


def _order_key(column: pd.Series) -> tuple:
    first = {"finetune": 0, "freeze": 1}
    return (first.get(column.strategy, 2), column.strategy, column.backbone, column.variant)


def _ordered(values: pd.Series) -> list[str]:
    """Alphabetical, but in the study's order where it has one (its datasets first, as its
    table lists them; rgb before gray)."""
    first = {"rgb": 0, "gray": 1, "finetune": 0, "freeze": 1}
    first |= {"hymenoptera": 0, "simpsons": 1, "dogs_vs_cats": 2, "caltech256": 3}

    def key(value: str) -> tuple:  # a dataset's shift test right after it
        shift = value.endswith((*SHIFT_NAMES.values(), SHIFT_DEFAULT))
        base = value.rsplit(SHIFT_LABEL, 1)[0] if shift else value
        return (first.get(base, 4), base, value != base, value)

    return sorted(values.dropna().unique(), key=key)


def _state(row: pd.Series) -> str:
    if row.n:
        return "finished"
    if row.running:
        return "running"
    return "failed" if row.failed else "not run"


def _accuracy_text(row: pd.Series) -> str:
    if not row.n:
        return row.state
    text = f"{row.test_acc_mean:.3f}"
    if row.n > 1:
        text += f" ± {row.test_acc_sd:.3f} [{row.test_acc_ci_low:.3f}, {row.test_acc_ci_high:.3f}]"
    text += f" (n={row.n}"
    text += f", {row.failed} failed" if row.failed else ""
    text += f", {row.running} running" if row.running else ""
    text += ")"
    text += f" {row.marks}" if isinstance(row.get("marks"), str) and row.marks else ""
    return text + (f" {MIXED_COMMITS_MARK}" if row.get("mixed_commits", False) else "")


def trust_notes(table: pd.DataFrame, rule: ConvergenceRule) -> list[str]:
    """The lines under the accuracy table: per diagnosis, its mark, its rule and the cells that
    have it (each marked seed with its numbers); which cells did not log what a rule needs; which
    ran their seeds on different commits."""
    done = native(table[table.n > 0])  # a shift test's row: the same fits, said once
    if done.empty:
        return []
    names = done.dataset + " / " + done.colour + " / " + column_names(done)
    notes = []
    checked = done.checked.fillna("").astype(str).str.split(", ")
    unlogged = done.not_logged.fillna("").astype(str)
    for diagnosis in DIAGNOSES:
        marked = done[diagnosis.key]
        whys = done[f"{diagnosis.key}_why"]
        listed = "; ".join(f"{n} ({w})" for n, w in zip(names[marked], whys[marked], strict=True))
        if marked.any() or checked.map(lambda c, d=diagnosis: d.label in c).any():
            notes.append(  # "no cell" only where some cell could be checked
                f"{diagnosis.mark} {diagnosis.name.capitalize()} ({rule.text(diagnosis)}): "
                + (listed or "no cell")
                + "."
            )
    if unlogged.ne("").any():
        shown = unlogged.ne("")
        # A cell none of whose rules could be checked by its name alone, else with those that
        # could not.
        said = [
            n if c == [""] else f"{n} ({u})"
            for n, c, u in zip(names[shown], checked[shown], unlogged[shown], strict=True)
        ]
        suffixes = {s[len(n) :] for s, n in zip(said, names[shown], strict=True)}
        every = shown.sum() == done.convergence.ne(Convergence.exempt).sum()
        notes.append(
            "Convergence not logged (runs from before the cell logged what a rule needs: not "
            "taken for clear of it): "
            + (f"every cell{suffixes.pop()}" if every and len(suffixes) == 1 else ", ".join(said))
            + "."
        )
    if done.convergence.eq(Convergence.exempt).any():
        notes.append(
            f"{', '.join(EXEMPT_STRATEGIES)}: exempt from the convergence checks "
            "(a closed-form/LBFGS fit, no epochs)."
        )
    reuse = pd.to_numeric(done.get("tune_reuse_seed", pd.Series(dtype=float)), errors="coerce")
    if reuse.notna().any():
        seeds = ", ".join(sorted({f"{s:.0f}" for s in reuse.dropna()}))
        notes.append(
            f"Tuned once, on seed {seeds}'s validation split (tune.reuse_seed): the other seeds "
            "fit at the values it chose, so their interval leaves out the tuning's own "
            "variance: " + ", ".join(names[reuse.notna()]) + "."
        )
    mixed = done.mixed_commits
    if mixed.any():
        notes.append(
            f"{MIXED_COMMITS_MARK} Seeds ran on different code commits: "
            + "; ".join(
                f"{n} ({c})" for n, c in zip(names[mixed], done.commits[mixed], strict=True)
            )
            + "."
        )
    return notes


def column_names(table: pd.DataFrame) -> pd.Series:
    """Each cell's column as the report names it: its short label (`column_labels`), the one
    `load_runs` gave its runs when `table` carries it (one label per setting, whichever rows and
    columns a frame holds), else worked out from `table` alone."""
    if table.empty:  # no cell finished yet
        return pd.Series(dtype=object, index=table.index)
    if "column" in table and table["column"].notna().all():
        return table["column"].astype(object)
    return column_labels(table)["column"]


def column_labels(table: pd.DataFrame) -> pd.DataFrame:
    """Per row of `table` (strategy, backbone, variant, optionally tune_trials), its column's
    `column`, a short label, and `column_full`, the settings it stands for (the legend under the
    table says one by the other).

    Short: the strategy (with the backbone when the runs use several), the settings that tell it
    from another column of that strategy other than the tuning's (`finetune · trainer.max_epochs=3`)
    and "(tuned)" when it was tuned: never linear_probe, whose C grid is its fit (no trials).
    Where two settings would share a short label (two tunings of one strategy) each says its
    tuning's keys instead; where they still would, the full label. Full: strategy, backbone,
    variant and the cap on trials (`finetune · tune=fair, tune.reuse_seed=0 · tuned (at most 8
    trials)`), one per column also in rows where it has no run (a dataset not run: the trials
    its runs in other rows had)."""
    if table.empty:
        return pd.DataFrame(
            {"column": pd.Series(dtype=object), "column_full": pd.Series(dtype=object)}
        )
    strategy = table.strategy.astype(str)
    base = strategy
    if table.backbone.nunique() > 1:
        base = base + " / " + table.backbone.astype(str)
    variant = table.variant.fillna("") if "variant" in table else pd.Series("", index=table.index)
    variant = variant.astype(str)
    full = base.where(variant.eq(""), base + " · " + variant)
    exempt = table.strategy.isin(EXEMPT_STRATEGIES)  # linear_probe: its C grid, no trials
    parts = variant.map(lambda v: [p for p in v.split(", ") if p])
    tune_parts = parts.map(lambda ps: [p for p in ps if p.startswith("tune")])
    others = parts.map(lambda ps: ", ".join(p for p in ps if not p.startswith("tune")))
    named = tune_parts.map(lambda ps: any(p.startswith("tune=") and p != "tune=none" for p in ps))
    trials = pd.Series(np.nan, index=table.index)
    if "tune_trials" in table:  # said even when every run was tuned (no variant then)
        column = [strategy, table.backbone.astype(str), variant]
        trials = pd.to_numeric(table.tune_trials, errors="coerce")
        trials = trials.groupby(column, dropna=False).transform("max")
        said = trials.notna() & ~variant.str.contains("tune.trials=", regex=False) & ~exempt
        full = full.where(
            ~said, full + " · tuned (at most " + trials.map("{:.0f}".format) + " trials)"
        )
    tuned = (trials.notna() | named) & ~exempt
    short = base + others.map(lambda o: f" · {o}" if o else "")
    plain = short + tuned.map({True: " (tuned)", False: ""})
    own = short + tune_parts.map(lambda ps: f" ({', '.join(ps)})" if ps else "")
    labels = plain
    for candidate in (own, full):
        settings = pd.Series(list(zip(base, variant, strict=True)), index=table.index)
        shared = settings.groupby(labels).transform("nunique") > 1
        labels = labels.where(~shared, candidate)
    return pd.DataFrame({"column": labels, "column_full": full}, index=table.index)


STUDY_COLUMN = "study: ResNet-18, 15 epochs, max val ({})"
# The columns of the study's published numbers and of protocol=study's: their short labels, and
# what the legend says of them.
PAPER_LABEL, STUDY_PROTOCOL_LABEL = "study: {}", "{} (protocol=study)"
PAPER_MEANS = (
    "the study's published number, {}: another backbone and protocol (maximum validation "
    "accuracy over epochs), beside ours, never subtracted"
)
STUDY_PROTOCOL_MEANS = (
    "protocol=study, the study's recipe on our backbone, {0}: its maximum validation accuracy "
    "over epochs (optimistic), and each of our {0} columns minus it"
)
NO_TRIALS = "its C grid is its fit: no trials"
NOT_RUN = "not run"


def _study_text(value: float, where: tuple[str, str], ours: pd.Series | None) -> str:
    """The study's number, and the study's data where ours differ from it (a subset, other
    classes): the two are then not the same task."""
    if pd.isna(value):
        return ""
    text = f"{value:.3f}"
    classes, images = STUDY_DATA.get(where[0], (None, None))
    if ours is None or pd.isna(ours.n_classes) or pd.isna(ours.n_images):
        return text
    if (ours.n_classes, ours.n_images) != (classes, images):
        text += (
            f" (study: {classes} classes, {images:,} images; "
            f"here {int(ours.n_classes)}, {int(ours.n_images):,})"
        )
    return text


def _study_protocol_text(cells: pd.DataFrame) -> str:
    """protocol=study's number of one dataset x colour x strategy x backbone, and each of our
    columns of it minus it ("...; ours minus it: -0.007 finetune (tuned), -0.035 finetune")."""
    row = cells.iloc[0]
    text = f"{row.study_protocol_mean:.3f}"
    if row.study_protocol_n > 1:
        text += (
            f" ± {row.study_protocol_sd:.3f} "
            f"[{row.study_protocol_ci_low:.3f}, {row.study_protocol_ci_high:.3f}]"
        )
    text += f" (n={row.study_protocol_n})"
    deltas = [
        f"{delta:+.3f} {column}"
        for delta, column in zip(cells.delta_vs_study_protocol, cells.column, strict=True)
        if pd.notna(delta)
    ]
    return text + (f"; ours minus it: {', '.join(deltas)}" if deltas else "")


def never_run(table: pd.DataFrame) -> dict[str, list[str]]:
    """The datasets none of whose cells has a run (`--datasets` names it, the store has none),
    with their colours: one line in the report ("not run: caltech256 (rgb, gray)") instead of
    rows of "not run"."""
    idle = table.groupby("dataset", sort=False).state.agg(lambda s: s.eq(NOT_RUN).all())
    return {
        dataset: list(dict.fromkeys(table.colour[table.dataset == dataset]))
        for dataset in idle.index[idle]
    }


def not_run_note(table: pd.DataFrame) -> str:
    """The line `never_run` says: "not run: caltech256 (rgb, gray)"; "" when none."""
    idle = never_run(table)
    if not idle:
        return ""
    return "not run: " + "; ".join(f"{d} ({', '.join(c)})" for d, c in idle.items())


def accuracy_table(table: pd.DataFrame) -> pd.DataFrame:
    """The study's layout: rows dataset x colour, one column per strategy (x backbone x
    variant), named by its short label (`column_labels`; the legend, `column_legend`, says each
    in full); the study's own numbers and protocol=study's in columns of their own, not
    compared across protocols. A dataset never run is left out (`not_run_note` says it in one
    line), and so is a column with nothing in any row ("not run" or empty everywhere)."""
    idle = never_run(table)
    table = table[~table.dataset.isin(list(idle))]
    wide = (
        table.assign(column=column_names(table), text=table.apply(_accuracy_text, axis=1))
        .pivot_table(
            index=["dataset", "colour"],
            columns="column",
            values="text",
            aggfunc="first",
            sort=False,
        )
        .rename_axis(columns=None)
    )
    study = REFERENCE.pivot_table(
        index=["dataset", "colour"], columns="strategy", values="study_val_acc"
    ).rename(columns=PAPER_LABEL.format)
    data = table.groupby(["dataset", "colour"])[["n_classes", "n_images"]].max()
    study = pd.DataFrame(
        {
            column: [
                _study_text(value, where, data.loc[where] if where in data.index else None)
                for where, value in study[column].items()
            ]
            for column in study.columns
        },
        index=study.index,
    )
    wide = wide.join(study, how="left").fillna({c: "" for c in study.columns})
    same = table[table.get("study_protocol_n", pd.Series(0, index=table.index)).gt(0)]
    if not same.empty:
        same = same.assign(column=column_names(same))
        label = same.strategy.astype(str)
        if table.backbone.nunique() > 1:
            label = label + " / " + same.backbone.astype(str)
        texts = {
            (dataset, colour, STUDY_PROTOCOL_LABEL.format(name)): _study_protocol_text(cells)
            for (dataset, colour, name), cells in same.groupby(
                [same.dataset, same.colour, label], sort=False
            )
        }
        protocol = pd.Series(texts).unstack()
        protocol.index.names = ["dataset", "colour"]
        wide = wide.join(protocol, how="left").fillna({c: "" for c in protocol.columns})
    empty = [c for c in wide.columns if wide[c].fillna("").isin([NOT_RUN, ""]).all()]
    return wide.drop(columns=empty).reset_index()


def column_legend(table: pd.DataFrame, shown: list[str]) -> list[tuple[str, str]]:
    """Each column of the accuracy table among `shown` (its headers) with what it stands for:
    our columns by their full settings (`column_labels`), the study's and protocol=study's by
    their long names and what they are."""
    done = table.assign(column=column_names(table))
    full = dict(zip(done.column, done.get("column_full", done.column), strict=True))
    exempt = set(done.column[done.strategy.isin(EXEMPT_STRATEGIES)])
    out = []
    for name in shown:
        if name in full:
            said = str(full[name])
            if name in exempt and "tune" in said:
                said += f" ({NO_TRIALS})"
            if said != name:  # a label that is its own settings needs no line
                out.append((name, said))
    for strategy in REFERENCE.strategy.unique():
        if (name := PAPER_LABEL.format(strategy)) in shown:
            said = STUDY_COLUMN.format(strategy).removeprefix("study: ")
            out.append((name, PAPER_MEANS.format(said)))
    suffix = STUDY_PROTOCOL_LABEL.format("")
    for name in shown:
        if name.endswith(suffix) and name not in full:
            strategy = name.removesuffix(suffix)
            out.append((name, STUDY_PROTOCOL_MEANS.format(strategy)))
    return out


def cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean cost per finished cell: where the time and memory went; a column of the accuracy
    table per row (strategy and variant), and a tuned cell's tuning time: the most any seed
    spent, within that seed's wall time (seeds that reuse a choice spend none, so it can exceed
    the mean wall time). A shift test's row is the same fits: not again."""
    done = native(table[table.n > 0])
    tuning = done.tune_s if "tune_s" in done else pd.Series(float("nan"), index=done.index)
    return pd.DataFrame(
        {
            "dataset": done.dataset,
            "colour": done.colour,
            "strategy": column_names(done),
            "backbone": done.backbone,
            "wall time (s)": done.wall_time_s.round(1),
            "tuning, longest seed (s)": tuning.where(tuning > 0).round(1),
            "train images/s": done.train_images_per_s.round(1),
            "peak RSS (MB)": done.peak_rss_mb.round(0),
            "peak GPU memory (MB)": done.peak_gpu_mem_mb.round(0),
            "device": done.device,
        }
    ).dropna(axis=1, how="all")


def load_ranks(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """The latest ranking scores (`python -m benchmark.tools.rank`) per dataset x colour x
    backbone."""
    mlflow.set_tracking_uri(tracking_uri)
    query = f"tags.`{KIND_TAG}` = 'rank' and attributes.status = 'FINISHED'"
    found = mlflow.search_runs(experiment_names=[experiment], filter_string=query)
    columns = ["dataset", "colour", "backbone", *RANK_SCORES]
    schema = found.get(f"tags.{SCHEMA_TAG}", pd.Series(None, index=found.index))
    found = found[schema.isna() | schema.isin(KNOWN_SCHEMAS)]  # another schema: load_runs says
    if found.empty:
        return pd.DataFrame(columns=columns)
    found = found.assign(**{"params.backbone": backbone_labels(found)})
    found = found.assign(dataset=dataset_labels(found)).sort_values("start_time")
    names = {"params.colour": "colour", "params.backbone": "backbone"}
    found = found.rename(columns=names | {f"metrics.{score}": score for score in RANK_SCORES})
    found = found.reindex(columns=[*found.columns, *set(columns) - set(found.columns)])
    return found.groupby(columns[:3]).tail(1)[columns].reset_index(drop=True)
