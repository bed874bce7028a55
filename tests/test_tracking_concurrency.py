"""Cells of a sweep log to one SQLite store at the same moment: a fresh store must come out of it
with every run, and no process may die of "database is locked" or a schema-migration race."""

from __future__ import annotations

import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import traceback
from pathlib import Path

import mlflow
import mlflow.data
import pandas as pd
import pytest
from mlflow.entities import DatasetInput, InputTag

from benchmark.cell import mlflow_run
from benchmark.tracking import store

PROCESSES = 4
STEPS = 50  # x 3 metrics, one call each: many small write transactions

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
    # Fresh processes (spawned: forking a process that runs torch's and MLflow's threads can
    # deadlock the child), each meeting the store fresh, as a sweep's cells do.
    context = multiprocessing.get_context("spawn")
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


def test_a_split_another_cell_logs_at_the_same_moment_is_linked_not_fatal(tmp_path, monkeypatch):
    """MLflow's SQL store looks a dataset up, then inserts it. Here the other cell's insert of the
    same split lands between the two, as it did under the gpus launcher: the cell still logs
    every split, linked to the one row per split that both runs share."""
    from mlflow.store.tracking import sqlalchemy_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    exp_id = store.experiment_id(uri, "benchmark")
    frame = pd.DataFrame({"path": ["a.jpg", "b.jpg"], "label": ["ants", "bees"]})
    splits = {
        split: mlflow.data.from_pandas(frame, source="/data", name=f"ants-{split}", digest="d1")
        for split in mlflow_run.SPLITS
    }
    other_run = mlflow.MlflowClient().create_run(exp_id).info.run_id
    other_store = sqlalchemy_store.SqlAlchemyStore(uri, str(tmp_path / "artifacts"))
    new_row = sqlalchemy_store.SqlDataset.__init__

    def dataset_row(self, *args, **kwargs):  # this cell found no row and is about to insert one
        if not raced:
            raced.append(other_run)
            entities = [
                DatasetInput(d._to_mlflow_entity(), [InputTag("mlflow.data.context", "x")])
                for d in splits.values()
            ]
            other_store.log_inputs(other_run, entities)  # the other cell's insert lands first
        new_row(self, *args, **kwargs)

    raced: list[str] = []
    monkeypatch.setattr(sqlalchemy_store.SqlDataset, "__init__", dataset_row)
    with mlflow.start_run(experiment_id=exp_id) as run:
        mlflow_run.log_splits(splits)
    assert raced  # the race happened
    inputs = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert sorted(i.dataset.name for i in inputs) == sorted(f"ants-{s}" for s in mlflow_run.SPLITS)
    contexts = {i.dataset.name: i.tags[0].value for i in inputs}
    assert contexts == {f"ants-{s}": c for s, c in mlflow_run.SPLITS.items()}
    shared = mlflow.get_run(other_run).inputs.dataset_inputs
    assert {i.dataset.digest for i in shared} == {"d1"} and len(shared) == len(mlflow_run.SPLITS)
