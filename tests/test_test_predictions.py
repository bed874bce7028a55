"""Every run logs its test images' predictions (`test_predictions.json`: path relative to the
dataset's root, true and predicted class), for the report's bootstrap over test images: the
table covers the whole test split and agrees with the run's test accuracy."""

from __future__ import annotations

import mlflow
import pytest

from benchmark.cell.run import run_cell
from tests.conftest import TINY

WHOLE_TEST = [o for o in TINY if not o.startswith("trainer.limit_test")]


@pytest.mark.parametrize("strategy", ["finetune", "linear_probe"])  # Lightning, scikit-learn
def test_a_run_logs_each_test_images_prediction(make_cfg, ants_and_bees, strategy):
    cfg = make_cfg(
        "dataset=imagefolder", f"dataset.root={ants_and_bees}", f"strategy={strategy}", *WHOLE_TEST
    )
    result = run_cell(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    table = client.load_table(run.info.experiment_id, "test_predictions.json", [result.run_id])
    assert len(table) == int(run.data.params["n_test"])
    assert set(table.label) <= {"ants", "bees"} and set(table.predicted) <= {"ants", "bees"}
    assert not table.path.str.startswith("/").any()  # relative: the same on every machine
    assert (table.label == table.predicted).mean() == pytest.approx(run.data.metrics["test_acc"])


def test_a_partial_test_pass_logs_no_predictions(make_cfg, ants_and_bees):
    cfg = make_cfg("dataset=imagefolder", f"dataset.root={ants_and_bees}", *TINY)  # 1 batch
    result = run_cell(cfg)
    artifacts = mlflow.MlflowClient(cfg.tracking.uri).list_artifacts(result.run_id)
    assert "test_predictions.json" not in {a.path for a in artifacts}
