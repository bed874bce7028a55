"""A cell cut off mid-fit resumes where it stopped when it is relaunched (benchmark.cell.resume):
its fit goes on from its last checkpoint, ends FINISHED with the same selection rule, and on the
stub (one device, the loader in the main process) computes exactly what the uninterrupted cell
computes. Each test cuts a whole stub cell with benchmark.runtime.interrupt.Terminated (what
SIGTERM and Ctrl-C raise in a cell) from a callback, or a real command with SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.cell import mlflow_run, resume
from benchmark.cell.run import run_cell
from benchmark.config.spec import CellSpec
from benchmark.models.resume import ENTRY, LAST_FILE
from benchmark.runtime.interrupt import Terminated
from benchmark.tracking.identity import RESUMED_FROM_TAG
from tests.test_e2e import runs_in
from tests.test_faults import cell_env, signalled

# A frozen backbone runs in eval mode on purpose (as `python -m benchmark` says, nothing).
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")

# A whole stub cell of a few seconds (tests/test_stub_cells.py), at a rate at which it learns:
# its validation accuracy reaches 1.0 at epoch 1 and ties there after, so a resumed fit that
# forgot its best epoch so far would test a later one (another test loss).
STUB = [
    "backbone=stub",
    "dataset=synthetic",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "data.num_workers=0",
    "tracking.system_metrics=false",
]
LEARNS = ["strategy.lr=0.3", "trainer.max_epochs=4"]
# What a resumed cell may log otherwise than the uninterrupted one: what it cost, and that it
# resumed.
COST = ("wall_time_s", "peak_rss_mb", "peak_gpu_mem_mb", "train_images_per_s", "image_cache")
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc", "lr-")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.data_root for dataset=synthetic, made there once per session."""
    return tmp_path_factory.mktemp("synthetic-data")


@pytest.fixture
def stub(
    make_cfg: Callable[..., CellSpec], synthetic_root: Path, tmp_path: Path, empty_store: Path
) -> Callable[..., CellSpec]:
    """A stub cell; `folder` names its output folder (as a relaunch of the same command under
    Hydra gets a new one), `store` its store (`whole`: another one, for the uninterrupted cell
    the resumed one is compared with)."""

    def make(*overrides: str, folder: str = "out", store: str = "mlflow") -> CellSpec:
        db = tmp_path / f"{store}.db"
        if not db.exists():
            shutil.copy(empty_store, db)
        return make_cfg(
            *STUB,
            *overrides,
            f"paths.output_dir={tmp_path / folder}",
            f"tracking.uri=sqlite:///{db}",
            data_root=synthetic_root,
        )

    return make


class CutAt(Callback):
    """Stops the cell as SIGTERM does, as the fit's epoch `epoch` starts (None: as its test
    starts, the fit done)."""

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise Terminated("terminated by signal 15 (SIGTERM)")

    def on_test_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.epoch is None:
            raise Terminated("terminated by signal 15 (SIGTERM)")


class Epochs(Callback):
    """The epochs a fit trains."""

    def __init__(self) -> None:
        self.trained: list[int] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.trained.append(trainer.current_epoch)


