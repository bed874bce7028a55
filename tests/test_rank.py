"""python -m benchmark.tools.rank: transferability scores from frozen features, before any training,
and their agreement with the measured accuracies in the report."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from benchmark.tools.rank import knn_val_acc, leep, logme, nce
from benchmark.tools.rank import main as rank
from benchmark.tracking.identity import HARNESS_TAG, KIND_TAG, SCHEMA_TAG, SCHEMA_VERSION


def test_logme_and_knn_prefer_features_that_carry_the_label():
    rng = np.random.default_rng(0)
    targets = np.repeat([0, 1, 2], 40)
    noise = rng.normal(size=(120, 32))
    informative = noise * 0.3 + np.eye(3)[targets] @ rng.normal(size=(3, 32)) * 2
    assert logme(informative, targets) > logme(noise, targets)
    half = np.arange(120) % 2 == 0
    assert knn_val_acc(informative[half], targets[half], informative[~half], targets[~half]) > 0.9
    chance = knn_val_acc(noise[half], targets[half], noise[~half], targets[~half])
    assert chance < 0.6


def test_leep_and_nce_are_zero_for_a_perfect_source_and_minus_the_entropy_for_none():
    targets = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(5)[[3, 3, 0, 0, 4, 4]]  # ImageNet class 3 is always target 0, ...
    assert leep(perfect, targets) == pytest.approx(0.0)
    assert nce(perfect.argmax(axis=1), targets) == pytest.approx(0.0)
    uninformative = np.full((6, 5), 0.2)  # the same prediction for every image
    assert leep(uninformative, targets) == pytest.approx(np.log(1 / 3))
    assert nce(np.zeros(6, dtype=int), targets) == pytest.approx(np.log(1 / 3))


def test_the_rank_command_scores_each_backbone_and_logs_it(ants_and_bees, tmp_path, shared_data):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "dataset=imagefolder",
        f"dataset.root={ants_and_bees}",
        "backbone=efficientnet_lite0,efficientnet_lite1",
        f"tracking.uri={uri}",
        f"paths.data_root={shared_data}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "trainer.enable_progress_bar=false",
    ]
    assert rank(overrides) == 0
    runs = mlflow.search_runs(experiment_names=["benchmark"], filter_string="")
    assert sorted(runs["params.backbone"]) == ["efficientnet_lite0", "efficientnet_lite1"]
    assert set(runs[f"tags.{KIND_TAG}"]) == {"rank"} and set(runs.status) == {"FINISHED"}
    assert runs["metrics.knn_val_acc"].between(0, 1).all() and runs["metrics.logme"].notna().all()
    # The Lite models' ImageNet classifier is a Linear layer on the features: LEEP and NCE too.
    assert (runs["metrics.leep"] <= 0).all() and (runs["metrics.nce"] <= 0).all()
    assert (runs["metrics.feature_build_s"] > 0).all()
    assert rank([*overrides[:2], "backbone=efficientnet_lite0", *overrides[3:]]) == 0
    again = mlflow.search_runs(experiment_names=["benchmark"], order_by=["start_time DESC"])
    assert again["metrics.feature_build_s"].iloc[0] == 0.0  # the features the cells cache


@pytest.mark.foreign_runs
def test_the_report_sets_the_predicted_order_beside_the_measured_one(tmp_path):
    from benchmark.report.__main__ import main as report
    from tests.test_report import log_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("benchmark", (tmp_path / "artifacts").as_uri())
    backbones = {"efficientnet_lite0": 0.90, "efficientnet_lite1": 0.93, "efficientnet_lite2": 0.95}
    for order, (backbone, accuracy) in enumerate(backbones.items()):
        cell = ("hymenoptera", "rgb", "finetune", 0)
        log_run(client, experiment, cell, "FINISHED", accuracy, order, {"backbone": backbone})
        tags = {HARNESS_TAG: "benchmark", SCHEMA_TAG: SCHEMA_VERSION, KIND_TAG: "rank"}
        run = client.create_run(experiment, tags=tags)
        for key, value in (("dataset", "hymenoptera"), ("colour", "rgb"), ("backbone", backbone)):
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "logme", accuracy)  # the same order
        client.log_metric(run.info.run_id, "knn_val_acc", 1 - accuracy)  # the reverse
        client.set_terminated(run.info.run_id, "FINISHED")
    assert report(["--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Ranking before training" in markdown
    section = markdown.split("## Ranking before training")[1]
    row = next(line for line in section.splitlines() if line.startswith("| hymenoptera"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["hymenoptera", "rgb", "finetune", "3"]
    assert float(cells[4]) == 1.0 and float(cells[6]) == -1.0  # tau: LogME, then 5-NN
    assert "run(s) not made by the harness" not in markdown  # rank runs are the harness's


def test_the_imagenet_head_on_cached_features_gives_the_full_models_logits():
    import torch

    from benchmark.models.backbones import IMAGENET_CLASSES, create_backbone, imagenet_head

    images = torch.randn(2, 3, 224, 224)
    features = create_backbone("efficientnet_lite0").model.eval()(images)
    full = create_backbone("efficientnet_lite0", num_classes=IMAGENET_CLASSES).model.eval()
    with torch.inference_mode():
        torch.testing.assert_close(imagenet_head("efficientnet_lite0")(features), full(images))
