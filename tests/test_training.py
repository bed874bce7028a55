"""One cell run in-process on real images: reproducibility and what a crash leaves behind."""

from __future__ import annotations

import mlflow
import pytest
from lightning.pytorch.callbacks import Callback

from benchmark.cell.run import run_cell
from tests.conftest import TINY


def history(run_id: str, key: str) -> list[float]:
    return [m.value for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


def test_same_seed_gives_the_same_metrics(make_cfg):
    cfg = make_cfg("strategy=freeze", *TINY, "trainer.limit_train_batches=3", "rerun=true")
    first, second = run_cell(cfg), run_cell(cfg)
    assert first.run_id != second.run_id
    assert (first.test_acc, first.test_loss) == (second.test_acc, second.test_loss)
    for key in ("train_loss", "val_loss", "val_acc"):
        assert history(first.run_id, key) == history(second.run_id, key), key


class Explode(Callback):
    def on_train_batch_start(self, trainer, module, batch, index) -> None:
        raise RuntimeError("exploded on purpose")


def test_a_crash_inside_training_ends_the_run_failed_with_the_error(make_cfg):
    cfg = make_cfg(*TINY)
    with pytest.raises(RuntimeError, match="exploded on purpose"):
        run_cell(cfg, callbacks=[Explode()])
    mlflow.set_tracking_uri(cfg.tracking.uri)
    (run,) = mlflow.search_runs(experiment_names=["benchmark"], output_format="list")
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: exploded on purpose"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert "error.txt" in artifacts
