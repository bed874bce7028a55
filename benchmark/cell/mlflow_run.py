"""A cell's MLflow run: opened with what the cell is (params, tags, config, data), then, once the
cell has computed everything, its result logged in one call; FAILED when anything raises.

Under DDP only global rank 0 (benchmark.runtime.ranks) opens the run and logs; the other ranks
hold a stand-in with rank 0's run id, and every function here that writes is rank-zero only.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any, SupportsInt, cast

import hydra
import lightning as L
import matplotlib

matplotlib.use("Agg")  # the per-run confusion picture is drawn without a display

import matplotlib.pyplot as plt
import mlflow
import mlflow.data
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, MLFlowLogger
from mlflow.data.pandas_dataset import from_pandas
from mlflow.entities import LifecycleStage, Metric, Param, Run, RunData, RunInfo, RunStatus, RunTag
from mlflow.tracking import fluent
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.trial import FrozenTrial
from sklearn.metrics import ConfusionMatrixDisplay

from benchmark.config.spec import CellSpec
from benchmark.data.manifest import SHIFT, Manifest
from benchmark.models.resume import EPOCH_CURVES
from benchmark.runtime import interrupt, ranks
from benchmark.tracking import identity, server, store
from benchmark.tracking.result import CellResult

log = logging.getLogger("benchmark")

# MLflow's contexts; `shift`: a second test split of another distribution (dataset.shift_test).
SPLITS = {"train": "training", "val": "validation", "test": "testing", SHIFT: "testing (shift)"}


def cell_tags(spec: CellSpec, key: str, resumed_from: str | None = None) -> dict[str, str]:
    tags = {
        identity.HARNESS_TAG: "benchmark",
        identity.SCHEMA_TAG: identity.SCHEMA_VERSION,
        identity.KIND_TAG: "cell",
        identity.CELL_KEY_TAG: key,
        identity.CELL_GROUP_TAG: identity.cell_group(spec),
        identity.DEBUG_TAG: str(identity.is_debug(spec)).lower(),
        **identity.git_tags(),
        "cell": spec.name,
        "torch_version": torch.__version__,
        identity.OUTPUT_DIR_TAG: str(spec.paths.output_dir),
        **store.heartbeat_tags(),
    }
    if sweep := os.environ.get(identity.SWEEP_ENV):
        tags["sweep"] = sweep
    if look := os.environ.get(identity.LOOK_ENV):  # added by benchmark.tools.seeds
        tags[identity.LOOK_TAG] = look
    if resumed_from:  # the interrupted attempt this run takes over (benchmark.cell.resume)
        tags[identity.RESUMED_FROM_TAG] = resumed_from
    return tags


@contextmanager
def cell_run(
    spec: CellSpec, key: str, manifest: Manifest, resumed_from: str | None = None
) -> Iterator[Run]:
    """The cell's run, nested under its sweep's run when there is one: FINISHED when the block
    completes, FAILED (the error in one line as the tag `error`, the traceback as `error.txt`)
    when anything inside raises. A heartbeat says the process is alive while the block runs.
    A cell that takes over an interrupted attempt (benchmark.cell.resume) opens a new run,
    tagged with the attempt's (`resumed_from`); that run stays FAILED, as it ended.

    A run deleted while the cell runs (the MLflow UI's Delete) ends FAILED all the same, and
    stays deleted; the cell stops with a StoreError saying so. A SQLite store that stays locked
    by another process past its busy timeout is a StoreError too (server.store_locked)."""
    if not ranks.is_rank_zero():
        mlflow.set_tracking_uri(identity.tracking_uri(spec))  # for its Lightning logger
        yield _other_rank_run()
        return
    uri = identity.tracking_uri(spec)
    exp_id = store.experiment_id(uri, spec.tracking.experiment)
    mlflow.set_system_metrics_sampling_interval(10)  # seconds: few writes to a shared store
    mlflow.set_system_metrics_samples_before_logging(1)
    with store.said_if_locked(uri):
        run = mlflow.start_run(
            experiment_id=exp_id,
            run_name=identity.run_name(spec, identity.task_overrides(spec.output_dir)),
            tags=cell_tags(spec, key, resumed_from),
            parent_run_id=os.environ.get(identity.PARENT_RUN_ENV) or None,
            log_system_metrics=spec.tracking.system_metrics,
        )
    run_id = run.info.run_id
    stop_heartbeat = store.keep_beating(uri, run_id)
    try:
        output = spec.output_dir
        output.mkdir(parents=True, exist_ok=True)
        started = {"run_id": run_id, "tracking_uri": uri}
        (output / identity.RUN_FILE).write_text(json.dumps(started))
        os.environ[identity.RUN_ID_ENV] = run_id
        log_identity(spec, manifest)
        yield run
    except BaseException as error:
        stop_heartbeat()
        with interrupt.held():  # a signal now (a requeue's SIGTERM) waits for the record
            said = _failed(uri, run_id, error)
        if said is not None:
            raise said from error
        raise
    else:
        stop_heartbeat()
        _end_run(run_id, RunStatus.FINISHED)
    finally:
        os.environ.pop(identity.RUN_ID_ENV, None)


def _failed(uri: str, run_id: str, error: BaseException) -> store.StoreError | None:
    """The run of a cell that raised `error`, ended FAILED: the error in one line as its tag
    `error` and the traceback as `error.txt`. The StoreError the cell raises instead of `error`
    when the store is the cause: the run was deleted under it (restored for as long as it takes
    to end it, then deleted again), or a SQLite store stayed locked (the run is tagged and ended
    if the store lets it within its busy timeout; else the launcher or a relaunch ends it, with
    the error the cell leaves in its outcome file)."""
    client = mlflow.MlflowClient(uri)
    error = interrupt.as_ended(error)
    locked = server.store_locked(error, uri)
    deleted = None if locked is not None else _deleted(client, run_id, error)
    said = locked or deleted
    if deleted is not None:
        with suppress(Exception):
            client.restore_run(run_id)  # a deleted run can be neither tagged nor ended
    try:
        client.set_tag(
            run_id, "error", store.error_tag(f"{type(said or error).__name__}: {said or error}")
        )
        mlflow.log_text(identity.redact(traceback.format_exc()), "error.txt")
    except Exception as unrecorded:  # the store failed too: the cell's own error is the news
        log.warning(
            "Could not record the error in run %s: %s", run_id, store.error_tag(str(unrecorded))
        )
    _end_run(run_id, RunStatus.FAILED, quiet=True)
    if deleted is not None:
        with suppress(Exception):
            client.delete_run(run_id)  # as the user left it
    return said


def _deleted(
    client: mlflow.MlflowClient, run_id: str, error: BaseException
) -> store.StoreError | None:
    """The StoreError to raise when `error` came from the cell's run being deleted under it
    (MLflow: the run "must be in the 'active' state", or does not exist once purged), else
    None."""
    refused = [
        e
        for e in server.causes(error)
        if isinstance(e, mlflow.MlflowException)
        and ("'active' state" in str(e) or e.error_code == "RESOURCE_DOES_NOT_EXIST")
    ]
    if not refused:
        return None
    try:
        run = client.get_run(run_id)
    except mlflow.MlflowException:
        return store.StoreError(
            f"the cell's run {run_id} was deleted and purged from the tracking store while "
            "the cell ran: the cell stopped; relaunch the same command to run it again."
        )
    if run.info.lifecycle_stage != LifecycleStage.DELETED:
        return None
    return store.StoreError(
        f"the cell's run {run_id} was deleted from the tracking store while the cell ran: the "
        "cell stopped, its run ended FAILED and stays deleted (`mlflow runs restore --run-id "
        f"{run_id}` brings it back); relaunch the same command to run the cell again."
    )


def _end_run(run_id: str, status: int, quiet: bool = False) -> None:
    """mlflow.end_run for the cell's run, if it is the active one: ended `status`, its
    system-metrics monitor stopped even when the store refuses the end (quiet: said as a
    warning, not raised)."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:  # ended inside the block
        return
    try:
        mlflow.end_run(RunStatus.to_string(status))
    except Exception as error:
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run_id, None)
        if monitor is not None:
            monitor.finish()
        if not quiet:
            raise
        said = store.error_tag(str(error))
        log.warning("Could not end run %s %s: %s", run_id, RunStatus.to_string(status), said)


