"""Issue 23: seven inputs an attacker found that broke the harness, each now handled."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from benchmark.data import DatasetError, build_manifest
from benchmark.data.cache import build_image_cache
from benchmark.data.scan import VERDICT_COLUMNS
from benchmark.orchestration.sweep import CellOutcome
from benchmark.report.__main__ import main as report
from benchmark.tracking import store
from benchmark.tracking.identity import (
    CELL_GROUP_TAG,
    CELL_KEY_TAG,
    DEBUG_TAG,
    HARNESS_TAG,
    KIND_TAG,
    OUTCOME_FILE,
    SCHEMA_TAG,
    SCHEMA_VERSION,
    redact,
)
from tests.conftest import TINY
from tests.test_e2e import runs_in
from tests.test_faults import LITE, cell_env, csv_dataset, folder_of, photos
from tests.test_report import log_run, new_store, report_of
from tests.test_tracking_server import TrackingServer

# ---------------------------------------------------------------- 1. a password in the URI


def test_redact_masks_the_userinfo_of_every_uri_in_a_text():
    assert redact("http://user:PASS@host:5000") == "http://***@host:5000"
    assert redact("a=https://TOKEN@h/x?q=b@c b") == "a=https://***@h/x?q=b@c b"
    assert redact("postgresql://u:p@ss@db:5432/m") == "postgresql://***@db:5432/m"
    assert redact("http://host:5000") == "http://host:5000"
    assert redact("sqlite:////data/a@b/mlflow.db") == "sqlite:////data/a@b/mlflow.db"


def test_reading_a_store_uri_leaves_the_environment_and_use_credentials_writes_it(monkeypatch):
    from benchmark.tracking.identity import store_uri, use_credentials

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # restored after the test, whatever it sets
        monkeypatch.delenv(name)
    given = "http://ann:p%40ss@host:5000"
    assert store_uri(given) == "http://host:5000"
    assert "MLFLOW_TRACKING_USERNAME" not in os.environ  # a reading writes nothing
    use_credentials(given)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "ann",
        "p@ss",
    )
    use_credentials("http://bob:other@host:5000")  # set already: left as they are
    use_credentials(None)
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ann"


@pytest.mark.e2e
def test_a_password_in_the_tracking_uri_is_never_logged_or_stored(tmp_path, shared_data, tmp_store):
    """A cell on a tracking server named as http://user:PASS@host:port: the server is used, and
    PASS is in no param, tag, artifact or line of output."""
    root = folder_of(tmp_path, shared_data, count=4)
    server = TrackingServer(f"sqlite:///{tmp_store}", tmp_path / "artifacts", tmp_path / "log")
    server.start()
    try:
        uri = server.uri.replace("http://", "http://user:S3CRET@")
        command = [
            *(sys.executable, "-m", "benchmark"),
            *("dataset=imagefolder", f"dataset.root={root}", "strategy=freeze", *TINY),
            f"tracking.uri={uri}",
            "tracking.log_model=false",
            "tracking.system_metrics=false",
        ]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=cell_env())
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        masked = server.uri.replace("http://", "http://***@")
        assert f"in {server.uri}" in done.stdout and "S3CRET" not in done.stdout + done.stderr
        (run_id,) = runs_in(tmp_store).run_id
        client = mlflow.MlflowClient(server.uri)
        run = client.get_run(run_id)
        assert run.data.params["tracking.uri"] == masked
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if "S3CRET" in v]
        hydra = [a.path for a in client.list_artifacts(run_id, "hydra")]
        assert {"hydra/config.yaml", "hydra/hydra.yaml", "hydra/overrides.yaml"} <= set(hydra)
        texts = {
            artifact: Path(client.download_artifacts(run_id, artifact, str(tmp_path))).read_text()
            for artifact in ("config.yaml", *hydra)
        }
        assert not [artifact for artifact, text in texts.items() if "S3CRET" in text]
        assert f"tracking.uri={masked}" in texts["hydra/overrides.yaml"]
    finally:
        server.stop()


# ---------------------------------------------------------------- 2. a thin image


def test_a_thin_strip_is_skipped_with_its_reason_not_blown_up(tmp_path, shared_data):
    """A 1 x 12000 PNG (a few hundred bytes) would be resized to 256 x 3,072,000 px."""
    from benchmark.config.schema import DatasetConfig

    root = folder_of(tmp_path, shared_data)
    Image.new("RGB", (1, 12000)).save(root / "ants" / "strip.png")
    Image.new("RGB", (600, 150)).save(root / "bees" / "panorama.png")  # 4:1 is kept
    cache = tmp_path / "cache"
    (cache).mkdir()
    # A verdict remembered by the older rules (strip.png decodes: usable) is not trusted.
    stat = (root / "ants" / "strip.png").stat()
    old = [(str(root / "ants" / "strip.png"), stat.st_size, stat.st_mtime_ns, "", "0" * 64)]
    pd.DataFrame(old, columns=VERDICT_COLUMNS).to_csv(cache / "verified_files.csv", index=False)
    manifest = build_manifest(DatasetConfig(name="imagefolder", root=str(root)), tmp_path, 0, cache)
    reasons = dict(
        zip(manifest.skipped.path.map(os.path.basename), manifest.skipped.reason, strict=True)
    )
    assert reasons["strip.png"].startswith("extreme aspect ratio (1x12000 px, more than 20:1)")
    assert "panorama.png" not in reasons and len(manifest.frame) == 13


# ---------------------------------------------------------------- 3. a damaged outcome file


@pytest.mark.parametrize("content", ["", '{"cell": "a", "stat', "[1, 2]", '{"what": 1}'])
def test_a_damaged_outcome_file_is_named_and_stops_nothing(tmp_path, tmp_store, caplog, content):
    """A run left RUNNING by a dead process, its folder's outcome.json empty or damaged: the
    stale-run rule that every cell and the report run first ends it FAILED, with a warning
    naming the file; the launchers count the cell as failed."""
    uri = f"sqlite:///{tmp_store}"
    experiment = store.experiment_id(uri, "benchmark")
    folder = tmp_path / "cell"
    folder.mkdir()
    (folder / OUTCOME_FILE).write_text(content)
    client = mlflow.MlflowClient(uri)
    tags = {
        **mlflow_run_tags(),
        "hydra_output_dir": str(folder),
        store.PID_STARTED_TAG: "0",  # this pid, started at another time: its process is gone
    }
    run = client.create_run(experiment, tags=tags)
    assert store.finished_run(uri, "benchmark", "k") is None  # raised JSONDecodeError before
    ended = client.get_run(run.info.run_id)
    assert ended.info.status == "FAILED" and ended.data.tags["error"].startswith("killed:")
    assert f"damaged outcome file {folder / OUTCOME_FILE}" in caplog.text
    outcome = CellOutcome.load(folder, "a")
    assert outcome.status == "failed" and str(folder / OUTCOME_FILE) in outcome.error


def mlflow_run_tags() -> dict[str, str]:
    return {
        HARNESS_TAG: "benchmark",
        KIND_TAG: "cell",
        CELL_KEY_TAG: "k",
        **store.heartbeat_tags(),
    }


# ---------------------------------------------------------------- 4. no cell finished yet

CELL_TAGS = {HARNESS_TAG: "benchmark", SCHEMA_TAG: SCHEMA_VERSION, KIND_TAG: "cell"}


@pytest.mark.foreign_runs
def test_the_report_shows_failed_and_running_cells_before_any_finished(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    log_run(client, experiment, ("hymenoptera", "rgb", "freeze", 0), "FAILED", None, 1)
    log_run(client, experiment, ("hymenoptera", "rgb", "finetune", 0), "RUNNING", None, 2)
    client.create_run(experiment, tags={**CELL_TAGS, CELL_GROUP_TAG: "g", DEBUG_TAG: "false"})
    table, markdown = report_of(uri, tmp_path / "out")  # TypeError in column_names before
    assert re.search(r"\|\s*hymenoptera\s*\|\s*rgb\s*\|\s*running\s*\|\s*failed\s*\|", markdown)
    assert table.test_acc_mean.isna().all() and len(table) == 2
    assert "1 cell run(s) just starting (no params logged yet)" in markdown


@pytest.mark.foreign_runs
def test_a_sweeps_first_cell_before_its_params_is_one_line_not_an_error(
    tmp_path, empty_store, capsys
):
    client, uri, experiment = new_store(tmp_path, empty_store)
    client.create_run(experiment, tags={**CELL_TAGS, CELL_GROUP_TAG: "g", DEBUG_TAG: "false"})
    assert report(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    said = capsys.readouterr()
    assert "nothing to report yet: 1 cell run(s) starting" in said.out, said.err


# ---------------------------------------------------------------- 7. labels that differ by spaces


def test_csv_labels_differing_only_by_spaces_are_one_class_and_said(tmp_path, shared_data, caplog):
    from benchmark.config.schema import DatasetConfig

    ants, bees = photos(shared_data, "ants", 6), photos(shared_data, "bees", 6)
    rows = [(str(p), "ants" if i % 2 else "ants ") for i, p in enumerate(ants)]
    rows += [(str(p), "bees") for p in bees]
    cfg = DatasetConfig(name="csv", file=csv_dataset(tmp_path, rows))
    manifest = build_manifest(cfg, tmp_path, 0)
    assert manifest.classes == ["ants", "bees"]
    (said,) = [r.getMessage() for r in caplog.records if "spaces around their label" in r.message]
    assert "3 row(s)" in said and "'ants '" in said and "\n" not in said


# ---------------------------------------------------------------- 6. Markdown in a folder's name


@pytest.mark.foreign_runs
def test_a_pipe_or_html_in_a_dataset_name_stays_text_in_report_md(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    for order, root in enumerate(["/data/ants|bees", "/data/<img src=x onerror=alert(1)>"]):
        cell = ("imagefolder", "rgb", "freeze", 0)
        log_run(client, experiment, cell, "FINISHED", 0.8, order, {"dataset.root": root})
    _, markdown = report_of(uri, tmp_path / "out")
    accuracy = markdown.split("## ")[0].splitlines()  # the accuracy table
    table = [line for line in accuracy if line.startswith("| imagefolder")]
    header = next(line for line in accuracy if line.startswith("| dataset"))
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in (header, *table)]
    assert len(table) == 2 and len(set(cells)) == 1  # no row split by the name's `|`
    assert r"imagefolder:ants\|bees" in markdown
    assert "<img" not in markdown and "&lt;img src=x onerror=alert(1)&gt;" in markdown


# ---------------------------------------------------------------- 5. a full disk


def test_a_full_disk_for_the_image_cache_is_one_line_not_a_bus_error(
    tmp_path, shared_data, monkeypatch
):
    paths = [str(p) for p in photos(shared_data, "ants", 3)]
    folder = tmp_path / "images"
    free = shutil.disk_usage  # the cache folder has 1 kB free
    monkeypatch.setattr(shutil, "disk_usage", lambda p: free(p)._replace(free=1000))
    with pytest.raises(DatasetError, match=f"^no space left on device at {folder}: .* GB"):
        build_image_cache(paths, LITE, tmp_path, threads=1)
    assert not list(folder.glob("*.partial"))
    monkeypatch.undo()  # the space looked free, then the disk filled while reserving it

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DatasetError, match=f"^no space left on device at {folder}: "):
        build_image_cache(paths, LITE, tmp_path, threads=1)
    assert not list(folder.glob("*.partial"))
    monkeypatch.undo()
    cache, _ = build_image_cache(paths, LITE, tmp_path, threads=1)  # space again: it builds
    assert len(cache) == 3
