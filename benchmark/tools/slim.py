"""`python -m benchmark.tools.slim --tracking-uri sqlite:///.../mlflow.db`: a committed store of
record (results/grid/, results/backbones/) cut down to what the report reads, so that the working
tree still travels to a lent GPU machine (64 MiB with `make gpu-pack`'s pack; scripts/gpu_pack.py).

- System metrics (`system/*`: CPU, memory, disk and network samples every 10 s of a cell) are
  deleted from the metric history and the latest values: the report reads none of them. The
  grid's own cells no longer log them (`tracking.system_metrics=false` in the Makefile).
- Of each run's artifacts in the `mlartifacts/` beside the store, only those the report reads
  and the record of how a cell chose its values are kept (`KEPT_ARTIFACTS`: a tuned cell's
  trials, linear_probe's C grid, a few hundred bytes each; each test image's prediction, tens of
  bytes an image); the manifests, the resolved
  configs (every key is also a param), Hydra's files and the confusion matrices' pictures go.
- A tuned cell's trials, logged as child runs of its run for browsing while it works, are
  deleted with their rows and artifacts: the cell's `tune_trials.json` (kept) is their record
  (each trial's values, best val_acc, state and epochs). A grid of 90 tuned cells has about 900.
- The database is `VACUUM`ed (SQLite keeps freed pages otherwise).

Params, tags, the other metrics (the learning curves included) and the cells' runs are kept:
`python -m benchmark.report` on the store makes the same tables before and after. Only the
`mlartifacts/` beside the store is touched, never the absolute paths the runs record (a copy of
the store must not empty the original). A store with a RUNNING run is left alone.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from benchmark.tracking.identity import KIND_TAG, TRIAL_KIND
from benchmark.tracking.store import StoreError, check_sqlite

# What `python -m benchmark.report` reads of a run's artifacts (report/__main__.py,
# best_confusions; each test image's prediction for its bootstrap), and what shows how a cell
# chose its values (cell/mlflow_run.py: tune's trials, linear_probe's C grid), so that a tuned
# number stays auditable in the committed store: everything else under a run's artifacts/ is
# deleted.
KEPT_ARTIFACTS = frozenset(
    {"confusion_matrix.json", "tune_trials.json", "probe_c_grid.json", "test_predictions.json"}
)
SYSTEM_METRICS = "system/%"  # MLflow's prefix for its system metrics (a LIKE pattern)
MIB = 2**20


@dataclass(frozen=True)
class Slimmed:
    db_before: int
    db_after: int
    samples_deleted: int
    artifacts_before: int
    artifacts_after: int
    files_deleted: int
    trials_deleted: int = 0

    def line(self, store: Path) -> str:
        return (
            f"slim: {store} {self.db_before / MIB:.2f} -> {self.db_after / MIB:.2f} MiB "
            f"({self.samples_deleted} system metric samples and {self.trials_deleted} trial "
            "runs deleted, vacuumed); mlartifacts/ "
            f"{self.artifacts_before / MIB:.2f} -> {self.artifacts_after / MIB:.2f} MiB "
            f"({self.files_deleted} files deleted: not read by the report, not a tuning record)"
        )


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def unkept_artifacts(artifacts: Path) -> list[Path]:
    """Files under `<run id>/artifacts/` that are not KEPT_ARTIFACTS."""
    return [
        file
        for run in sorted(artifacts.glob("*/artifacts"))
        for file in sorted(run.rglob("*"))
        if file.is_file() and file.relative_to(run).as_posix() not in KEPT_ARTIFACTS
    ]


def _remove_empty_folders(root: Path) -> None:
    for folder in sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def delete_trial_runs(db: sqlite3.Connection) -> list[str]:
    """Delete the runs tagged `benchmark.kind=trial` and their rows in every table keyed by
    run (metrics, params, tags, inputs...); their ids."""
    trials = [
        run
        for (run,) in db.execute(
            "select run_uuid from tags where key = ? and value = ?", (KIND_TAG, TRIAL_KIND)
        )
    ]
    tables = [
        table
        for (table,) in db.execute("select name from sqlite_master where type = 'table'")
        if table != "runs"
        and any(column[1] == "run_uuid" for column in db.execute(f"pragma table_info('{table}')"))
    ]
    for run in trials:
        for table in tables:
            db.execute(f"delete from '{table}' where run_uuid = ?", (run,))
        db.execute("delete from runs where run_uuid = ?", (run,))
    return trials


def slim(uri: str) -> Slimmed:
    if not uri.startswith("sqlite:///"):
        raise StoreError(f"{uri} is not a local SQLite store: slim works on sqlite:///...mlflow.db")
    check_sqlite(uri)  # MLflow's, and writable
    store = Path(uri.removeprefix("sqlite:///"))
    if not store.is_file():
        raise StoreError(f"no tracking store at {store}: check --tracking-uri")
    artifacts = store.parent / "mlartifacts"
    db_before, artifacts_before = store.stat().st_size, _size(artifacts)
    with closing(sqlite3.connect(store, isolation_level=None)) as db:
        running = db.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
        if running:
            raise StoreError(
                f"{store} has {running} RUNNING run(s): slim it when the cells have ended"
            )
        db.execute("begin")
        deleted = db.execute("delete from metrics where key like ?", (SYSTEM_METRICS,)).rowcount
        db.execute("delete from latest_metrics where key like ?", (SYSTEM_METRICS,))
        trials = delete_trial_runs(db)
        db.execute("commit")
        db.execute("vacuum")
    unkept = unkept_artifacts(artifacts) if artifacts.is_dir() else []
    for file in unkept:
        file.unlink()
    for run in trials:  # a trial's folder, with whatever it holds
        for folder in artifacts.glob(f"*/{run}"):
            shutil.rmtree(folder)
    if artifacts.is_dir():
        _remove_empty_folders(artifacts)
    return Slimmed(
        db_before=db_before,
        db_after=store.stat().st_size,
        samples_deleted=deleted,
        artifacts_before=artifacts_before,
        artifacts_after=_size(artifacts) if artifacts.is_dir() else 0,
        files_deleted=len(unkept),
        trials_deleted=len(trials),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.tools.slim", description=__doc__)
    parser.add_argument("--tracking-uri", required=True, help="sqlite:///.../mlflow.db")
    args = parser.parse_args(argv)
    try:
        done = slim(args.tracking_uri)
    except StoreError as error:
        print(f"slim: {error}", file=sys.stderr)
        return 1
    print(done.line(Path(args.tracking_uri.removeprefix("sqlite:///"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
