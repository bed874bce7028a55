"""Cells of a sweep log to one SQLite store at the same moment: a fresh store must come out of it
with every run, and no process may die of "database is locked" or a schema-migration race."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import traceback
from pathlib import Path

import mlflow
import pytest

from benchmark import store

PROCESSES = 4
STEPS = 100  # x 3 metrics, one call each: many small write transactions

pytestmark = pytest.mark.foreign_runs  # runs written by hand, as another tool would


def log_a_run(uri: str, index: int, start: multiprocessing.synchronize.Barrier) -> None:
    """What one cell does to the store, started in step with the others on a fresh store."""
    start.wait()
    exp_id = store.experiment_id(uri, "benchmark")
    with mlflow.start_run(experiment_id=exp_id, run_name=f"writer-{index}", tags={"i": index}):
        mlflow.log_params({f"param_{k}": k * index for k in range(50)})
        for step in range(STEPS):
            for name in ("train_loss", "val_loss", "val_acc"):
                mlflow.log_metric(name, step / STEPS, step=step)
        mlflow.log_text("x" * 10_000, "manifest.csv")
        mlflow.log_dict({"index": index}, "config.yaml")


def _worker(
    uri: str,
    index: int,
    start: multiprocessing.synchronize.Barrier,
    errors: multiprocessing.queues.Queue,
) -> None:
    """The traceback goes back to the test, which would otherwise see only an exit code."""
    try:
        log_a_run(uri, index, start)
    except BaseException:
        errors.put(f"writer {index}: {traceback.format_exc()}")
        raise


def test_four_processes_log_to_one_fresh_sqlite_store_at_once(tmp_path: Path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Forked from a process that never opened this store: each child meets it fresh, as a
    # sweep's cells do, without paying the interpreter start-up again.
    context = multiprocessing.get_context("fork")
    start, errors = context.Barrier(PROCESSES), context.Queue()
    writers = [
        context.Process(target=_worker, args=(uri, i, start, errors)) for i in range(PROCESSES)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=240)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not failures, "\n".join(failures)
    assert [w.exitcode for w in writers] == [0] * PROCESSES

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["benchmark"])
    assert len(runs) == PROCESSES and set(runs.status) == {"FINISHED"}
    assert sorted(runs["tags.i"].astype(int)) == list(range(PROCESSES))
    client = mlflow.MlflowClient()
    for run_id in runs.run_id:
        assert len(client.get_metric_history(run_id, "val_acc")) == STEPS
        assert {a.path for a in client.list_artifacts(run_id)} == {"manifest.csv", "config.yaml"}
    assert len(mlflow.search_experiments(filter_string="name = 'benchmark'")) == 1
