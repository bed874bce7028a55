"""Weak spots a new user hits on day one (issue 23): each ends in one clear line, or is handled."""

from __future__ import annotations

import base64
import http.server
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

from benchmark.cell.run import run_cell
from benchmark.config.rules import ConfigError
from benchmark.config.schema import DatasetConfig
from benchmark.data import DatasetError, build_manifest, scan_class_folders
from benchmark.data.cache import file_fingerprint
from benchmark.data.sources import PREPARERS
from benchmark.report.__main__ import main as report
from benchmark.tools.rank import main as rank
from benchmark.tracking.server import TrackingUnreachable, check_reachable
from tests.conftest import TINY
from tests.test_faults import csv_dataset, folder_of, photos
from tests.test_report import log_run, new_store


def test_macos_archive_debris_beside_the_class_folders_is_skipped(tmp_path, shared_data):
    root = folder_of(tmp_path, shared_data, count=3)
    debris = root / "__MACOSX"
    for name in ("ants", "bees"):
        (debris / name).mkdir(parents=True)
        (debris / name / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    scan = scan_class_folders(root)
    assert sorted(scan.images.label.unique()) == ["ants", "bees"]
    reason = scan.skipped.reason[scan.skipped.path == str(debris)]
    assert len(reason) == 1 and "macOS" in reason.item()


@pytest.mark.parametrize("separator", [";", "\t", ","])
def test_a_semicolon_csv_with_a_capitalised_header_is_read(tmp_path, shared_data, separator):
    rows = [(p, "ant") for p in photos(shared_data, "ants", 3)]
    rows += [(p, "bee") for p in photos(shared_data, "bees", 3)]
    text = f"Path{separator}Label\n" + "".join(f"{p}{separator}{c}\n" for p, c in rows)
    source = PREPARERS["csv"](DatasetConfig(name="csv", file=csv_dataset(tmp_path, text)), tmp_path)
    assert sorted(source.scan.images.label) == ["ant"] * 3 + ["bee"] * 3


def test_a_csv_without_a_label_column_names_the_separator_it_read(tmp_path):
    cfg = DatasetConfig(name="csv", file=csv_dataset(tmp_path, "file;class\na.jpg;ant\n"))
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['label', 'path'\] .*';'"):
        build_manifest(cfg, tmp_path, 0)


@pytest.mark.parametrize(
    "override", ["seed=-1", "seed=99999999999", "dataset.split_seed=-3", "seed=4294967296"]
)
def test_a_seed_outside_numpys_range_is_refused_before_a_run_opens(make_cfg, tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.*must be an integer in \\[0, 4294967295\\]"):
        run_cell(make_cfg(*TINY, override, store=False))
    assert not (tmp_path / "mlflow.db").exists()  # no run, not even a store


def test_the_largest_seed_numpy_takes_is_allowed(make_cfg):
    from benchmark.config.rules import problems

    assert problems(make_cfg(*TINY, "seed=4294967295", store=False)) == []


def test_report_out_that_is_a_file_or_read_only_is_one_line(
    tmp_path, empty_store, capsys, monkeypatch
):
    client, store, experiment = new_store(tmp_path, empty_store)
    log_run(client, experiment, ("hymenoptera", "rgb", "finetune", 0), "FINISHED", 0.9, 1)
    file = tmp_path / "report.txt"
    file.write_text("not a folder")
    for out in (file, file / "sub"):
        assert report(["--tracking-uri", store, "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"error: --out {out}" in err and len(err.strip().splitlines()) == 1
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked)  # as for a user
    assert report(["--tracking-uri", store, "--out", str(locked)]) == 1
    assert f"error: --out {locked} is read-only" in capsys.readouterr().err


def test_report_warns_naming_the_runs_whose_confusion_matrix_was_deleted(
    tmp_path, empty_store, capsys
):
    client, uri, experiment = new_store(tmp_path, empty_store)
    kept = log_run(client, experiment, ("hymenoptera", "rgb", "finetune", 0), "FINISHED", 0.9, 1)
    gone = log_run(client, experiment, ("hymenoptera", "rgb", "freeze", 0), "FINISHED", 0.8, 2)
    shutil.rmtree(tmp_path / "artifacts" / gone)  # deleted from the store by hand
    assert report(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 finished run(s) have no confusion_matrix.json" in err
    assert gone in err and kept not in err and "freeze" in err


class SlowStart(Callback):
    """Keeps the first launch's run open long enough for the second to start."""

    def on_train_start(self, trainer, pl_module) -> None:
        time.sleep(6)


def _launch(spec) -> None:
    run_cell(spec, callbacks=[SlowStart()])


def test_the_same_cell_launched_twice_at_once_trains_once(make_cfg, caplog):
    spec = make_cfg(*TINY)
    first = multiprocessing.get_context("spawn").Process(target=_launch, args=(spec,))
    first.start()
    mlflow.set_tracking_uri(spec.tracking.uri)
    deadline = time.time() + 120
    while not mlflow.search_runs(experiment_names=["benchmark"], output_format="list"):
        assert time.time() < deadline and first.is_alive(), "the first launch opened no run"
        time.sleep(0.2)
    second = run_cell(spec)  # while the first one trains
    first.join(timeout=120)
    assert first.exitcode == 0
    runs = mlflow.search_runs(experiment_names=["benchmark"], output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]  # one training, not two
    assert second.skipped and second.run_id == runs[0].info.run_id
    assert "is already running in another process" in caplog.text


class BasicAuthServer(http.server.BaseHTTPRequestHandler):
    """As `mlflow server --app-name basic-auth`: /health answers anyone, the API a login."""

    def do_GET(self) -> None:
        login = "Basic " + base64.b64encode(b"alice:secret").decode()
        ok = self.path == "/health" or self.headers.get("Authorization") == login
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b'{"experiments": []}' if ok else b"You are not authenticated.")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def basic_auth_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BasicAuthServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_basic_auth_server_without_credentials_is_one_line(basic_auth_server, monkeypatch):
    for name in ("USERNAME", "PASSWORD", "TOKEN"):
        monkeypatch.delenv(f"MLFLOW_TRACKING_{name}", raising=False)
    unset = r"401.* are not set: set MLFLOW_TRACKING_USERNAME"
    with pytest.raises(TrackingUnreachable, match=unset):
        check_reachable(basic_auth_server)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    with pytest.raises(TrackingUnreachable, match="credentials were refused"):
        check_reachable(basic_auth_server)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    check_reachable(basic_auth_server)  # logged in: no error


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("backbone=resnet19", "Could not find 'backbone/resnet19'; choose one of: "),
        ("dataset.root={empty}", "has no class sub-folders"),
    ],
)
def test_rank_with_a_misspelt_backbone_or_an_empty_folder_is_one_line(
    tmp_path, shared_data, capsys, override, said
):
    (tmp_path / "empty").mkdir()
    overrides = [
        "dataset=imagefolder",
        f"dataset.root={tmp_path / 'empty'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"paths.data_root={shared_data}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        override.format(empty=tmp_path / "empty"),
    ]
    if "dataset.root" not in override:
        overrides[1] = f"dataset.root={folder_of(tmp_path, shared_data)}"
    assert rank(overrides) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and said in err and len(err.splitlines()) == 1


def test_too_few_images_prints_plain_counts(tmp_path, shared_data):
    root = folder_of(tmp_path, shared_data, count=2)
    with pytest.raises(DatasetError) as raised:
        build_manifest(DatasetConfig(name="imagefolder", root=str(root)), tmp_path, 0)
    assert "have too few images (ants: 2, bees: 2) for a test share of 0.2" in str(raised.value)
    assert "np." not in str(raised.value)


def test_an_unloadable_or_stale_feature_cache_is_rebuilt(make_cfg, tmp_path, shared_data, caplog):
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
    marker = features.with_suffix(".json")
    recorded = json.loads(marker.read_text())
    assert set(recorded["inputs"]) == {"backbone", "images", "transform"}
    # An object array whose size and SHA-256 are recorded as intact: np.load refuses it.
    np.save(features, np.array([{"not": "features"}], dtype=object), allow_pickle=True)
    marker.write_text(json.dumps({**recorded, **file_fingerprint(features)}))
    again = run_cell(make_cfg(*overrides, "rerun=true"))
    assert f"Feature cache {features} cannot be loaded" in caplog.text
    assert again.test_acc == first.test_acc
    # Intact, but built from other images (the marker says so): stale, rebuilt.
    caplog.clear()
    recorded = json.loads(marker.read_text())
    marker.write_text(json.dumps({**recorded, "inputs": {**recorded["inputs"], "images": "x"}}))
    third = run_cell(make_cfg(*overrides, "rerun=true"))
    assert f"Feature cache {features} was built from other inputs (images)" in caplog.text
    assert third.test_acc == first.test_acc
    assert json.loads(marker.read_text())["inputs"] == recorded["inputs"]


class HostCheckingServer(BasicAuthServer):
    """As MLflow 3 for a Host header not in --allowed-hosts."""

    def do_GET(self) -> None:
        ok = self.path == "/health"
        self.send_response(200 if ok else 403)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"Invalid Host header - possible DNS rebinding attack")


def test_a_host_not_in_allowed_hosts_is_one_line():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostCheckingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(TrackingUnreachable, match=r"HTTP 403: Invalid Host header.*--allowed"):
            check_reachable(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
