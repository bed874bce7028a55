"""MLflow: where runs go, what each run records, and no run left RUNNING after a crash."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import matplotlib.pyplot as plt
import mlflow
import pandas as pd
import torch
from filelock import FileLock
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import MLFlowLogger
from matplotlib.figure import Figure
from mlflow.entities import Run, RunData, RunInfo, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from omegaconf import DictConfig, OmegaConf
from torchmetrics.utilities.plot import plot_confusion_matrix

from benchmark.data import Manifest
from benchmark.store import check_reachable, settle_abandoned_runs

if TYPE_CHECKING:
    from benchmark.probe import ProbeResult

# The names users filter and group by: params.dataset, params.colour, ...
CELL_PARAMS = ("dataset", "colour", "strategy", "backbone")
PROJECT_DIR = Path(__file__).resolve().parent.parent
# In a cell's output folder once its run has started: which run to end FAILED if the process is
# killed before `cell_run` can (benchmark.launcher).
RUN_FILE = "mlflow_run.json"
# Rank 0's run id, inherited by the ranks that Lightning's DDP launcher starts as subprocesses.
RUN_ID_ENV = "BENCHMARK_RUN_ID"


def default_tracking_uri() -> str:
    """MLflow's own default store, with the path made absolute so every process agrees."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def tracking_uri(cfg: DictConfig) -> str:
    return cfg.tracking.uri or default_tracking_uri()


def experiment_id(uri: str, name: str) -> str:
    """Create the experiment once, with artifacts beside a local SQLite store (not in ./mlruns).

    Processes that open a fresh SQLite store at the same moment race through MLflow's schema
    migrations ("table ... already exists", alembic version errors) and to create the experiment:
    a file lock beside the store lets one of them create both while the others wait.
    """
    check_reachable(uri)  # a server that is down: one line at once, not minutes
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):  # a server or database serialises this itself
        return _get_or_create_experiment(name, None)
    store = Path(uri.removeprefix("sqlite:///"))
    store.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{store}.lock", timeout=600):
        return _get_or_create_experiment(name, (store.parent / "mlartifacts").as_uri())


