"""`python -m benchmark.report`: the study-style answer table from the runs in MLflow.

Rows are dataset x colour, columns are strategies (per backbone when several); each cell is the
held-out test accuracy, mean ± sd over seeds, with the study's number beside it. Only FINISHED
runs count, and of a (cell, seed) that was run more than once only the latest.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import mlflow
import pandas as pd

from benchmark.tracking import CELL_PARAMS, default_tracking_uri

# The study's numbers (ResNet-18, 15 epochs): the *maximum validation* accuracy over epochs,
# not a held-out test score, so they flatter the study. Ours are test accuracies.
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

CELL = list(CELL_PARAMS)


def load_runs(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per run, with the cell's params, seed, status and test accuracy."""
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise SystemExit(f"No experiment {experiment!r} in {tracking_uri}: run a sweep first.")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="pandas")
    columns = {f"params.{name}": name for name in [*CELL, "seed"]}
    columns["metrics.test_acc"] = "test_acc"
    runs = runs.rename(columns=columns)
    for missing in set(columns.values()) - set(runs.columns):
        runs[missing] = pd.NA
    return runs[["run_id", "status", "start_time", *CELL, "seed", "test_acc"]]


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per cell with n, mean and sd of test accuracy and the study's number."""
    finished = runs[(runs.status == "FINISHED") & runs.test_acc.notna()]
    latest = finished.sort_values("start_time").groupby([*CELL, "seed"]).tail(1)
    table = (
        latest.groupby(CELL)
        .test_acc.agg(n="count", test_acc_mean="mean", test_acc_sd="std")
        .reset_index()
        .merge(REFERENCE, on=["dataset", "colour", "strategy"], how="left")
    )
    table["diff_vs_study"] = table.test_acc_mean - table.study_val_acc
    return table


def _cell_text(row: pd.Series) -> str:
    sd = "" if pd.isna(row.test_acc_sd) else f" ± {row.test_acc_sd:.3f}"
    study = "" if pd.isna(row.study_val_acc) else f" (study {row.study_val_acc:.3f})"
    return f"{row.test_acc_mean:.3f}{sd} n={row.n}{study}"


def study_table(table: pd.DataFrame) -> pd.DataFrame:
    """Rows dataset x colour, one column per strategy (and backbone when there are several)."""
    several = table.backbone.nunique() > 1
    column = table.strategy + (" / " + table.backbone if several else "")
    return (
        table.assign(column=column, text=table.apply(_cell_text, axis=1))
        .pivot(index=["dataset", "colour"], columns="column", values="text")
        .fillna("not run")
        .rename_axis(columns=None)
        .reset_index()
    )


def write_report(table: pd.DataFrame, out: Path, source: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / "report.csv", out / "report.md"
    table.to_csv(csv, index=False, float_format="%.4f")
    md.write_text(
        "# Transfer learning: test accuracy per cell\n\n"
        f"Source: `{source}`. Each cell: held-out test accuracy, mean ± sd over seeds (n), of "
        "the checkpoint selected on validation accuracy; only FINISHED runs, and the latest run "
        "of each (cell, seed). In brackets, the study's number (ResNet-18, 15 epochs), which is "
        "its *maximum validation* accuracy over epochs, not a test score.\n\n"
        f"{study_table(table).to_markdown(index=False)}\n"
    )
    return [md, csv]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmark.report", description=__doc__)
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    table = summarise(load_runs(uri, args.experiment))
    if table.empty:
        raise SystemExit(f"No finished runs in experiment {args.experiment!r} of {uri}.")
    for path in write_report(table, args.out, f"{uri}, experiment {args.experiment}"):
        print(f"wrote {path}")
    print(study_table(table).to_markdown(index=False))


if __name__ == "__main__":
    main()
