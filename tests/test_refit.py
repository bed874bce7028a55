"""benchmark.tools.refit: a FINISHED run's cell fitted again on train + validation (the
measurement behind keeping the checkpoint chosen on validation), tested on the run's test split."""

from __future__ import annotations

import json
import shutil

import pytest

from benchmark.cell import run as cell
from benchmark.cell.run import run_cell
from benchmark.tools import refit
from tests.conftest import FEW


@pytest.fixture
def finished(make_cfg, ants_and_bees):
    whole_test = [o for o in FEW if not o.startswith("trainer.limit_test")]
    cfg = make_cfg("dataset=imagefolder", f"dataset.root={ants_and_bees}", *whole_test)
    return cfg, run_cell(cfg)


def test_refit_fits_on_train_and_validation_and_tests_on_the_runs_test_split(
    finished, monkeypatch, tmp_path, capsys
):
    cfg, result = finished
    splits = []
    image_data = cell.image_data

    def recorded(spec, frame, *args, **kwargs):
        splits.append(frame.split.value_counts().to_dict())
        return image_data(spec, frame, *args, **kwargs)

    monkeypatch.setattr(cell, "image_data", recorded)
    out = tmp_path / "refit.json"
    argv = ["--tracking-uri", cfg.tracking.uri, "--run-id", result.run_id, "--json", str(out)]
    assert refit.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["checkpoint_test_acc"] == pytest.approx(result.test_acc)
    assert 0 <= figures["refit_all_epochs_test_acc"] <= 1
    assert figures["max_epochs"] == 2 and figures["n_test"] == 6
    assert splits and all("val" not in s and s["train"] == 24 and s["test"] == 6 for s in splits)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures


def test_refit_refuses_a_run_whose_data_changed(finished, ants_and_bees, capsys):
    cfg, result = finished
    shutil.copy(next((ants_and_bees / "ants").glob("*.jpg")), ants_and_bees / "ants" / "new.jpg")
    argv = ["--tracking-uri", cfg.tracking.uri, "--run-id", result.run_id]
    assert refit.main(argv) == 2
    assert "data digest differs" in capsys.readouterr().out