def _other_rank_run() -> Run:
    """A DDP rank other than 0 holds no MLflow run: a stand-in with rank 0's run id (when
    Lightning started this rank from rank 0's process), built without touching the store."""
    info = RunInfo(
        run_id=os.environ.get(identity.RUN_ID_ENV, ""),
        experiment_id="",
        user_id="",
        status=RunStatus.to_string(RunStatus.RUNNING),
        start_time=0,
        end_time=None,
        lifecycle_stage="active",
    )
    return Run(info, RunData())


def split_datasets(spec: CellSpec, manifest: Manifest) -> dict[str, mlflow.data.Dataset]:
    """Each split as an MLflow dataset: its rows of the manifest, digest = the manifest hash."""
    frames = manifest.relative_frame()
    return {
        split: from_pandas(
            frames[frames.split == split].reset_index(drop=True),
            source=str(manifest.root),
            targets="label",
            name=f"{spec.dataset.name}-{split}",
            digest=manifest.sha256[:16],
        )
        for split in SPLITS
        if split != SHIFT or (frames.split == split).any()
    }


def log_identity(spec: CellSpec, manifest: Manifest) -> None:
    """What the cell is, before it computes: params, its config and Hydra's overrides, and the
    exact images of each split (as MLflow datasets and as the manifest file). Rank 0 alone."""
    if not ranks.is_rank_zero():
        return
    mlflow.log_params(_redacted(identity.run_params(spec)))
    counts = manifest.frame.groupby("split").size()
    mlflow.log_params(
        {
            **{f"n_{split}": int(n) for split, n in counts.items()},
            "n_classes": len(manifest.classes),
            "n_skipped": len(manifest.skipped),
            "manifest_sha256": manifest.sha256,
            identity.DATA_PARAM: manifest.content_sha256,  # the same for every seed
            "test_split": manifest.test_split,  # official, or carved by dataset.test_split
            # near-duplicate groups, each kept in one split, and the training/validation images
            # left out for being near-duplicates of an official split's
            "n_merged_groups": manifest.merged_groups,
            "n_removed_near_duplicates": manifest.removed_across_splits,
            "n_shift": int(counts.get(SHIFT, 0)),
        }
    )
    mlflow.log_dict(_redacted(spec.as_dict()), "config.yaml")
    hydra_dir = spec.output_dir / ".hydra"
    if hydra_dir.is_dir():  # config.yaml, hydra.yaml and overrides.yaml as Hydra wrote them
        for file in sorted(hydra_dir.glob("*.yaml")):
            mlflow.log_text(identity.redact(file.read_text()), f"hydra/{file.name}")
    mlflow.log_text(manifest.csv, "manifest.csv")
    mlflow.log_text(manifest.skipped.to_csv(index=False), "skipped_files.csv")
    log_splits(split_datasets(spec, manifest))


