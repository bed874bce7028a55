"""Faults, as a new user and as an attacker would make them: each ends in one clear line naming
the file or key and the fix, or is skipped with its reason; nothing is left RUNNING, nothing is
computed on the wrong data. The bad corpus is built here."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from filelock import FileLock
from PIL import Image

from benchmark.cell.mlflow_run import cell_run
from benchmark.cell.run import run_cell
from benchmark.config.rules import ConfigError
from benchmark.data import DatasetError, build_manifest
from benchmark.data.cache import build_image_cache, files_key, stored_size
from benchmark.data.images import Preprocess
from benchmark.runtime import interrupt
from benchmark.tracking import store
from benchmark.tracking.resume import cell_manifest
from benchmark.tracking.store import StoreError
from tests.conftest import PROJECT, TINY
from tests.test_e2e import runs_in

LITE = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def cell_env() -> dict[str, str]:
    """The environment of a command run from a test: the store is the one in its folder (MLflow
    exports a tracking URI set earlier in this process)."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def photos(shared_data: Path, name: str, count: int) -> list[Path]:
    return sorted((shared_data / "hymenoptera_data" / "val" / name).glob("*.jpg"))[:count]


def folder_of(tmp_path: Path, shared_data: Path, count: int = 6) -> Path:
    """A small imagefolder of real photos: ants/ and bees/."""
    root = tmp_path / "mine"
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for photo in photos(shared_data, name, count):
            shutil.copy(photo, root / name / photo.name)
    return root


# ---------------------------------------------------------------- 1. CSV


def csv_dataset(tmp_path: Path, rows: list[tuple[str, str]] | str) -> str:
    file = tmp_path / "labels.csv"
    if isinstance(rows, str):
        file.write_text(rows)
    else:
        pd.DataFrame(rows, columns=["path", "label"]).to_csv(file, index=False)
    return str(file)


def test_a_file_listed_twice_in_a_csv_is_one_image_in_one_split(tmp_path, shared_data):
    ants, bees = photos(shared_data, "ants", 12), photos(shared_data, "bees", 12)
    rows = [(str(p), "ant") for p in ants] + [(str(p), "bee") for p in bees]
    rows += rows  # every row twice
    from benchmark.config.schema import DatasetConfig

    cfg = DatasetConfig(name="csv", file=csv_dataset(tmp_path, rows))
    manifest = build_manifest(cfg, tmp_path, 0)
    assert len(manifest.frame) == 24 and manifest.frame.path.is_unique
    assert manifest.skipped.reason.str.contains("duplicate row").sum() == 24


def test_a_path_with_two_labels_names_the_image(tmp_path, shared_data):
    (ant,) = photos(shared_data, "ants", 1)
    rows = [(str(ant), "ant"), (str(ant), "bee")]
    rows += [(str(p), "bee") for p in photos(shared_data, "bees", 5)]
    from benchmark.config.schema import DatasetConfig

    # The CSV's paths are resolved: named as the file it reaches (../shared may be a link).
    with pytest.raises(DatasetError, match=f"listed with two labels \\({ant.resolve()}\\)"):
        build_manifest(DatasetConfig(name="csv", file=csv_dataset(tmp_path, rows)), tmp_path, 0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("path,label\n", "has a header but no rows"),
        ("path,label\na.jpg,ant\nb.jpg,\n", "line(s) 3 have an empty path or label"),
    ],
)
def test_empty_header_only_and_blank_label_csvs_are_one_line(tmp_path, content, message):
    from benchmark.config.schema import DatasetConfig

    cfg = DatasetConfig(name="csv", file=csv_dataset(tmp_path, content))
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_manifest(cfg, tmp_path, 0)


# ---------------------------------------------------------------- exact duplicates across splits


