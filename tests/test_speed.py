"""The caches change what a cell costs, never what it computes: cached and uncached paths give
the same pixels, features, logits and metrics for the same seed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.cell.run import cell_features, image_data, run_cell
from benchmark.data import build_manifest
from benchmark.data.cache import build_image_cache
from benchmark.data.images import load_rgb
from benchmark.data.loading import build_transform
from benchmark.models.backbones import create_backbone
from tests.conftest import FEW


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def sample_photos(shared_data: Path) -> list[str]:
    """Portrait, landscape and a 59x80-pixel photo (enlarged by the resize)."""
    ants = sorted((shared_data / "hymenoptera_data/val/ants").glob("*.jpg"))[:4]
    tiny = next(
        p
        for p in sorted((shared_data / "dogs-vs-cats/train").glob("*.jpg"))
        if min(load_rgb(str(p)).size) < 100
    )
    return [str(p) for p in [*ants, tiny]]


def test_cached_images_give_the_same_evaluation_pixels(lite0, shared_data, tmp_path):
    paths = sample_photos(shared_data)
    cache, build_s = build_image_cache(paths, lite0.preprocess, tmp_path)
    assert build_s > 0 and len(cache) == len(paths)
    again, build_s = build_image_cache(list(reversed(paths)), lite0.preprocess, tmp_path)
    assert build_s == 0.0 and again.file == cache.file  # reused, whatever the order
    evaluation = build_transform(lite0.preprocess, grayscale=False, normalize=False)
    for path in paths:
        stored = cache[path]
        assert stored.shape == (3, 256, 256) and stored.dtype == torch.uint8
        assert torch.equal(evaluation(stored), evaluation(load_rgb(path)))
    gray = build_transform(lite0.preprocess, grayscale=True, normalize=False)
    difference = (gray(cache[paths[0]]).int() - gray(load_rgb(paths[0])).int()).abs()
    assert difference.float().mean() < 1.0  # grey after vs before the resize: rounding only


def test_a_changed_file_rebuilds_the_image_cache(lite0, shared_data, tmp_path):
    paths = [str(shutil.copy(p, tmp_path)) for p in sample_photos(shared_data)[:2]]
    first, _ = build_image_cache(paths, lite0.preprocess, tmp_path / "cache")
    os.utime(paths[0], ns=(1, 1))
    second, build_s = build_image_cache(paths, lite0.preprocess, tmp_path / "cache")
    assert build_s > 0 and second.file != first.file


def test_image_cache_survives_pickling_to_workers(lite0, shared_data, tmp_path):
    import pickle

    paths = sample_photos(shared_data)[:2]
    cache, _ = build_image_cache(paths, lite0.preprocess, tmp_path)
    cache[paths[0]]  # maps the file in this process
    copy = pickle.loads(pickle.dumps(cache))
    assert torch.equal(copy[paths[1]], cache[paths[1]])


def run(make_cfg, *overrides: str):
    result = run_cell(make_cfg(*overrides))
    mlflow.set_tracking_uri(result.tracking_uri)
    return result, mlflow.get_run(result.run_id).data


def test_freeze_on_cached_features_matches_freeze_on_images(make_cfg, ants_and_bees):
    # float32 throughout: the head on cached features trains in float32 whatever the cell's
    # precision, so this compares caching alone (bf16 against float32: the tests below).
    dataset = [
        "dataset=imagefolder",
        f"dataset.root={ants_and_bees}",
        "strategy=freeze",
        "trainer.precision=32-true",
        *FEW,
    ]
    _, images_run = run(make_cfg, *dataset, "speed.feature_cache=false")
    _, features_run = run(make_cfg, *dataset, "rerun=true")
    assert images_run.params["input"] == "images" and features_run.params["input"] == "features"
    assert features_run.metrics["feature_build_s"] > 0
    for metric in ("val_acc", "val_loss", "train_loss", "test_acc", "test_loss"):
        assert features_run.metrics[metric] == pytest.approx(
            images_run.metrics[metric], abs=1e-4
        ), metric
    # A second cell (another seed) reads the features back instead of extracting them.
    _, second = run(make_cfg, *dataset, "seed=1")
    assert second.metrics["feature_build_s"] == 0.0


def test_cached_features_are_the_backbone_outputs(make_cfg, ants_and_bees, lite0):
    cfg = make_cfg(
        "dataset=imagefolder",
        f"dataset.root={ants_and_bees}",
        "strategy=freeze",
        "trainer.precision=32-true",
        *FEW,
    )

    manifest = build_manifest(cfg.dataset, Path(cfg.paths.data_root), 0, Path(cfg.paths.cache_dir))
    data, _ = image_data(cfg, manifest.frame, lite0)
    features = cell_features(cfg, data, lite0, views=0)
    test = data.split("test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    lite0.model.eval()
    with torch.inference_mode():
        direct = lite0.model(data.normalize(images))
    assert features.test.shape == direct.shape == (len(test), 1280)
    torch.testing.assert_close(features.test, direct, atol=1e-4, rtol=1e-4)
    assert features.targets["test"].tolist() == test.targets


def test_augmented_views_are_cached_per_training_image(make_cfg, ants_and_bees):
    _, run_data = run(
        make_cfg,
        "dataset=imagefolder",
        f"dataset.root={ants_and_bees}",
        "strategy=freeze",
        "strategy.train_augmentation=true",
        "speed.augmented_views=2",
        *FEW,
        f"paths.cache_dir={ants_and_bees.parent / 'own-cache'}",
    )
    assert run_data.params["input"] == "features:2views"
    n_train = int(run_data.params["n_train"])
    (views_file,) = (ants_and_bees.parent / "own-cache" / "features").glob("*.views.npy")
    views = np.load(views_file)
    assert views.shape == (2, n_train, 1280)
    assert not np.allclose(views[0], views[1])  # two different random crops of each image


def test_linear_probe_chooses_c_on_validation_and_scores_the_test_split(make_cfg, ants_and_bees):
    result, run_data = run(
        make_cfg, "dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=linear_probe"
    )
    table = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/probe_c_grid.json")  # an MLflow
    grid = pd.DataFrame(table["data"], columns=table["columns"])  # table, not step metrics
    val = dict(zip(grid.C, grid.val_acc, strict=True))
    assert len(val) == 12
    chosen = float(run_data.params["probe_c_chosen"])
    best = max(val.values())
    assert val[chosen] == best
    assert chosen == min(c for c, a in val.items() if a == best)  # ties: stronger L2
    assert run_data.metrics["best_val_acc"] == best
    assert run_data.params["input"] == "features"
    # ImageNet features separate ants from bees: at least 4 of the 6 test images (one image is
    # 0.167; which 6 they are moved with protocol v2's group-aware split draw)
    assert result.test_acc >= 4 / 6


# bf16 autocast against float32 on the same real photos: bf16 keeps 8 bits of mantissa, so each
# feature vector moves by a few per cent of its norm (5 % measured for Lite0) but points the same
# way (cosine 0.9987 measured), and the predictions do not change.
FAST_FEATURES_REL_ERROR = 0.08
FAST_FEATURES_COSINE = 0.995


def features_at(make_cfg, root: Path, backbone, precision: str):
    cfg = make_cfg(
        "dataset=imagefolder",
        f"dataset.root={root}",
        "strategy=freeze",
        *FEW,
        f"trainer.precision={precision}",  # after FEW's float32
    )
    manifest = build_manifest(cfg.dataset, Path(cfg.paths.data_root), 0, Path(cfg.paths.cache_dir))
    data, _ = image_data(cfg, manifest.frame, backbone, channels_last=True)
    return cell_features(cfg, data, backbone, views=0, channels_last=True)


def test_fast_path_features_match_fp32_within_tolerance(make_cfg, ants_and_bees, lite0):
    fp32 = features_at(make_cfg, ants_and_bees, lite0, "32-true")
    fast = features_at(make_cfg, ants_and_bees, lite0, "bf16-mixed")
    assert fast.build_s > 0  # its own cache entry: the precision is part of the features' key
    for split in ("train", "val", "test"):
        a, b = getattr(fp32, split), getattr(fast, split)
        assert a.shape == b.shape and b.dtype == torch.float32
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # (views,) images, dims
        assert not torch.equal(a, b)  # bf16 did run
        relative = (b - a).norm(dim=1) / a.norm(dim=1)
        assert relative.max() < FAST_FEATURES_REL_ERROR, split
        cosine = torch.nn.functional.cosine_similarity(a, b)
        assert cosine.min() > FAST_FEATURES_COSINE, split


def test_fast_path_logits_match_fp32_within_tolerance(make_cfg, shared_data, lite0):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from benchmark.models.classifier import make_model

    cfg = make_cfg("strategy=finetune")
    evaluation = build_transform(lite0.preprocess, grayscale=False, normalize=True)
    x = torch.stack([evaluation(load_rgb(p)) for p in sample_photos(shared_data)])
    model = (
        make_model(cfg.strategy, cfg.head, cfg.optim, lite0, 2)
        .eval()
        .to(memory_format=torch.channels_last)
    )
    x = x.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        fp32 = model(x)
        with MixedPrecision("bf16-mixed", "cpu").forward_context():
            fast = model(x).float()
    assert not torch.equal(fp32, fast)
    torch.testing.assert_close(fast, fp32, atol=0.05, rtol=0.05)
    assert torch.equal(fast.argmax(1), fp32.argmax(1))


def test_progress_in_a_log_is_one_line_per_epoch_and_per_tenth_of_extraction(
    make_cfg, ants_and_bees, caplog, capsys
):
    import logging

    caplog.set_level(logging.INFO, logger="benchmark")
    shown = [o for o in FEW if o != "trainer.enable_progress_bar=false"]
    dataset = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze"]
    run_cell(make_cfg(*dataset, *shown, "trainer.enable_progress_bar=true"))
    lines = [r.getMessage() for r in caplog.records if r.name == "benchmark"]
    epochs = [m for m in lines if m.startswith("epoch: ")]
    assert [m.split(" (")[0] for m in epochs] == ["epoch: 1/2", "epoch: 2/2"]
    assert "left" in epochs[0] and "val_acc=" in epochs[0]
    extraction = [m for m in lines if m.startswith("extracting features: ")]
    assert (
        extraction
        and extraction[-1].startswith("extracting features: ")
        and "(100 %)" in (extraction[-1])
    )
    output = capsys.readouterr()
    assert "\r" not in output.err + output.out  # no progress bar in a log