def _redacted(value: Mapping[str, Any]) -> dict[str, Any]:
    """`value` (a dict of params, a config) with every secret in it masked
    (identity.redact_all): a tracking URI's password, a secret variable's value."""
    return identity.redact_all(value)


INPUT_TRIES = 3


def log_splits(datasets: Mapping[str, mlflow.data.Dataset]) -> None:
    """The splits as the run's inputs, in one request. MLflow's SQL store looks a dataset up and
    then inserts it, so two cells that log the same split at once (the gpus launcher's cells on
    one store) race, and the second insert fails the store's UNIQUE constraint. The row is there
    by then: the next try finds it and links this run to it."""
    splits = list(datasets)
    for attempt in range(1, INPUT_TRIES + 1):
        try:
            mlflow.log_inputs(
                datasets=[datasets[s] for s in splits],
                contexts=[SPLITS[s] for s in splits],
                tags_list=[None] * len(splits),
            )
            return
        except mlflow.MlflowException as error:
            said = str(error).lower()  # SQLite, PostgreSQL and MySQL word it so
            if not ("unique constraint" in said or "duplicate" in said) or attempt == INPUT_TRIES:
                raise


def log_result(spec: CellSpec, result: CellResult) -> None:
    """Everything the cell computed, once it is complete (rank 0 alone)."""
    if not ranks.is_rank_zero():
        return
    fitted = result.fitted
    mlflow.log_param("input", result.input)
    mlflow.set_tags({"device": fitted.device, "precision": fitted.precision})
    cost = {
        "wall_time_s": result.wall_time_s,
        "peak_rss_mb": result.peak_rss_mb,
        "train_images_per_s": fitted.train_images_per_s,
        "peak_gpu_mem_mb": result.peak_gpu_mem_mb,
        "optimizer_steps": fitted.optimizer_steps,
        **result.build_s,
    }
    mlflow.log_metrics({name: value for name, value in cost.items() if value is not None})
    if fitted.convergence:  # final_train_loss/acc, best_val_epoch, epochs_run
        mlflow.log_metrics(fitted.convergence)
    if fitted.resumed_at_epoch is not None:  # took over an interrupted attempt
        mlflow.log_metric("resumed_at_epoch", fitted.resumed_at_epoch)
    if (tuned := fitted.tuned) is not None:
        mlflow.log_params({f"tune.chosen.{key}": value for key, value in tuned.values.items()})
        mlflow.log_metrics({"tune_s": tuned.seconds, "tune_best_val_acc": tuned.val_acc})
        if tuned.reused_from:  # no trials of its own: the donor run has them
            donor = tuned.reused_from
            mlflow.log_params({"tune.searched": ",".join(tuned.values), "tune.reused_from": donor})
        else:
            log_trials(tuned.values, tuned.table or [], tuned.budget_epochs)
    elif spec.tune.name and spec.probe:  # tune=fair: the probe's C grid is its tuning
        mlflow.log_param("tune.searched", f"strategy.probe_c ({len(spec.strategy.probe_c)} C)")
    if fitted.probe_val_acc is not None:
        mlflow.log_param("probe_c_chosen", fitted.probe_c)
        grid = sorted(fitted.probe_val_acc.items())
        table = {"C": [c for c, _ in grid], "val_acc": [a for _, a in grid]}
        mlflow.log_table(table, "probe_c_grid.json")
    if result.test_predictions is not None:  # the report's bootstrap over test images
        mlflow.log_table(result.test_predictions, "test_predictions.json")
    if result.shift_predictions is not None:  # the same, for the shift test
        mlflow.log_table(result.shift_predictions, "shift_predictions.json")
    mlflow.log_dict(
        {"classes": result.classes, "matrix": fitted.confusion}, "confusion_matrix.json"
    )
    figure = plot_confusion(fitted.confusion, result.classes)
    mlflow.log_figure(figure, "confusion_matrix.png")
    plt.close(figure)
    model_id = None
    if spec.tracking.log_model and fitted.checkpoint:
        model_id = log_checkpoint(spec, fitted.checkpoint, result.classes)
    mlflow.log_metrics(fitted.scores, model_id=model_id)