def cut(spec: CellSpec, epoch: int | None) -> mlflow.entities.Run:
    """The cell, cut off at `epoch`: its run, FAILED."""
    with pytest.raises(Terminated):
        run_cell(spec, callbacks=[CutAt(epoch)])
    client = mlflow.MlflowClient(spec.tracking.uri)
    experiment = client.get_experiment_by_name(spec.tracking.experiment)
    assert experiment is not None
    (run,) = client.search_runs(
        [experiment.experiment_id],
        "tags.`benchmark.kind` = 'cell'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    assert run.info.status == "FAILED"
    return run


def results(spec: CellSpec, run_id: str) -> tuple[dict[str, float], dict[str, list]]:
    """A run's metrics (less what it cost and that it resumed) and its curves, point by point."""
    client = mlflow.MlflowClient(spec.tracking.uri)
    metrics = client.get_run(run_id).data.metrics
    kept = {
        name: value
        for name, value in metrics.items()
        if not name.startswith(COST) and name != "resumed_at_epoch"
    }
    curves = {
        name: [(p.step, p.value) for p in client.get_metric_history(run_id, name)]
        for name in metrics
        if name.startswith(CURVES)
    }
    return kept, curves


def kept_files(folder: Path) -> list[Path]:
    """What a cell keeps for a relaunch in its output folder."""
    return [
        file
        for file in (folder / resume.STATE_FILE, folder / resume.CHECKPOINTS / LAST_FILE)
        if file.exists()
    ]


CASES = {
    # cut at epoch 2 of 4, its best epoch (1) before the cut; relaunched into a new folder, as
    # the same command under Hydra is (a timestamped one)
    "best epoch before the cut, new folder": (LEARNS, 2, "again"),
    # the start scores best (the stub barely learns at its own rate): the start's checkpoint
    # and score must come through the cut
    "the start wins, same folder": (["trainer.max_epochs=3"], 1, "out"),
    # two_stage unfreezes at epoch 1: the resumed fit trains the unfrozen stages again
    "two_stage cut after it unfroze": (
        [
            "strategy=two_stage",
            "strategy.unfreeze_at_epoch=1",
            "strategy.lr=0.3",
            "trainer.max_epochs=4",
        ],
        2,
        "again",
    ),
    # the fit done, cut in its test: the relaunch fits nothing and selects, tests, logs
    "cut after the fit, in its test": (LEARNS, None, "out"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_cell_cut_off_mid_fit_resumes_where_it_stopped(stub, case):
    overrides, at, folder = CASES[case]
    whole_spec = stub(*overrides, folder="whole", store="whole")
    whole = run_cell(whole_spec)
    spec = stub(*overrides)
    epochs = spec.max_epochs
    failed = cut(spec, at)
    assert kept_files(spec.output_dir)  # what the relaunch resumes from
    seen = Epochs()
    again = stub(*overrides, folder=folder)
    summary = run_cell(again, callbacks=[seen])

    done = epochs if at is None else at
    assert seen.trained == list(range(done, epochs))  # the rest of the fit, not all of it
    run = mlflow.MlflowClient(spec.tracking.uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.run_id != failed.info.run_id
    assert run.data.tags[RESUMED_FROM_TAG] == failed.info.run_id
    assert run.data.metrics["resumed_at_epoch"] == done
    assert run.data.metrics["epochs_run"] == epochs  # counted on from the cut, not restarted
    # Exactly the uninterrupted cell's numbers: the selection (best_val_acc, best_val_epoch,
    # test_acc and test_loss of the checkpoint it chose), how the fit ended, every epoch's
    # curve point once (those before the cut copied from the failed run), the steps taken.
    resumed_metrics, resumed_curves = results(spec, summary.run_id)
    whole_metrics, whole_curves = results(whole_spec, whole.run_id)
    assert resumed_metrics == whole_metrics
    assert resumed_curves == whole_curves
    # One copy of things: nothing kept for a relaunch, in either folder.
    assert kept_files(spec.output_dir) == [] and kept_files(again.output_dir) == []
    assert run_cell(again).skipped  # and a relaunch now skips it


@pytest.mark.parametrize("second", ["mid-fit, in a third folder", "before it resumed"])
def test_a_cell_cut_off_twice_resumes_from_the_latest_checkpoint(stub, monkeypatch, second):
    """Cut at epoch 1 of 5; relaunched, cut again: at epoch 3 (its own checkpoint is then the
    latest), or before its fit resumed, in the same folder (the first run's checkpoint still
    is: the curves come from the run that wrote it). The third launch ends as the uninterrupted
    cell does, and leaves nothing in any of the folders."""
    five = [*LEARNS, "trainer.max_epochs=5"]
    whole_spec = stub(*five, folder="whole", store="whole")
    whole = run_cell(whole_spec)
    first = stub(*five)
    one = cut(first, 1)
    if second == "before it resumed":
        again = first

        def stopped(*args, **kwargs):
            raise Terminated("terminated by signal 15 (SIGTERM)")

        monkeypatch.setattr(mlflow_run, "copy_curves", stopped)
        cut(again, 1)
        monkeypatch.undo()
        writer, done = one, 1
    else:
        again = stub(*five, folder="again")
        writer, done = cut(again, 3), 3
    seen = Epochs()
    last = stub(*five, folder="last" if second != "before it resumed" else "out")
    summary = run_cell(last, callbacks=[seen])
    assert seen.trained == list(range(done, 5))
    run = mlflow.MlflowClient(first.tracking.uri).get_run(summary.run_id)
    assert run.data.tags[RESUMED_FROM_TAG] == writer.info.run_id
    assert run.data.metrics["resumed_at_epoch"] == done
    assert results(first, summary.run_id) == results(whole_spec, whole.run_id)
    for spec in (first, again, last):
        assert kept_files(spec.output_dir) == []


def test_a_cut_before_the_epochs_training_metrics_were_logged_leaves_no_gap(stub, monkeypatch):
    """Lightning logs an epoch's training metrics after the checkpoint of its end is written: a
    cell cut off in between (a SIGTERM there, a tracking server that stopped answering) resumes
    after that epoch, and its run still has that epoch's point of every curve, from the
    checkpoint."""
    whole_spec = stub(*LEARNS, folder="whole", store="whole")
    whole = run_cell(whole_spec)
    spec = stub(*LEARNS)
    logged = mlflow_run.CellLogger.log_metrics

    def log_metrics(self, metrics, step=None):
        if "train_loss" in metrics and metrics.get("epoch") == 1:
            raise Terminated("terminated by signal 15 (SIGTERM)")
        logged(self, metrics, step)

    monkeypatch.setattr(mlflow_run.CellLogger, "log_metrics", log_metrics)
    failed = cut(spec, None)
    client = mlflow.MlflowClient(spec.tracking.uri)
    assert [p.step for p in client.get_metric_history(failed.info.run_id, "train_loss")] == [0]
    monkeypatch.undo()
    summary = run_cell(spec)
    run = client.get_run(summary.run_id)
    assert run.data.metrics["resumed_at_epoch"] == 2
    assert results(spec, summary.run_id) == results(whole_spec, whole.run_id)


@pytest.mark.parametrize("at", [0, 1])
def test_a_tuned_cell_cut_off_after_its_tuning_is_not_tuned_again(stub, at):
    """Cut at its fit's first epoch (no last checkpoint yet: the fit runs from its start at the
    values chosen) or at its second (the fit resumes): either way no trial runs again, and the
    cell ends as the uninterrupted tuned cell does."""
    tuned = [*LEARNS, "tune.trials=2", "tune.epochs=1"]
    whole_spec = stub(*tuned, folder="whole", store="whole")
    whole = run_cell(whole_spec)
    spec = stub(*tuned)
    failed = cut(spec, at)
    trials = runs_in(Path(spec.tracking.uri.removeprefix("sqlite:///")), kind="trial")
    assert len(trials) == 2 and set(trials["tags.mlflow.parentRunId"]) == {failed.info.run_id}
    state = json.loads((spec.output_dir / resume.STATE_FILE).read_text())
    seen = Epochs()
    summary = run_cell(stub(*tuned, folder="again"), callbacks=[seen])

    assert seen.trained == list(range(at, spec.max_epochs))
    again = runs_in(Path(spec.tracking.uri.removeprefix("sqlite:///")), kind="trial")
    assert len(again) == 2  # no trial of its own: the tuning was not run again
    run = mlflow.MlflowClient(spec.tracking.uri).get_run(summary.run_id)
    assert run.data.tags[RESUMED_FROM_TAG] == failed.info.run_id
    assert run.data.metrics["resumed_at_epoch"] == at
    chosen = {k: v for k, v in run.data.params.items() if k.startswith("tune.chosen.")}
    assert chosen == {f"tune.chosen.{k}": str(v) for k, v in state["tuned"]["values"].items()}
    assert run.data.metrics["tune_s"] == state["tuned"]["seconds"]  # the tuning's, as it ran
    whole_run = mlflow.MlflowClient(whole_spec.tracking.uri).get_run(whole.run_id)
    assert chosen == {k: v for k, v in whole_run.data.params.items() if k in chosen}
    assert results(spec, summary.run_id)[0] | {"tune_s": 0} == results(whole_spec, whole.run_id)[
        0
    ] | {"tune_s": 0}


@pytest.mark.parametrize("stale", ["state file and checkpoint", "checkpoint"])
def test_a_stale_last_checkpoint_of_another_cell_is_ignored(stub, tmp_path, caplog, stale):
    """The cut-off cell's folder holds another cell's last checkpoint (and state file), as a
    folder reused by another config would: the relaunch says so, fits from its start, and
    leaves no such file once FINISHED."""
    other = stub(*LEARNS, "seed=1", folder="other")
    cut(other, 2)
    spec = stub(*LEARNS)
    failed = cut(spec, 2)
    mine = spec.output_dir / resume.CHECKPOINTS / LAST_FILE
    shutil.copy(other.output_dir / resume.CHECKPOINTS / LAST_FILE, mine)
    if stale != "checkpoint":
        shutil.copy(other.output_dir / resume.STATE_FILE, spec.output_dir / resume.STATE_FILE)
    seen = Epochs()
    with caplog.at_level("WARNING", logger="benchmark"):
        summary = run_cell(spec, callbacks=[seen])

    assert "it is another cell's" in caplog.text
    assert seen.trained == list(range(spec.max_epochs))  # from its start
    run = mlflow.MlflowClient(spec.tracking.uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED" and run.info.run_id != failed.info.run_id
    assert RESUMED_FROM_TAG not in run.data.tags and "resumed_at_epoch" not in run.data.metrics
    assert kept_files(spec.output_dir) == []
    assert kept_files(other.output_dir)  # the other cell's own, untouched


def test_a_checkpoint_kept_by_other_code_is_not_resumed(stub, monkeypatch, caplog):
    """The commit of the code is kept beside the checkpoint: a relaunch after the code changed
    fits from the start, rather than finish a fit that older code began."""
    spec = stub(*LEARNS)
    cut(spec, 2)
    monkeypatch.setattr(resume, "code", lambda: "a later commit")
    seen = Epochs()
    with caplog.at_level("WARNING", logger="benchmark"):
        summary = run_cell(spec, callbacks=[seen])
    assert "kept by the code at commit" in caplog.text
    assert seen.trained == list(range(spec.max_epochs))
    run = mlflow.MlflowClient(spec.tracking.uri).get_run(summary.run_id)
    assert RESUMED_FROM_TAG not in run.data.tags


class LooksAtLast(Callback):
    """What the cell keeps for a relaunch, as each epoch after the first starts."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            return
        last = self.folder / resume.CHECKPOINTS / LAST_FILE
        said = json.loads((self.folder / resume.STATE_FILE).read_text())
        kept = torch.load(last, map_location="cpu", weights_only=True)
        self.seen.append((kept[ENTRY]["epochs"], kept[ENTRY]["cell_key"], said["cell_key"]))


def test_a_fitting_cell_keeps_a_last_checkpoint_and_a_finished_one_leaves_none(stub):
    spec = stub(*LEARNS)
    looks = LooksAtLast(spec.output_dir)
    summary = run_cell(spec, callbacks=[looks])
    run = mlflow.MlflowClient(spec.tracking.uri).get_run(summary.run_id)
    key = run.data.tags["cell_key"]
    # The whole state at each epoch's end, the cell's key in it and beside it.
    assert looks.seen == [(epoch, key, key) for epoch in range(1, spec.max_epochs)]
    assert kept_files(spec.output_dir) == []  # FINISHED: the selected model is in its run
    assert RESUMED_FROM_TAG not in run.data.tags and "resumed_at_epoch" not in run.data.metrics


@pytest.mark.e2e
def test_a_command_stopped_by_sigterm_resumes_when_relaunched(tmp_path, tmp_store, synthetic_root):
    """The real thing: `python -m benchmark` SIGTERMed once its fit has a last checkpoint, then
    the same command again (Hydra gives it a new, timestamped output folder)."""
    command = [
        sys.executable, "-m", "benchmark", *STUB, f"paths.data_root={synthetic_root}",
        "trainer.max_epochs=10",
    ]  # fmt: skip
    first, output = signalled(command, tmp_path, f"checkpoints/{LAST_FILE}", signal.SIGTERM, 0)
    assert first.returncode == 143, output[-3000:]
    again = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, env=cell_env(), timeout=600,
        check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = runs_in(tmp_store).sort_values("start_time")
    assert list(runs.status) == ["FAILED", "FINISHED"]
    failed, finished = runs.iloc[0], runs.iloc[1]
    assert finished[f"tags.{RESUMED_FROM_TAG}"] == failed.run_id
    assert finished["metrics.resumed_at_epoch"] >= 1
    assert finished["metrics.epochs_run"] == 10
    assert failed["tags.hydra_output_dir"] != finished["tags.hydra_output_dir"]
    assert not list(tmp_path.rglob(LAST_FILE)) and not list(tmp_path.rglob(resume.STATE_FILE))
