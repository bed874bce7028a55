"""`python -m benchmark.report [--experiment NAME] [--sweep DIR] [--out DIR]`: the answer tables
(report.md, report.csv, report.tex) and one self-contained page with the pictures (report.html)."""

from __future__ import annotations

import argparse
import html
import json
import os
import sys
from pathlib import Path

import mlflow
import pandas as pd

from benchmark.identity import default_tracking_uri
from benchmark.report import figures
from benchmark.report.tables import (
    CELL,
    RULES,
    accuracy_table,
    cost_table,
    latest_per_seed,
    load_runs,
    summarise,
)
from benchmark.server import TrackingUnreachable, check_reachable
from benchmark.store import StoreError, check_sqlite


def val_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch validation accuracy of each counted FINISHED run."""
    client = mlflow.MlflowClient()
    rows = [
        {**run[[*CELL, "seed", "run_id"]].to_dict(), "epoch": m.step, "val_acc": m.value}
        for _, run in runs.iterrows()
        for m in client.get_metric_history(run.run_id, "val_acc")
    ]
    return pd.DataFrame(rows, columns=[*CELL, "seed", "run_id", "epoch", "val_acc"])


def best_confusions(curves: pd.DataFrame) -> list[tuple[str, dict]]:
    """Per cell, the run with the best validation accuracy (selected like everything else: on
    validation) among those that logged a test confusion matrix."""
    client, out = mlflow.MlflowClient(), []
    best = curves.sort_values("val_acc", ascending=False).drop_duplicates("run_id")
    for cell, runs in best.groupby(CELL, sort=True):
        for _, run in runs.iterrows():
            if "confusion_matrix.json" in {a.path for a in client.list_artifacts(run.run_id)}:
                local = client.download_artifacts(run.run_id, "confusion_matrix.json")
                out.append(
                    (f"{'/'.join(cell)} seed {run.seed}", json.loads(Path(local).read_text()))
                )
                break
    return out


def write_tables(table: pd.DataFrame, out: Path, source: str) -> list[Path]:
    accuracy, cost = accuracy_table(table), cost_table(table)
    paths = [out / "report.md", out / "report.csv", out / "report.tex"]
    markdown = {"index": False, "missingval": "—"}  # a cost a cell does not have (no GPU...)
    cost = cost.astype(object).where(cost.notna(), None)  # tabulate prints NaN as "nan"
    paths[0].write_text(
        "# Transfer learning: test accuracy per cell\n\n"
        f"Source: `{source}`.\n\n{RULES}\n\n{accuracy.to_markdown(**markdown)}\n\n"
        f"## Cost per cell (mean over finished seeds)\n\n{cost.to_markdown(**markdown)}\n"
    )
    table.to_csv(paths[1], index=False, float_format="%.4f")
    paths[2].write_text(
        "% \\usepackage{booktabs}\n"
        + accuracy.to_latex(index=False, caption="Test accuracy per cell.", label="tab:accuracy")
        + "\n"
        + cost.to_latex(index=False, caption="Cost per cell.", label="tab:cost", na_rep="")
    )
    return paths


def write_html(table: pd.DataFrame, runs: pd.DataFrame, out: Path, source: str) -> Path:
    counted = latest_per_seed(runs)
    counted = counted[counted.status == "FINISHED"]
    curves = val_curves(counted)
    images = [("Test accuracy per cell", figures.png_data_uri(figures.accuracy_bars(table)))]
    if not curves.empty:
        images.append(("Learning curves", figures.png_data_uri(figures.learning_curves(curves))))
        for title, matrix in best_confusions(curves):
            figure = figures.confusion(matrix["matrix"], matrix["classes"], title)
            images.append(
                (
                    f"Confusion matrix (test), best validation run: {title}",
                    figures.png_data_uri(figure),
                )
            )
    sections = "\n".join(
        f'<figure><img src="{uri}" alt="{html.escape(t)}"><figcaption>{html.escape(t)}'
        "</figcaption></figure>"
        for t, uri in images
    )
    page = out / "report.html"
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>benchmark report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }}
th, td {{ border-bottom: 1px solid #ccc; padding: 0.3rem 0.7rem; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ margin: 2rem 0; }} img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9rem; }}
</style></head><body>
<h1>Transfer learning: test accuracy per cell</h1>
<p>Source: <code>{html.escape(source)}</code></p>
<p>{html.escape(RULES)}</p>
{accuracy_table(table).to_html(index=False, border=0)}
<h2>Cost per cell</h2>
{cost_table(table).to_html(index=False, border=0, na_rep="")}
<h2>Pictures</h2>
{sections}
</body></html>
""")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.report", description=__doc__)
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument("--sweep", default=None, help="only the cells of this sweep (its dir)")
    parser.add_argument("--out", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    try:
        check_reachable(uri)  # a tracking server that is down: said at once
        check_sqlite(uri, write=False)  # a misspelt path: no empty store created
        runs = load_runs(uri, args.experiment, args.sweep)
    except (LookupError, TrackingUnreachable, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if runs.empty:
        print(
            f"error: no runs in experiment {args.experiment!r} of {uri}"
            + (f" for sweep {args.sweep}" if args.sweep else ""),
            file=sys.stderr,
        )
        return 1
    table = summarise(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    source = f"{uri}, experiment {args.experiment}" + (
        f", sweep {args.sweep}" if args.sweep else ""
    )
    for path in [*write_tables(table, args.out, source), write_html(table, runs, args.out, source)]:
        print(f"wrote {path}")
    print(accuracy_table(table).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
