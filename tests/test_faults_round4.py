"""Issue 37: the eight broken cases of the fourth round of faults, each now handled: a launcher
with no worker, a relaunch reading an earlier launch's outcome, a class folder linked to another,
secrets in uploaded configs and in log lines, a truncated cache marker, links planted in a shared
cache, and two datasets in folders of one name."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from benchmark.cell import mlflow_run
from benchmark.data import DatasetError, scan_class_folders
from benchmark.data.cache import build_image_cache, files_key, stored_size
from benchmark.models.features import _cached
from benchmark.orchestration import launcher as launcher_module
from benchmark.orchestration.launcher import CellProcessLauncher, DevicePool
from benchmark.orchestration.sweep import CellOutcome, SweepSummary
from benchmark.runtime.files import FILE_MODE
from benchmark.runtime.progress import SweepProgress
from benchmark.tracking.identity import DATA_PARAM, OUTCOME_FILE, redact, redact_all
from benchmark.tracking.resume import cell_manifest
from tests.conftest import TINY
from tests.test_faults import LITE, photos
from tests.test_report import log_run, new_store, report_of

# ---------------------------------------------------------------- 1. workers=0


def test_no_cpu_worker_is_refused_in_one_line_not_waited_on_forever(monkeypatch, caplog):
    with pytest.raises(ValueError, match=r"^hydra\.launcher\.workers=0: .* 1 or more"):
        DevicePool([], workers=0)  # an empty pool: no cell would ever start
    monkeypatch.setattr(launcher_module, "setup_globals", lambda: None)
    monkeypatch.setattr(launcher_module, "configure_log", lambda *args: None)
    launcher = CellProcessLauncher(gpus=[], workers=0)
    launcher.config = OmegaConf.create({"hydra": {"hydra_logging": None, "verbose": False}})
    with pytest.raises(SystemExit) as stopped:
        launcher.launch([["seed=0"]], 0)
    assert stopped.value.code == 2
    (line,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert line.startswith("hydra.launcher.workers=0: ") and "hydra.launcher.workers=1" in line


# ---------------------------------------------------------------- 2. an earlier outcome.json


def test_a_relaunched_cell_killed_is_failed_not_read_as_the_earlier_launchs_outcome(
    tmp_path, monkeypatch
):
    folder = tmp_path / "multirun" / "0"
    folder.mkdir(parents=True)
    CellOutcome("seed=0", "finished", 0.9, "earlier-run").save(folder)  # the first launch's
    earlier = time.time() - 60
    os.utime(folder / OUTCOME_FILE, (earlier, earlier))
    killed = SimpleNamespace(returncode=-9, poll=lambda: -9)  # rerun=true, then SIGKILL
    monkeypatch.setattr(subprocess, "Popen", lambda *args, **kwargs: killed)
    launcher = CellProcessLauncher()
    cell = launcher._start(
        0, ["seed=0", "rerun=true"], None, folder, None, tmp_path, SweepProgress(1)
    )
    outcome = launcher._outcome(cell)
    assert outcome.status == "failed", outcome
    assert outcome.error.startswith("killed by signal 9 (SIGKILL); see ")
    # The earlier launch's word is replaced by what happened: a later reader sees the failure.
    assert CellOutcome.load(folder, "seed=0").status == "failed"
    # An outcome the cell wrote after it started is its own, and read.
    CellOutcome("seed=0 rerun=true", "finished", 0.8, "this-run").save(folder)
    assert launcher._outcome(cell).run_id == "this-run"


# ---------------------------------------------------------------- 3. a class folder linked


def test_a_class_folder_linked_to_another_is_refused_naming_both(ants_and_bees):
    (ants_and_bees / "bees2").symlink_to(ants_and_bees / "bees", target_is_directory=True)
    with pytest.raises(DatasetError) as refused:
        scan_class_folders(ants_and_bees)
    said = str(refused.value)
    assert f"class folders {ants_and_bees / 'bees'} and {ants_and_bees / 'bees2'}" in said
    assert "\n" not in said and "two labels" in said
    # Choosing one of them is fine: no image has two labels then.
    assert set(scan_class_folders(ants_and_bees, classes=["ants", "bees"]).images.label) == {
        "ants",
        "bees",
    }


def test_an_image_linked_into_a_second_class_folder_is_refused(ants_and_bees):
    bee = sorted((ants_and_bees / "bees").glob("*.jpg"))[0]
    (ants_and_bees / "ants" / "a_bee.jpg").symlink_to(bee)
    with pytest.raises(DatasetError, match=r"1 image.* in two class folders") as refused:
        scan_class_folders(ants_and_bees)
    assert str(bee) in str(refused.value)


# ---------------------------------------------------------------- 4. env_set secrets uploaded


# As Hydra writes a cell's .hydra/hydra.yaml for `+hydra.job.env_set.NAME=...` (twice).
HYDRA_YAML = """\
hydra:
  overrides:
    hydra:
    - +hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=hunter22pass
    - hydra.mode=RUN
    task:
    - tracking.uri=http://admin:S3CRETURI@host:5000
    - strategy=freeze
  job:
    name: __main__
    env_set:
      MLFLOW_TRACKING_PASSWORD: hunter22pass
      KAGGLE_KEY: 'k4ggle-key'
      OMP_NUM_THREADS: '1'