def _get_or_create_experiment(name: str, artifacts: str | None) -> str:
    if (experiment := mlflow.get_experiment_by_name(name)) is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifacts)
    except MlflowException as error:  # another process created it since we looked
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_DIR,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_params(cfg: DictConfig) -> dict[str, object]:
    """The cell's flat names first, then every key of the resolved config (`optim.momentum`...)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    flat = pd.json_normalize(resolved, sep=".").iloc[0].to_dict()
    cell = {name: cfg[name].name for name in CELL_PARAMS}
    return {**cell, "seed": cfg.seed, **flat}


# Where a cell writes and how it shows progress, not what it computes: left out of its identity.
VOLATILE_KEYS = ("paths", "tracking", "rerun", "trainer.enable_progress_bar", "data.num_workers")


def cell_key(cfg: DictConfig) -> str:
    """A stable hash of what the cell computes (its resolved config less VOLATILE_KEYS): the
    same command relaunched finds the cells it already finished."""
    return _key(run_params(cfg))


def _key(params: dict[str, object]) -> str:
    volatile = tuple(f"{key}." for key in VOLATILE_KEYS)
    kept = {
        k: v for k, v in params.items() if k not in VOLATILE_KEYS and not k.startswith(volatile)
    }
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def finished_run(cfg: DictConfig) -> Run | None:
    """The latest FINISHED run of this very cell in the experiment, if any."""
    if rank_zero_only.rank != 0 and os.environ.get(RUN_ID_ENV):
        return None  # a DDP rank started by rank 0, which has already decided to run the cell
    exp_id = experiment_id(tracking_uri(cfg), cfg.tracking.experiment)
    settle_abandoned_runs(exp_id, cell_key(cfg))  # its runs a failed process left RUNNING
    runs = mlflow.search_runs(
        [exp_id],
        f"tags.cell_key = '{cell_key(cfg)}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return runs[0] if runs else None


@contextmanager
def cell_run(cfg: DictConfig, name: str) -> Iterator[Run]:
    """An MLflow run for one cell: FINISHED when the block completes, FAILED (with the error
    text as a tag and the traceback as an artifact) when anything inside it raises.

    Under DDP only global rank 0 opens the run and logs (the other ranks get a stand-in holding
    rank 0's run id). The run id goes to RUN_FILE in the output folder, so that a launcher that
    sees the process killed can end the run FAILED, and to RUN_ID_ENV for DDP's child ranks.
    """
    if rank_zero_only.rank != 0:
        mlflow.set_tracking_uri(tracking_uri(cfg))  # for its Lightning logger; opens nothing
        yield _other_rank_run()
        return
    uri = tracking_uri(cfg)
    exp_id = experiment_id(uri, cfg.tracking.experiment)
    tags = {
        "cell": name,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "hydra_output_dir": str(cfg.paths.output_dir),
    }
    params = run_params(cfg)
    tags["cell_key"] = _key(params)
    # The sweep folder groups a sweep's cells (report --sweep); a launcher that starts each cell
    # as its own process passes it in the environment.
    if sweep := os.environ.get("BENCHMARK_SWEEP"):
        tags["sweep"] = sweep
    elif HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        tags["sweep"] = str(Path(HydraConfig.get().sweep.dir).resolve())
    with mlflow.start_run(experiment_id=exp_id, run_name=name.replace("/", "-"), tags=tags) as run:
        output = Path(cfg.paths.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        started = {"run_id": run.info.run_id, "tracking_uri": uri}
        (output / RUN_FILE).write_text(json.dumps(started))
        os.environ[RUN_ID_ENV] = run.info.run_id
        mlflow.log_params(params)
        mlflow.log_dict(OmegaConf.to_container(cfg, resolve=True), "config.yaml")
        try:
            yield run
        except BaseException as error:
            mlflow.set_tag("error", f"{type(error).__name__}: {error}"[:5000])
            mlflow.log_text(traceback.format_exc(), "error.txt")
            raise
        finally:
            os.environ.pop(RUN_ID_ENV, None)


def _other_rank_run() -> Run:
    """A DDP rank other than 0 holds no MLflow run: a stand-in with rank 0's run id (when
    Lightning started this rank from rank 0's process), built without touching the store."""
    info = RunInfo(
        run_id=os.environ.get(RUN_ID_ENV, ""),
        experiment_id="",
        user_id="",
        status=RunStatus.to_string(RunStatus.RUNNING),
        start_time=0,
        end_time=None,
        lifecycle_stage="active",
    )
    return Run(info, RunData())


def fail_abandoned_run(folder: Path, reason: str) -> str | None:
    """End FAILED, with `reason` as its `error` tag, the run that a cell killed in `folder` left
    RUNNING (the process could not end it itself); its id, or None if there was none."""
    file = folder / RUN_FILE
    if not file.is_file():
        return None
    started = json.loads(file.read_text())
    client, run_id = mlflow.MlflowClient(started["tracking_uri"]), started["run_id"]
    if client.get_run(run_id).info.status != RunStatus.to_string(RunStatus.RUNNING):
        return None
    client.set_tag(run_id, "error", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
    return run_id


@rank_zero_only
def log_manifest(manifest: Manifest) -> None:
    """The exact images and splits behind this run's numbers, and what was left out and why."""
    mlflow.log_text(manifest.csv, "manifest.csv")
    mlflow.log_text(manifest.skipped.to_csv(index=False), "skipped_files.csv")
    counts = manifest.frame.groupby("split").size()
    mlflow.log_params({f"n_{split}": int(n) for split, n in counts.items()})
    mlflow.log_params(
        {
            "n_classes": len(manifest.classes),
            "n_skipped": len(manifest.skipped),
            "manifest_sha256": manifest.sha256,
        }
    )


@rank_zero_only
def log_device(trainer: L.Trainer | None) -> None:
    """The trainer's device and precision; None: fitted on the CPU in float64 (scikit-learn)."""
    if trainer is None:
        mlflow.set_tags({"device": "cpu", "precision": "64 (scikit-learn)"})
        return
    device = trainer.strategy.root_device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    mlflow.set_tags({"device": name, "precision": str(trainer.precision)})


@rank_zero_only
def log_confusion(matrix: torch.Tensor, classes: list[str]) -> None:
    """The test split's confusion matrix, as numbers (for the report) and as a picture."""
    mlflow.log_dict({"classes": classes, "matrix": matrix.tolist()}, "confusion_matrix.json")
    figure = plot_confusion(matrix, classes)
    mlflow.log_figure(figure, "confusion_matrix.png")
    plt.close(figure)


def plot_confusion(matrix: torch.Tensor, classes: list[str], title: str = "test split") -> Figure:
    size = min(12.0, 2.5 + 0.45 * len(classes))
    figure, axes = plt.subplots(figsize=(size, size))
    plot_confusion_matrix(matrix, ax=axes, add_text=len(classes) <= 30, labels=classes)
    axes.set_title(title)
    figure.tight_layout()
    return figure


@rank_zero_only
def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark. Linux's VmHWM belongs to the process's
    own address space; ru_maxrss would carry over the peak of a large parent that started it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, not macOS


def log_cost(wall_s: float, train_images_per_s: float | None, device: torch.device) -> None:
    """What the cell cost: time, speed (None: no training loop) and memory high-water marks."""
    metrics = {"wall_time_s": wall_s, "peak_rss_mb": peak_rss_mb()}
    if train_images_per_s is not None:
        metrics["train_images_per_s"] = train_images_per_s
    if device.type == "cuda":
        metrics["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    mlflow.log_metrics(metrics)


@rank_zero_only
def log_input(kind: str) -> None:
    """What the head trained on (images, or a frozen backbone's cached features)."""
    mlflow.log_param("input", kind)


@rank_zero_only
def log_build(name: str, seconds: float) -> None:
    """Time this run spent building a cache (0: it was there), kept apart from training."""
    mlflow.log_metric(name, seconds)


@rank_zero_only
def log_probe(probe: ProbeResult) -> None:
    """The linear probe's choice of C and what every C scored on validation."""
    mlflow.log_param("probe_c_chosen", probe.c)
    for step, (c, accuracy) in enumerate(sorted(probe.val_acc_by_c.items())):
        mlflow.log_metrics({"probe_val_acc": accuracy, "probe_c": c}, step=step)
    mlflow.log_metrics(
        {"val_acc": probe.val_acc, "test_acc": probe.test_acc, "test_loss": probe.test_loss}
    )


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


def lightning_logger(run: Run | None) -> CellLogger:
    """The cell's run for Lightning. A DDP rank other than 0 has none: its logger opens no run
    and logs nothing, Lightning's logger methods being rank-zero only."""
    run_id = run.info.run_id if run is not None else os.environ.get(RUN_ID_ENV)
    return CellLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())
