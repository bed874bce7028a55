"""protocol=study: the study's recipe on our backbone, its number named for what it is."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from benchmark.cell.run import run_cell
from benchmark.config.rules import ConfigError
from benchmark.tracking.identity import run_params
from tests.conftest import TINY


def test_study_protocol_composes_the_studys_recipe(make_cfg):
    cfg = make_cfg("protocol=study", "strategy=freeze")
    assert (cfg.protocol.name, cfg.protocol.selection) == ("study", "max_eval")
    assert cfg.optim.name == "sgd_step" and cfg.optim.step_size == 7 and cfg.optim.gamma == 0.1
    assert (cfg.strategy.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.001, 0.9, 0.0)
    assert (cfg.trainer["max_epochs"], cfg.data.batch_size, cfg.dataset.val_fraction) == (15, 4, 0)
    # the study's freeze: BatchNorm in train mode, trained on augmented images
    assert cfg.strategy.bn == "train" and cfg.strategy.train_augmentation
    assert cfg.augment.name == "standard" and cfg.augment.transforms
    assert run_params(cfg)["protocol"] == "study"
    # The default protocol is ours, and a command line still wins over the preset.
    assert make_cfg().protocol.selection == "held_out"
    assert make_cfg("protocol=study", "trainer.max_epochs=3").trainer["max_epochs"] == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("strategy=linear_probe", "protocol=study has no linear probe"),
        ("dataset.val_fraction=0.2", "dataset.val_fraction=0.2 must be 0"),
    ],
)
def test_study_protocol_refuses_what_the_study_did_not_do(make_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        run_cell(make_cfg("protocol=study", override))


@pytest.fixture
def small_folder(tmp_path: Path, shared_data: Path) -> Path:
    """20 ants and 20 bees of the official train/, 6 of each of val/ as the evaluation split."""
    root = tmp_path / "small"
    for split, count in (("train", 20), ("val", 6)):
        for label in ("ants", "bees"):
            target = root / ("test" if split == "val" else "train") / label
            target.mkdir(parents=True)
            photos = sorted((shared_data / "hymenoptera_data" / split / label).glob("*.jpg"))
            for photo in photos[:count]:
                shutil.copy(photo, target / photo.name)
    return root


def test_study_protocol_reports_the_max_over_epochs_of_the_evaluation_split(make_cfg, small_folder):
    tiny = [o for o in TINY if not o.startswith(("trainer.max_epochs", "trainer.limit_"))]
    cfg = make_cfg(
        "protocol=study",
        "strategy=freeze",
        "dataset=imagefolder",
        f"dataset.root={small_folder}",
        *tiny,
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=2",
    )
    summary = run_cell(cfg)
    assert summary.score_name == "max_val_acc" and summary.test_acc is None
    assert "max_val_acc=" in summary.line() and "test_acc" not in summary.line()
    client = mlflow.MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    metrics = run.data.metrics
    assert "test_acc" not in metrics  # never passed off as a held-out score
    history = [m.value for m in client.get_metric_history(run.info.run_id, "val_acc")]
    assert len(history) == 3 and metrics["max_val_acc"] == pytest.approx(max(history))
    assert run.data.params["protocol"] == "study"
    # No validation split was carved: all 40 training images trained, and the 12 evaluation
    # images were what each epoch's validation read.
    confusion = client.download_artifacts(run.info.run_id, "confusion_matrix.json")
    import json

    matrix = json.loads(Path(confusion).read_text())["matrix"]
    assert sum(map(sum, matrix)) == 12