# The learning rates' curves (LearningRateMonitor's names), stepped by optimizer step; the
# model's own, EPOCH_CURVES, by epoch.
RATE_CURVES = "lr-"


def copy_curves(
    spec: CellSpec,
    run: Run,
    source: str,
    epochs: int,
    steps: int,
    last: Mapping[str, float] | None = None,
    time_ms: int = 0,
) -> int:
    """A resumed cell's run gets the curves of the attempt it resumed (run `source`) up to where
    that attempt's checkpoint stood: its first `epochs` epochs, its learning rates before
    optimizer step `steps`. `last`: the values of its last epoch the checkpoint kept (at
    `time_ms`), for the points the attempt was cut off before it logged (Lightning logs an
    epoch's training metrics after it saved the checkpoint). The resumed fit logs the rest: the
    run holds each epoch once, as an uninterrupted cell's does. Rank 0 alone; the points
    copied."""
    if not ranks.is_rank_zero():
        return 0
    client = mlflow.MlflowClient(identity.tracking_uri(spec))
    names = client.get_run(source).data.metrics
    points = [
        Metric(point.key, point.value, point.timestamp, point.step)
        for name in names
        if name in EPOCH_CURVES or name.startswith(RATE_CURVES)
        for point in client.get_metric_history(source, name)
        if point.step < (epochs if name in EPOCH_CURVES else steps)
    ]
    logged = {(point.key, point.step) for point in points}
    if epochs > 0:
        points += [
            Metric(name, value, time_ms, epochs - 1)
            for name, value in (last or {}).items()
            if name in EPOCH_CURVES and (name, epochs - 1) not in logged
        ]
    for first in range(0, len(points), 1000):  # MLflow's most per request
        client.log_batch(run.info.run_id, metrics=points[first : first + 1000])
    return len(points)