def test_an_image_in_train_and_test_is_kept_in_test_only(tmp_path, shared_data, make_cfg):
    root = tmp_path / "splits"
    for split in ("train", "test"):
        for name in ("ants", "bees"):
            (root / split / name).mkdir(parents=True)
            for photo in photos(shared_data, name, 6 if split == "train" else 3):
                shutil.copy(photo, root / split / name / photo.name)  # train holds test's 3
    cfg = make_cfg("dataset=imagefolder", f"dataset.root={root}")
    manifest = cell_manifest(cfg)
    by_content = manifest.frame.groupby("sha256").split.nunique()
    assert (by_content == 1).all()  # no image content in two splits
    assert (manifest.frame.split == "test").sum() == 6
    assert manifest.skipped.reason.str.contains(r"same content as .* \(test split\)").sum() == 6


# ---------------------------------------------------------------- 5. values and one class


@pytest.mark.parametrize(
    "override",
    ["trainer.max_epochs=-1", "data.batch_size=0", "dataset.val_fraction=1.5", "strategy.lr=-1"],
)
def test_values_out_of_range_are_refused_before_a_run_opens(make_cfg, tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.*must be"):
        run_cell(make_cfg(*TINY, override, store=False))
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store


@pytest.mark.e2e
def test_a_value_out_of_range_on_the_command_line_is_one_line(tmp_path, shared_data):
    command = [sys.executable, "-m", "benchmark", "trainer.max_epochs=-1"]
    env = {**cell_env(), "BENCHMARK_DATA_ROOT": str(shared_data)}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 1
    assert "trainer.max_epochs=-1: must be an integer >= 1" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr


def test_a_one_class_dataset_is_refused_before_any_cache_is_built(make_cfg, tmp_path, shared_data):
    root = folder_of(tmp_path, shared_data)
    shutil.rmtree(root / "bees")
    cfg = make_cfg(
        "dataset=imagefolder", f"dataset.root={root}", *TINY, f"paths.cache_dir={tmp_path / 'c'}"
    )
    with pytest.raises(DatasetError, match=r"has 1 class.*at least 2"):
        run_cell(cfg)
    assert not (Path(cfg.paths.cache_dir) / "images").exists()


# ---------------------------------------------------------------- 6. one bad file


def test_a_pixel_bomb_and_broken_links_are_skipped_not_fatal(tmp_path, shared_data):
    root = folder_of(tmp_path, shared_data)
    Image.new("1", (20000, 20000)).save(root / "ants" / "bomb.png")  # 400 Mpx, a few kB
    (root / "ants" / "dangling.jpg").symlink_to(root / "nowhere.jpg")
    (root / "bees" / "loop.jpg").symlink_to(root / "bees" / "loop.jpg")
    from benchmark.config.schema import DatasetConfig

    cache = tmp_path / "cache"
    cfg = DatasetConfig(name="imagefolder", root=str(root))
    manifest = build_manifest(cfg, tmp_path, 0, cache)
    names = manifest.skipped.path.map(lambda p: Path(p).name)
    reasons = dict(zip(names, manifest.skipped.reason, strict=True))
    assert reasons["bomb.png"].startswith("too large to decode safely")
    assert reasons["dangling.jpg"].startswith("unreadable (No such file or directory")
    assert reasons["loop.jpg"].startswith("unreadable (Too many levels of symbolic links")
    assert len(manifest.frame) == 12
    # An unreadable file is not remembered as bad: once fixed, it is used.
    shutil.copy(photos(shared_data, "ants", 7)[-1], root / "nowhere.jpg")
    fixed = build_manifest(cfg, tmp_path, 0, cache)
    assert len(fixed.frame) == 13 and "dangling.jpg" not in set(
        fixed.skipped.path.map(os.path.basename)
    )


# ---------------------------------------------------------------- 7. corrupt caches heal


def test_a_damaged_image_cache_is_rebuilt_and_named(tmp_path, shared_data, caplog):
    paths = [str(p) for p in photos(shared_data, "ants", 4)]
    cache, _ = build_image_cache(paths, LITE, tmp_path, threads=1)
    pixels = cache[paths[2]].clone()
    with open(cache.file, "r+b") as handle:  # random bytes in the middle, same size
        handle.seek(cache.file.stat().st_size // 2)
        handle.write(np.random.default_rng(0).bytes(4096))
    again, rebuilt_s = build_image_cache(paths, LITE, tmp_path, threads=1)
    assert rebuilt_s > 0 and str(cache.file) in caplog.text and "does not match" in caplog.text
    assert (again[paths[2]] == pixels).all()
    os.truncate(cache.file, 1000)  # truncated
    caplog.clear()
    healed, rebuilt_s = build_image_cache(paths, LITE, tmp_path, threads=1)
    assert rebuilt_s > 0 and "1000 bytes instead of" in caplog.text
    assert (healed[paths[2]] == pixels).all()
    assert build_image_cache(paths, LITE, tmp_path, threads=1)[1] == 0.0  # intact: reused


def test_a_truncated_feature_cache_is_extracted_again(make_cfg, tmp_path, shared_data, caplog):
    root = folder_of(tmp_path, shared_data, count=5)
    cache = tmp_path / "own-cache"
    overrides = (
        "dataset=imagefolder",
        f"dataset.root={root}",
        "strategy=linear_probe",
        *TINY,
        f"paths.cache_dir={cache}",
    )
    first = run_cell(make_cfg(*overrides))
    (features,) = (cache / "features").glob("*.npy")
    os.truncate(features, 100)
    again = run_cell(make_cfg(*overrides, "rerun=true"))
    assert "Feature cache" in caplog.text and str(features) in caplog.text
    assert again.test_acc == first.test_acc


# ---------------------------------------------------------------- 3. killed: never RUNNING


def _open_run_and_die(cfg) -> None:
    with cell_run(cfg, "doomed", cell_manifest(cfg)):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_cell_outside_the_gpus_launcher_is_failed_by_the_next_relaunch(make_cfg, tmp_path):
    cfg = make_cfg(*TINY)
    cell = multiprocessing.get_context("spawn").Process(target=_open_run_and_die, args=(cfg,))
    cell.start()
    cell.join(timeout=120)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    (left,) = mlflow.search_runs(experiment_names=["benchmark"], output_format="list")
    assert left.info.status == "RUNNING" and left.data.tags["heartbeat.pid"] == str(cell.pid)
    assert store.finished_run(cfg.tracking.uri, "benchmark", "doomed") is None  # a relaunch
    ended = mlflow.MlflowClient().get_run(left.info.run_id)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["error"] == f"killed: its process {cell.pid} on this host is gone"
    # A launcher that saw the process die, reading its exit status only now, says what it saw.
    run_file = tmp_path / "saw_it.json"
    run_file.write_text(json.dumps({"tracking_uri": cfg.tracking.uri, "run_id": left.info.run_id}))
    assert store.settle_failed_run(run_file, "killed by signal 9 (SIGKILL)") == left.info.run_id
    settled = mlflow.MlflowClient().get_run(left.info.run_id)
    assert settled.data.tags["error"] == "killed by signal 9 (SIGKILL)"
    assert settled.info.status == "FAILED"
    # The cell's own words are never replaced.
    mlflow.MlflowClient().set_tag(left.info.run_id, "error", "ValueError: the cell said so")
    assert store.settle_failed_run(run_file, "exited with code 1") is None
    assert mlflow.MlflowClient().get_run(left.info.run_id).data.tags["error"].startswith("Value")


def test_a_live_run_is_left_alone_and_a_silent_remote_one_is_failed():
    alive = store.heartbeat_tags()  # this very process
    assert store.gone_reason(alive) is None
    remote = {**alive, store.HOST_TAG: "elsewhere", store.BEAT_TAG: "0"}
    assert store.gone_reason(remote).startswith("killed: no heartbeat from elsewhere")
    assert store.gone_reason({**remote, store.BEAT_TAG: f"{time.time():.0f}"}) is None


# ---------------------------------------------------------------- 4. SIGTERM


def signalled(
    command: list[str], cwd: Path, reached: str, signum: int, settle_s: float
) -> tuple[subprocess.Popen[str], str]:
    """`command` started in `cwd`, sent `signum` once a file matching `reached` appears under
    `cwd` (and `settle_s` later); the ended process and its output. Killed if it outlives it."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=cell_env(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(cwd.rglob(reached)) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle_s)
        process.send_signal(signum)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return process, output


@pytest.mark.e2e
@pytest.mark.parametrize("when", ["training", "image cache"])
def test_sigterm_fails_the_cell_and_exits_non_zero(tmp_path, shared_data, tmp_store, when):
    root = folder_of(tmp_path, shared_data)
    cache = tmp_path / "cache"
    command = [
        sys.executable, "-m", "benchmark", "dataset=imagefolder", f"dataset.root={root}",
        f"paths.cache_dir={cache}", "trainer.enable_progress_bar=false", "data.num_workers=0",
        "data.batch_size=2", "trainer.max_epochs=200", "tracking.system_metrics=false",
        "trainer.precision=32-true",  # no bf16 kernel set-up before the first checkpoint
    ]  # fmt: skip
    paths = [str(p) for p in sorted(root.rglob("*.jpg"))]
    key = files_key(paths, stored_size(LITE), LITE.interpolation)
    (cache / "images").mkdir(parents=True)
    held = FileLock(str(cache / "images" / f"{key}.u8.lock"))
    if when == "image cache":
        held.acquire()  # the cell waits inside build_image_cache, its run open
    reached = "mlflow_run.json" if when == "image cache" else "checkpoints/*.ckpt"
    try:
        process, output = signalled(command, tmp_path, reached, signal.SIGTERM, settle_s=1)
    finally:
        if held.is_locked:
            held.release()
    assert process.returncode == 143, output[-3000:]
    assert "terminated by signal 15 (SIGTERM)" in output
    assert "Traceback" not in output
    runs = runs_in(tmp_path / "mlflow.db")
    assert list(runs.status) == ["FAILED"]
    assert runs["tags.error"].iloc[0] == "Terminated: terminated by signal 15 (SIGTERM)"
    (outcome,) = tmp_path.rglob("outcome.json")
    assert json.loads(outcome.read_text())["status"] == "failed"


@pytest.fixture
def sigterm_handled(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """benchmark.runtime.interrupt's SIGTERM handler in this process, for the test only."""
    monkeypatch.setattr(interrupt, "_received", None)
    previous = signal.getsignal(signal.SIGTERM)
    interrupt.install()
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_sigterm_whose_exception_python_drops_still_stops_the_next_cell(
    make_cfg, sigterm_handled
):
    """Seen in the results grid: SIGTERM came while a DataLoader forked its workers; Python ran
    the handler inside its at-fork hook and dropped the exception it raised, and the sweep went
    on. The signal is remembered: the cell stops at its next batch, its run FAILED."""
    armed = [True]

    def at_fork() -> None:  # the at-fork hook of a fork that a loader makes
        if armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here, and its exception is dropped

    os.register_at_fork(after_in_parent=at_fork)
    with interrupt.cell():  # the handler raises, inside the hook
        child = os.fork()
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)
    assert not armed and interrupt.received() == signal.SIGTERM  # the raise was lost
    cfg = make_cfg("strategy=finetune", *TINY)
    with pytest.raises(interrupt.Terminated, match=r"signal 15 \(SIGTERM\)"):
        run_cell(cfg)
    runs = runs_in(Path(cfg.tracking.uri.removeprefix("sqlite:///")))
    assert list(runs.status) == ["FAILED"]


def test_a_sigterm_inside_mlflows_store_is_not_turned_into_its_error(
    make_cfg, sigterm_handled, monkeypatch
):
    """Seen in CI: SIGTERM landed while the cell wrote its validation metrics; MLflow's SQL store
    wraps every Exception of its session in an MlflowException, and the cell ended exit 1 with a
    traceback. Terminated is a BaseException: it comes through as itself, the run FAILED."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    real, armed = SqlAlchemyStore.log_batch, [True]

    def log_batch(self, run_id, metrics, params, tags):
        if armed and any(m.key == "val_acc" for m in metrics):
            armed.clear()
            with self.ManagedSessionMaker(read_only=False):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)  # the handler raises here, inside MLflow's session
        return real(self, run_id, metrics, params, tags)

    monkeypatch.setattr(SqlAlchemyStore, "log_batch", log_batch)
    cfg = make_cfg("strategy=finetune", *TINY)
    with pytest.raises(interrupt.Terminated, match=r"signal 15 \(SIGTERM\)"), interrupt.cell():
        run_cell(cfg)
    assert not armed
    runs = runs_in(Path(cfg.tracking.uri.removeprefix("sqlite:///")))
    assert list(runs.status) == ["FAILED"]
    assert runs["tags.error"].iloc[0] == "Terminated: terminated by signal 15 (SIGTERM)"


def test_a_sigterm_between_two_cells_ends_the_next_one_before_its_run_opens(sigterm_handled):
    """Between cells the signal lands in Hydra's own code: raised there it was a traceback and
    exit 1. Now it is only remembered there; inside a cell it raises where it lands."""
    os.kill(os.getpid(), signal.SIGTERM)  # between cells: no exception here
    time.sleep(0.1)
    assert interrupt.received() == signal.SIGTERM
    with pytest.raises(interrupt.Terminated, match="signal 15"):
        interrupt.check()  # what the next cell does first
    with pytest.raises(interrupt.Terminated, match="signal 15"), interrupt.cell():
        os.kill(os.getpid(), signal.SIGTERM)  # inside a cell: raised where it lands
        time.sleep(5)


def test_a_second_signal_while_a_cell_records_its_end_waits_for_the_record(
    sigterm_handled, monkeypatch
):
    """Seen on SLURM: the requeue's SIGTERM came while the cell was ending its run FAILED after
    submitit's exit; raised there, it left the run active, and MLflow's exit hook ended it
    FINISHED without scores. Held, it is remembered and raised by the next check; and what
    ended the cell is recorded as the requeue."""
    monkeypatch.setattr(interrupt, "_requeued", None)
    with interrupt.cell():
        with interrupt.held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs here: remembered, not raised
            recorded = True
        assert recorded and interrupt.received() == signal.SIGTERM
        with pytest.raises(interrupt.Terminated, match="signal 15"):
            interrupt.check()
    assert interrupt.as_ended(SystemExit(-1)).__class__ is SystemExit  # no requeue: as it is
    interrupt.requeue("preempted: ...; the job is requeued (requeue 1)")
    for how in (SystemExit(-1), interrupt.Terminated("terminated by signal 15 (SIGTERM)")):
        ended = interrupt.as_ended(how)
        assert isinstance(ended, interrupt.Requeued) and "requeued (requeue 1)" in str(ended)
    assert isinstance(interrupt.as_ended(ValueError("x")), ValueError)


@pytest.mark.e2e
@pytest.mark.parametrize("when", ["fit", "tune"])
def test_ctrl_c_fails_the_cell_says_what_ran_and_ends_the_sweep_killed(tmp_path, shared_data, when):
    """Ctrl-C was Python's KeyboardInterrupt, which Lightning turns into `sys.exit(1)`: a tuned
    cell left no outcome, a sweep no summary and its parent run RUNNING. Now it is handled as
    SIGTERM is: the cell FAILED with its outcome, the sweep stops before its next cell, its
    parent run KILLED with the counts, one line to say it, exit 130."""
    root = folder_of(tmp_path, shared_data)
    sweep = ["strategy=finetune,freeze"] if when == "fit" else ["tune=fair", "strategy=finetune"]
    command = [
        sys.executable, "-m", "benchmark", "-m", *sweep, "dataset=imagefolder",
        f"dataset.root={root}", f"paths.cache_dir={tmp_path / 'cache'}",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "data.batch_size=2",
        "trainer.max_epochs=200", "tracking.system_metrics=false", "trainer.precision=32-true",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    reached = "checkpoints/*.ckpt" if when == "fit" else "optuna.db"
    # SIGINT: what Ctrl-C sends to the foreground process
    process, output = signalled(command, tmp_path, reached, signal.SIGINT, settle_s=2)
    assert process.returncode == 130, output[-3000:]
    assert "interrupted by Ctrl-C (signal 2, SIGINT); its run is FAILED" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    cells, sweeps = runs_in(tmp_path / "mlflow.db"), runs_in(tmp_path / "mlflow.db", "sweep")
    assert list(cells.status) == ["FAILED"]
    assert cells["tags.error"].iloc[0] == "Terminated: interrupted by Ctrl-C (signal 2, SIGINT)"
    (outcome,) = tmp_path.rglob("outcome.json")
    assert json.loads(outcome.read_text())["status"] == "failed"
    assert list(sweeps.status) == ["KILLED"]
    assert sweeps["metrics.cells_interrupted"].iloc[0] == 1
    total = 2 if when == "fit" else 1
    assert sweeps["metrics.cells_not_run"].iloc[0] == total - 1
    not_run = ", 1 not run" if when == "fit" else ""
    assert (
        f"Sweep stopped (interrupted by Ctrl-C (signal 2, SIGINT)) after 1 of {total} cells: "
        f"1 interrupted{not_run}. Relaunch the same command" in output
    ), output[-3000:]


def test_a_relaunch_says_that_the_tuning_restarts_from_its_first_trial(tmp_path, caplog):
    """An interrupted tuning is not resumed (TPE's next suggestion depends on its seeded state
    and every trial before: a resumed study would choose otherwise than an uninterrupted one);
    the relaunch says so, rather than silently tuning from scratch."""
    import optuna

    from benchmark.cell.tune import restart

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="cell", storage=storage, direction="maximize")
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=2)
    study.ask()  # the trial the interruption stopped: RUNNING
    with caplog.at_level("WARNING", logger="benchmark"):
        restart("cell", storage)
    assert "left 3 trial(s) (2 ended) in its study; the tuning restarts from its first trial" in (
        caplog.text
    )
    assert optuna.get_all_study_names(storage) == []
    caplog.clear()
    optuna.create_study(study_name="cell", storage=storage)  # a study with no trial yet
    with caplog.at_level("WARNING", logger="benchmark"):
        restart("cell", storage)
    assert "restarts" not in caplog.text and optuna.get_all_study_names(storage) == []
    storage.engine.dispose()


# ---------------------------------------------------------------- the tracking store


def test_another_applications_database_is_refused_untouched(make_cfg, tmp_path):
    other = tmp_path / "app.db"
    with closing(sqlite3.connect(other)) as db:
        db.execute("create table customers (id integer, name text)")
        db.commit()
    before = other.read_bytes()
    with pytest.raises(StoreError, match="another application's SQLite database"):
        run_cell(make_cfg(*TINY, f"tracking.uri=sqlite:///{other}"))
    assert other.read_bytes() == before  # not one MLflow table added


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files anyway")
def test_a_read_only_store_is_one_line(make_cfg, tmp_path):
    run_cell(make_cfg("strategy=linear_probe", *TINY))
    (tmp_path / "mlflow.db").chmod(0o444)
    with pytest.raises(StoreError, match="is read-only"):
        run_cell(make_cfg("strategy=linear_probe", *TINY, "rerun=true"))


def test_a_read_only_store_is_refused_by_its_permissions(tmp_path, monkeypatch):
    file = tmp_path / "mlflow.db"
    store.experiment_id(f"sqlite:///{file}", "benchmark")  # a real MLflow store
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != file)  # as for a user
    with pytest.raises(StoreError, match=f"the tracking store {file} is read-only"):
        store.check_sqlite(f"sqlite:///{file}")
