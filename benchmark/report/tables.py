"""MLflow runs -> pandas -> the answer tables.

Rules, stated in the report too: of each (cell, seed) the latest FINISHED run counts, else the
latest run (a rerun that finished replaces what it reran; a failed retry does not hide a result,
as a relaunch would skip that cell too); a cell's accuracy is the mean ± sd over its FINISHED
seeds; failed, running and never-run cells are shown as such, never dropped or averaged in.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from benchmark.identity import CELL_PARAMS
from benchmark.store import end_stale_runs

CELL = list(CELL_PARAMS)
RULES = (
    "Each cell: held-out test accuracy of the checkpoint selected on validation accuracy, "
    "mean ± sd over seeds (n = FINISHED seeds). Of each (cell, seed) the latest FINISHED run "
    "counts (as for a relaunch, which skips it), else the latest run; failed, running and "
    "never-run cells are marked, never averaged in. "
    "The study's number (ResNet-18, 15 epochs) is its maximum validation accuracy over epochs, "
    "not a test score; ▼ marks where ours is lower."
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


def load_runs(tracking_uri: str, experiment: str, sweep: str | None = None) -> pd.DataFrame:
    """One row per run: cell params, seed, status, start time, test accuracy and cost."""
    mlflow.set_tracking_uri(tracking_uri)
    if (experiment_ := mlflow.get_experiment_by_name(experiment)) is None:
        raise LookupError(f"no experiment {experiment!r} in {tracking_uri}: run a sweep first.")
    # A run left RUNNING by a process that is gone is FAILED: the rule a relaunch applies too.
    end_stale_runs(mlflow.MlflowClient(tracking_uri), [experiment_.experiment_id])
    query = f"tags.sweep = '{Path(sweep).resolve()}'" if sweep else ""
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=query)
    wanted = {f"params.{p}": p for p in [*CELL, "seed"]}
    wanted |= {f"metrics.{m}": m for m in ["test_acc", *COST_METRICS]}
    wanted |= {"tags.device": "device"}
    runs = runs.rename(columns=wanted)
    for column in set(wanted.values()) - set(runs.columns):
        runs[column] = pd.NA
    return runs[["run_id", "status", "start_time", *wanted.values()]]


def latest_per_seed(runs: pd.DataFrame) -> pd.DataFrame:
    """Of each (cell, seed): its latest FINISHED run, else its latest run. The rule a relaunch
    applies: a cell that FINISHED is done, whatever a later attempt did."""
    ordered = runs.assign(_done=runs.status == "FINISHED").sort_values(["_done", "start_time"])
    return ordered.groupby([*CELL, "seed"]).tail(1).drop(columns="_done")


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per cell of the grid spanned by the runs, missing cells included."""
    latest = latest_per_seed(runs)
    finished = latest[latest.status == "FINISHED"]
    accuracy = finished.groupby(CELL).test_acc.agg(
        n="count", test_acc_mean="mean", test_acc_sd="std"
    )
    cost = finished.groupby(CELL)[COST_METRICS].mean()
    devices = finished.groupby(CELL).device.agg(lambda d: ", ".join(sorted(set(d.dropna()))))
    states = pd.crosstab([latest[c] for c in CELL], latest.status)
    grid = pd.MultiIndex.from_product([_ordered(runs[c]) for c in CELL], names=CELL)
    table = pd.DataFrame(index=grid).join([accuracy, cost, devices])
    for status in ("FAILED", "RUNNING"):
        table[status.lower()] = states.get(status, 0)
    table = table.fillna({"n": 0, "failed": 0, "running": 0}).astype(
        {"n": int, "failed": int, "running": int}
    )
    table = table.reset_index().merge(REFERENCE, on=["dataset", "colour", "strategy"], how="left")
    table["diff_vs_study"] = table.test_acc_mean - table.study_val_acc
    table["state"] = table.apply(_state, axis=1)
    return table


def _ordered(values: pd.Series) -> list[str]:
    """Alphabetical, but in the study's order where it has one (rgb before gray)."""
    first = {"rgb": 0, "gray": 1, "finetune": 0, "freeze": 1}
    return sorted(values.dropna().unique(), key=lambda v: (first.get(v, 2), v))


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
    text += f" ± {row.test_acc_sd:.3f}" if row.n > 1 else ""
    text += f" (n={row.n}"
    text += f", {row.failed} failed" if row.failed else ""
    text += f", {row.running} running" if row.running else ""
    text += ")"
    if pd.notna(row.study_val_acc):
        flag = " ▼" if row.diff_vs_study < 0 else ""
        text += f" · study {row.study_val_acc:.3f} ({row.diff_vs_study:+.3f}{flag})"
    return text


def column_names(table: pd.DataFrame) -> pd.Series:
    """Strategy, and the backbone too when the runs use several."""
    if table.backbone.nunique() > 1:
        return table.strategy + " / " + table.backbone
    return table.strategy


def accuracy_table(table: pd.DataFrame) -> pd.DataFrame:
    """The study's layout: rows dataset x colour, one column per strategy."""
    return (
        table.assign(column=column_names(table), text=table.apply(_accuracy_text, axis=1))
        .pivot_table(
            index=["dataset", "colour"],
            columns="column",
            values="text",
            aggfunc="first",
            sort=False,
        )
        .rename_axis(columns=None)
        .reset_index()
    )


def cost_table(table: pd.DataFrame) -> pd.DataFrame:
    """Mean cost per finished cell: where the time and memory went."""
    done = table[table.n > 0]
    return pd.DataFrame(
        {
            "dataset": done.dataset,
            "colour": done.colour,
            "strategy": done.strategy,
            "backbone": done.backbone,
            "wall time (s)": done.wall_time_s.round(1),
            "train images/s": done.train_images_per_s.round(1),
            "peak RSS (MB)": done.peak_rss_mb.round(0),
            "peak GPU memory (MB)": done.peak_gpu_mem_mb.round(0),
            "device": done.device,
        }
    ).dropna(axis=1, how="all")