def log_trials(
    chosen: dict[str, float], trials: list[dict[str, object]], budget_epochs: int | None = None
) -> None:
    """The tuning's budget as params and metrics (what was searched; its budget in
    trial-epochs; trials completed, pruned and the epochs they ran) and its trials as a table
    artifact, browsable in the run's UI."""
    mlflow.log_param("tune.searched", ",".join(chosen))
    states = [row["state"] for row in trials]
    budget = {} if budget_epochs is None else {"tune_budget_epochs": budget_epochs}
    mlflow.log_metrics(
        {
            "tune_trials_completed": states.count("COMPLETE"),
            "tune_trials_pruned": states.count("PRUNED"),
            "tune_epochs_run": sum(int(cast(SupportsInt, row["epochs"])) for row in trials),
            **budget,
        }
    )
    if trials:
        columns = list(dict.fromkeys(key for row in trials for key in row))
        mlflow.log_table({c: [row.get(c) for row in trials] for c in columns}, "tune_trials.json")


class TrialRuns:
    """The tuning's trials as MLflow child runs of the cell's run (benchmark.cell.tune's
    TrialObserver), browsable under it in the UI: each with the values it tried as params, its
    validation (and training) metrics per epoch, its best val_acc (`best_val_acc`, the score the
    choice reads), its epochs run and its state (tag `tune.state`: COMPLETE or PRUNED); it ends
    FINISHED, or FAILED when the trial raised. Tagged as the harness's of kind `trial`, without
    a cell key, cell params or a sweep tag: no count of cells (the report's, a relaunch's, the
    plan's) takes one for a cell. A heartbeat per trial run, as the cell's, so that one left
    RUNNING by a killed process ends FAILED by the stale-run rule. A DDP rank other than 0
    logs nothing."""

    def __init__(self, spec: CellSpec, run: Run) -> None:
        self.uri, self.cell, self.trials = identity.tracking_uri(spec), spec.name, spec.tune.trials
        self.parent, self.experiment_id = run.info.run_id, run.info.experiment_id
        self.active = ranks.is_rank_zero() and bool(self.parent) and bool(self.experiment_id)
        self.running: dict[int, tuple[str, Callable[[], None]]] = {}

    def tags(self, number: int) -> dict[str, str]:
        return {
            identity.HARNESS_TAG: "benchmark",
            identity.SCHEMA_TAG: identity.SCHEMA_VERSION,
            identity.KIND_TAG: identity.TRIAL_KIND,
            MLFLOW_PARENT_RUN_ID: self.parent,
            "cell": self.cell,
            "tune.trial": str(number),  # Optuna's number (the study's; the lines say it + 1)
            **store.heartbeat_tags(),
        }

    def started(self, number: int, values: dict[str, float], epochs: int) -> list[Callback]:
        if not self.active:
            return []
        client = mlflow.MlflowClient(self.uri)
        of = f"/{self.trials}" if self.trials else ""
        run = client.create_run(
            self.experiment_id, run_name=f"trial {number + 1}{of}", tags=self.tags(number)
        )
        run_id = run.info.run_id
        params = {**values, "tune.trial_epochs": epochs}
        client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.running[number] = (run_id, store.keep_beating(self.uri, run_id))
        return [TrialCurve(client, run_id)]

    def ended(self, trial: FrozenTrial) -> None:
        if trial.number not in self.running:
            return
        run_id, stop_heartbeat = self.running.pop(trial.number)
        stop_heartbeat()
        client = mlflow.MlflowClient(self.uri)
        seen = trial.intermediate_values  # the best val_acc so far, after each epoch run
        now = int(time.time() * 1000)
        metrics = {"epochs_run": float(len(seen))}
        if seen:
            metrics["best_val_acc"] = max(seen.values())
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag("tune.state", trial.state.name)],
        )
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))

    def failed(self, number: int, error: BaseException) -> None:
        if number not in self.running:
            return
        run_id, stop_heartbeat = self.running.pop(number)
        stop_heartbeat()
        client = mlflow.MlflowClient(self.uri)
        with suppress(Exception):  # the trial's own error is the news
            client.set_tag(run_id, "error", store.error_tag(f"{type(error).__name__}: {error}"))
            client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