"""


def test_redact_masks_secret_variables_and_keeps_yaml_valid(monkeypatch):
    masked = redact(HYDRA_YAML)
    assert "hunter22pass" not in masked and "k4ggle-key" not in masked
    assert "S3CRETURI" not in masked
    said = yaml.safe_load(masked)["hydra"]
    assert said["job"]["env_set"] == {
        "MLFLOW_TRACKING_PASSWORD": "***",
        "KAGGLE_KEY": "***",
        "OMP_NUM_THREADS": "1",  # not a secret: kept
    }
    assert said["overrides"]["hydra"][0] == "+hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=***"
    assert said["overrides"]["task"][1] == "strategy=freeze"
    assert redact("cell_key: 0123abcd, AWS_SECRET_ACCESS_KEY=zz x") == (
        "cell_key: 0123abcd, AWS_SECRET_ACCESS_KEY=*** x"
    )
    assert redact_all({"a": {"MY_TOKEN": 5, "b": ["http://u:p@h"]}}) == {
        "a": {"MY_TOKEN": "***", "b": ["http://***@h"]}
    }
    monkeypatch.setenv("DATABRICKS_TOKEN", "dapi-0123456789")  # set in the environment
    assert redact("Authorization: Bearer dapi-0123456789.") == "Authorization: Bearer ***."


def test_a_secret_set_through_env_set_is_not_uploaded_in_hydra_yaml(make_cfg, ants_and_bees):
    spec = make_cfg("dataset=imagefolder", f"dataset.root={ants_and_bees}", *TINY)
    hydra_dir = spec.output_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "hydra.yaml").write_text(HYDRA_YAML)
    manifest = cell_manifest(spec)
    with mlflow_run.cell_run(spec, "key", manifest) as run:
        pass
    client = mlflow.MlflowClient(spec.tracking.uri)
    uploaded = Path(client.download_artifacts(run.info.run_id, "hydra/hydra.yaml"))
    text = uploaded.read_text()
    assert "hunter22pass" not in text and "k4ggle-key" not in text and "S3CRETURI" not in text
    assert yaml.safe_load(text)["hydra"]["job"]["env_set"]["MLFLOW_TRACKING_PASSWORD"] == "***"


# ---------------------------------------------------------------- 5. secrets in log lines


def test_the_harness_progress_lines_mask_a_uri_password_and_secret_variables(
    tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO)
    overrides = [
        "tracking.uri=http://admin:S3CRET@host:5000",
        "+hydra.job.env_set.MLFLOW_TRACKING_TOKEN=tok3n-value",
        "seed=0",
    ]
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: SimpleNamespace(returncode=0))
    folder = tmp_path / "0"
    folder.mkdir()
    CellProcessLauncher()._start(0, overrides, None, folder, None, tmp_path, SweepProgress(2))
    summary = SweepSummary()  # Hydra's basic launcher: "cell 1/2 starts ..." in this process
    summary.progress = SweepProgress(2)
    config = OmegaConf.create({"hydra": {"overrides": {"task": overrides}}})
    summary.on_job_start(config)
    logging.getLogger("benchmark").info("cell finished after 1 s: %s", " ".join(overrides))
    try:
        raise RuntimeError("connecting to http://admin:S3CRET@host:5000")
    except RuntimeError:
        logging.getLogger("benchmark").exception("failed")
    lines = caplog.text
    assert "#0 starts" in lines and "cell 1/2 starts" in lines and "cell finished" in lines
    assert "http://***@host:5000" in lines and "MLFLOW_TRACKING_TOKEN=***" in lines
    assert "S3CRET" not in lines and "tok3n-value" not in lines, lines
    # What a handler writes (the terminal, a cell's __main__.log) is the masked line.
    assert all("S3CRET" not in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- 6. a truncated done-marker


def test_a_truncated_image_cache_marker_is_a_miss_rebuilt_with_one_warning(
    tmp_path, shared_data, caplog
):
    paths = [str(p) for p in photos(shared_data, "ants", 3)]
    cache, _ = build_image_cache(paths, LITE, tmp_path, threads=1)
    pixels = cache[paths[1]].clone()
    marker = cache.file.with_suffix(".json")
    marker.write_text(marker.read_text()[:40])  # cut short: not JSON
    healed, built_s = build_image_cache(paths, LITE, tmp_path, threads=1)
    assert built_s > 0 and (healed[paths[1]] == pixels).all()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(cache.file) in warning and "done-marker" in warning and "rebuilding" in warning
    assert json.loads(marker.read_text())["paths"] == sorted(paths)  # healed for good
    assert build_image_cache(paths, LITE, tmp_path, threads=1)[1] == 0.0
    assert not [p for p in marker.parent.iterdir() if p.name.endswith(".partial")]


def test_a_truncated_feature_cache_marker_is_a_miss_rebuilt_with_one_warning(tmp_path, caplog):
    file = tmp_path / "features" / "key.npy"
    file.parent.mkdir()
    features = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    inputs = {"backbone": "w", "images": "i"}
    _cached(file, lambda: features, inputs)
    marker = file.with_suffix(".json")
    marker.write_text(marker.read_text()[:10])
    again, built_s = _cached(file, lambda: features, inputs)
    assert built_s > 0 and torch.equal(again, features)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(file) in warning and "done-marker" in warning
    assert _cached(file, lambda: features * 0, inputs)[1] == 0.0  # reused from then on


# ---------------------------------------------------------------- 7. links planted in the cache


def _victims(tmp_path: Path, count: int) -> list[Path]:
    victims = []
    for i in range(count):
        victim = tmp_path / f"victim{i}.txt"
        victim.write_text(f"precious {i}")
        victims.append(victim)
    return victims


def test_links_planted_in_the_image_cache_are_never_followed(tmp_path, shared_data):
    paths = [str(p) for p in photos(shared_data, "bees", 3)]
    folder = tmp_path / "cache" / "images"
    folder.mkdir(parents=True)
    key = files_key(paths, stored_size(LITE), LITE.interpolation)
    victims = _victims(tmp_path, 3)
    (folder / f"{key}.partial").symlink_to(victims[0])  # the old aside name
    (folder / f"{key}.u8").symlink_to(victims[1])
    cache, built_s = build_image_cache(paths, LITE, tmp_path / "cache", threads=1)
    assert built_s > 0 and len(cache) == 3
    assert [v.read_text() for v in victims] == ["precious 0", "precious 1", "precious 2"]
    assert not cache.file.is_symlink() and not cache.file.with_suffix(".json").is_symlink()
    assert cache.file.stat().st_size == 3 * 3 * stored_size(LITE) ** 2
    # Readable by the other users of a shared folder, as an ordinary open() would have made it.
    for built in (cache.file, cache.file.with_suffix(".json")):
        assert stat.S_IMODE(built.stat().st_mode) == FILE_MODE
    marker = cache.file.with_suffix(".json")  # a link for the done-marker: rebuilt over
    marker.unlink()
    marker.symlink_to(victims[2])
    _, built_s = build_image_cache(paths, LITE, tmp_path / "cache", threads=1)
    assert built_s > 0 and victims[2].read_text() == "precious 2" and not marker.is_symlink()


def test_links_planted_in_the_feature_cache_are_never_followed(tmp_path):
    file = tmp_path / "features" / "key.npy"
    file.parent.mkdir()
    victims = _victims(tmp_path, 2)
    file.with_suffix(".partial.npy").symlink_to(victims[0])  # np.save's old aside name
    file.symlink_to(victims[1])
    features = torch.ones(2, 5)
    _, built_s = _cached(file, lambda: features, {"backbone": "w"})
    assert built_s > 0 and [v.read_text() for v in victims] == ["precious 0", "precious 1"]
    assert not file.is_symlink() and np.array_equal(np.load(file), features.numpy())


# ---------------------------------------------------------------- 8. folders of one name


def test_two_datasets_in_folders_of_one_name_are_two_report_rows(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    cell = ("imagefolder", "rgb", "freeze")
    runs = [  # (folder, content, seed, accuracy): ants/bees in A, cats/dogs in B, both "photos"
        ("/data/projA/photos", "a" * 64, 0, 0.75),
        ("/data/projA/photos", "a" * 64, 1, 0.65),
        ("/data/projB/photos", "b" * 64, 0, 1.0),
    ]
    for order, (root, content, seed, accuracy) in enumerate(runs):
        extra = {"dataset.root": root, DATA_PARAM: content}
        log_run(client, experiment, (*cell, seed), "FINISHED", accuracy, order, extra)
    table, markdown = report_of(uri, tmp_path / "out")
    rows = table.set_index("dataset")
    assert set(rows.index) == {"imagefolder:photos@aaaaaaaa", "imagefolder:photos@bbbbbbbb"}
    assert rows.loc["imagefolder:photos@aaaaaaaa", "n"] == 2  # its two seeds pooled
    assert rows.loc["imagefolder:photos@bbbbbbbb", "n"] == 1  # not replacing seed 0
    assert "imagefolder:photos@bbbbbbbb" in markdown


def test_a_datasets_content_digest_is_the_same_for_every_seed(make_cfg, ants_and_bees):
    overrides = ("dataset=imagefolder", f"dataset.root={ants_and_bees}", *TINY)
    first, second = (cell_manifest(make_cfg(*overrides, f"seed={s}")) for s in (0, 1))
    assert first.sha256 != second.sha256  # validation is carved with the run's seed
    assert first.content_sha256 == second.content_sha256