class TrialCurve(Callback):
    """A trial's epoch metrics (val_acc, val_loss, train_acc, train_loss) into its child run,
    against the epoch."""

    def __init__(self, client: mlflow.MlflowClient, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    def _log(self, trainer: L.Trainer, prefix: str) -> None:
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, trainer.current_epoch)
            for name, value in trainer.callback_metrics.items()
            if name.startswith(prefix)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:  # before the pruner, which may end the trial here
            self._log(trainer, "val_")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._log(trainer, "train_")


def log_checkpoint(spec: CellSpec, checkpoint: str, classes: list[str]) -> str:
    """The checkpoint selected on validation as the run's logged model `model` (the UI's Models
    column; `runs:/<run id>/model`): an MLflow pyfunc model (benchmark.models.served) that
    predicts class names from image paths, the Lightning checkpoint file its artifact, the
    backbone, its preprocessing, the colour mode and `classes` (the head's order) its model
    config. Once the model is in the store, the cell's own copy of the file is removed (the test
    passes that read it have run; nothing after reads it): one copy, the model's."""
    import mlflow.pyfunc  # the served model's code, which this call alone needs

    from benchmark.models import served
    from benchmark.models.backbones import create_backbone

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_checkpoint logs into the cell's MLflow run, and none is active.")
    # MLflow loads the model to check its input example: no download progress bar in a log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    backbone = spec.backbone
    built = create_backbone(backbone.name, backbone.weights_path, model=backbone.model)
    info = mlflow.pyfunc.log_model(
        name=served.MODEL_NAME,
        python_model=served.CODE,
        artifacts={served.CHECKPOINT: checkpoint},
        model_config=served.served_config(
            backbone.name,
            built.preprocess,
            spec.colour.grayscale,
            classes,
            timm_model=backbone.model,
            weights_path=backbone.weights_path,
        ),
        signature=served.signature(classes),
        input_example=served.input_example(),
        pip_requirements=served.requirements(backbone.name),
        model_type=served.MODEL_TYPE,
        params={
            "backbone": backbone.model or backbone.name,
            "strategy": spec.strategy.name,
            "dataset": spec.dataset.name,
            "colour": spec.colour.name,
            "seed": str(spec.seed),
        },
    )
    file = spec.output_dir / checkpoint  # (an absolute checkpoint path stays itself)
    if file.resolve().is_relative_to(spec.output_dir.resolve()):
        file.unlink(missing_ok=True)
        with suppress(OSError):  # the other candidate may still be there
            file.parent.rmdir()
    return info.model_id


def plot_confusion(matrix: list[list[int]], classes: list[str]) -> plt.Figure:
    size = min(12.0, 2.5 + 0.45 * len(classes))
    figure, axes = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay(torch.tensor(matrix).numpy(), display_labels=classes)
    display.plot(ax=axes, include_values=len(classes) <= 30, colorbar=False, xticks_rotation=45)
    axes.set_title("test split")
    figure.tight_layout()
    return figure


class CellLogger(MLFlowLogger):
    """Lightning's MLflow logger, writing into the run that `cell_run` owns.

    Lightning would mark the run FINISHED after `fit`, before the test split is scored; the
    run's final status is left to `cell_run`, which sees fit and test as one unit.
    """

    def finalize(self, status: str = "success") -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Every metric is an epoch aggregate: plot it against the epoch, not the optimizer step."""
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        super().log_metrics(metrics, step=step if epoch is None else int(epoch))


def more_callbacks(spec: CellSpec) -> list[Callback]:
    """The `callbacks` group's Lightning callbacks (conf/callbacks/), instantiated as they are."""
    return [hydra.utils.instantiate(arguments) for arguments in (spec.callbacks or {}).values()]


def lightning_loggers(spec: CellSpec, run: Run | None) -> list[Logger]:
    """The `logger` group's Lightning loggers. An entry with `_partial_: true` (the `mlflow` one)
    receives the cell's run id and store. A DDP rank other than 0 has no run: its logger opens
    none and logs nothing, Lightning's logger methods being rank-zero only."""
    run_id = run.info.run_id if run is not None else None
    run_id = run_id or os.environ.get(identity.RUN_ID_ENV)
    loggers = []
    for arguments in spec.logger.values():
        logger = hydra.utils.instantiate(arguments)
        if isinstance(logger, functools.partial):
            logger = logger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())
        loggers.append(logger)
    return loggers
