"""dataset=simpsons takes Kaggle's own test set (kaggle_simpson_testset/<character>_N.jpg, flat,
beside simpsons_dataset/) as its held-out test split when it is there, leaves out the characters
it has no images of (one line names them), and says so in the run's `test_split` param."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from benchmark.cell.mlflow_run import log_identity
from benchmark.config.schema import DatasetConfig
from benchmark.config.spec import CellSpec
from benchmark.data.manifest import build_manifest
from benchmark.report.tables import split_note

TRAINED = {"bart_simpson": 5, "homer_simpson": 5, "maggie_simpson": 5}
TESTED = {"bart_simpson": 2, "homer_simpson": 3}  # maggie has none, as in Kaggle's test set


@pytest.fixture
def simpsons_root(tmp_path: Path) -> Path:
    """A Simpsons-shaped tree of tiny JPEGs, each its own colour (so no two share content)."""
    root, shade = tmp_path / "data", 0
    for character, n in TRAINED.items():
        folder = root / "simpsons" / "simpsons_dataset" / character
        folder.mkdir(parents=True)
        for i in range(n):
            shade += 9
            Image.new("RGB", (16, 16), (shade, 40, 90)).save(folder / f"pic_{i:04d}.jpg")
    testset = root / "simpsons" / "kaggle_simpson_testset"
    testset.mkdir()
    for character, n in TESTED.items():
        for i in range(n):
            shade += 9
            Image.new("RGB", (16, 16), (20, shade, 200)).save(testset / f"{character}_{i}.jpg")
    return root


def manifest(root: Path, **options: object):
    cfg = DatasetConfig(name="simpsons", classes=None, download=False, val_fraction=0.2, **options)
    return build_manifest(cfg, root, seed=0)


def test_the_official_test_set_is_the_test_split_and_maggie_is_left_out(simpsons_root, caplog):
    with caplog.at_level(logging.WARNING, logger="benchmark"):
        built = manifest(simpsons_root)
    test = built.frame[built.frame.split == "test"]
    assert sorted(Path(p).name for p in test.path) == sorted(
        f"{c}_{i}.jpg" for c, n in TESTED.items() for i in range(n)
    )
    assert dict(test.label.value_counts()) == TESTED
    assert set(built.frame.label) == {"bart_simpson", "homer_simpson"}  # no maggie in any split
    official = built.frame.path.str.contains("kaggle_simpson_testset")
    assert (built.frame.split[official] == "test").all()
    assert (built.frame.split[~official] != "test").all()  # none carved from training
    assert built.test_split == "official"
    lines = [r.getMessage() for r in caplog.records if "maggie_simpson" in r.getMessage()]
    assert len(lines) == 1 and "left out of train, val and test" in lines[0]
    assert (built.skipped.path.str.contains("maggie_simpson")).sum() == TRAINED["maggie_simpson"]


def test_without_the_official_test_set_a_test_split_is_carved_as_before(simpsons_root):
    shutil.rmtree(simpsons_root / "simpsons" / "kaggle_simpson_testset")
    carved = manifest(simpsons_root)
    assert carved.test_split == "carved"
    assert set(carved.frame.label) == set(TRAINED)  # maggie kept
    assert (carved.frame.split == "test").sum() == 3  # 20 % of each character's 5


def test_official_test_false_ignores_it_and_gives_the_manifest_of_before(simpsons_root, caplog):
    opted_out = manifest(simpsons_root, official_test=False)
    shutil.rmtree(simpsons_root / "simpsons" / "kaggle_simpson_testset")
    assert opted_out.sha256 == manifest(simpsons_root).sha256  # the same images, the same key
    assert opted_out.test_split == "carved" and "maggie_simpson" in set(opted_out.frame.label)
    assert not [r for r in caplog.records if "maggie" in r.getMessage()]


def test_the_run_says_which_test_split_it_used(
    simpsons_root: Path, tmp_path: Path, empty_store: Path, make_cfg: Callable[..., CellSpec]
):
    spec = make_cfg("dataset=simpsons", "dataset.classes=null", data_root=simpsons_root)
    built = manifest(simpsons_root)
    store = tmp_path / "params" / "mlflow.db"
    store.parent.mkdir()
    shutil.copy(empty_store, store)
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    with mlflow.start_run() as run:
        log_identity(spec, built)
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    assert params["test_split"] == "official" and params["n_test"] == "5"


def test_the_report_notes_each_datasets_test_split():
    runs = pd.DataFrame(
        {
            "dataset": ["simpsons", "simpsons", "hymenoptera", "dogs_vs_cats"],
            "status": ["FINISHED"] * 4,
            "test_split": ["official", "official", "official", pd.NA],  # an older run: unknown
        }
    )
    note = split_note(runs)
    assert note.startswith("Test split: hymenoptera official; simpsons official (official:")
    assert "dogs_vs_cats" not in note
    assert split_note(runs.assign(test_split=pd.NA)) == ""


def test_the_shift_test_is_a_second_split_beside_the_native_splits(simpsons_root):
    native = manifest(simpsons_root, official_test=False)
    shifted = manifest(simpsons_root, official_test=False, shift_test=True)
    frame = shifted.frame
    shift = frame[frame.split == "shift"]
    assert sorted(Path(p).name for p in shift.path) == sorted(
        f"{c}_{i}.jpg" for c, n in TESTED.items() for i in range(n)
    )
    assert shifted.test_split == "carved" and "maggie_simpson" in set(frame.label)
    # The native splits are those of a manifest without the shift test, image for image.
    pairs = frame[frame.split != "shift"].set_index("path").split.sort_index()
    assert pairs.equals(native.frame.set_index("path").split.sort_index())
    assert list(shifted.counts().columns) == ["train", "val", "test", "shift", "all"]


def test_a_shift_image_that_copies_a_native_frame_is_left_out_of_the_shift_split(simpsons_root):
    bart = simpsons_root / "simpsons" / "simpsons_dataset" / "bart_simpson"
    frame_of_bart = bart / "pic_0000.jpg"
    testset = simpsons_root / "simpsons" / "kaggle_simpson_testset"
    shutil.copy(frame_of_bart, testset / "bart_simpson_7.jpg")
    native = manifest(simpsons_root, official_test=False)
    shifted = manifest(simpsons_root, official_test=False, shift_test=True)
    assert not shifted.frame.path.str.endswith("bart_simpson_7.jpg").any()
    reason = shifted.skipped[shifted.skipped.path.str.endswith("bart_simpson_7.jpg")].reason
    assert len(reason) == 1 and "pic_0000.jpg" in reason.iloc[0]
    assert str(frame_of_bart) in set(shifted.frame.path)  # the native frame stays where it was
    assert (shifted.frame.split != "shift").sum() == len(native.frame)
    assert (shifted.frame.split == "shift").sum() == sum(TESTED.values())  # the others stay


def test_shift_images_are_left_out_for_copying_a_native_image_not_for_chains_among_them():
    """Downscaled frames of different characters can come within the bits of one another:
    grouped transitively, one shift image near a native frame would take its neighbours out."""
    from benchmark.data.manifest import apart_from

    def hashed(*words: int) -> str:
        return "".join(f"{w:016x}" for w in words)

    native = pd.DataFrame(
        {"path": ["n0.jpg"], "sha256": ["a"], "dhash": [hashed(0, 0, 0, 0)], "split": ["train"]}
    )
    shift = pd.DataFrame(
        {
            "path": ["s0.jpg", "s1.jpg", "s2.jpg"],
            "sha256": ["b", "c", "a"],  # s2: the native image's bytes
            # s0 3 bits from n0; s1 3 bits from s0 and 6 from n0 (bits=4)
            "dhash": [hashed(0b111, 0, 0, 0), hashed(0b111111, 0, 0, 0), None],
            "split": ["shift"] * 3,
        }
    )
    kept, left_out = apart_from(shift, native, bits=4)
    assert list(kept.path) == ["s1.jpg"]
    assert list(left_out.path) == ["s0.jpg", "s2.jpg"]
    assert "n0.jpg" in left_out.reason.iloc[0] and "3 of 256 bits" in left_out.reason.iloc[0]
    assert left_out.reason.iloc[1].startswith("same content as n0.jpg")


@pytest.mark.parametrize("strategy", ["finetune", "linear_probe"])  # Lightning, scikit-learn
def test_the_cell_scores_the_same_model_on_the_shift_split(
    simpsons_root: Path, make_cfg: Callable[..., CellSpec], strategy: str
):
    from benchmark.cell.run import run_cell
    from tests.conftest import TINY

    whole_test = [o for o in TINY if not o.startswith("trainer.limit_test")]
    cfg = make_cfg(
        "dataset=simpsons",
        "dataset.classes=null",
        "dataset.val_fraction=0.4",
        "dataset.test_fraction=0.4",
        f"strategy={strategy}",
        *whole_test,
        data_root=simpsons_root,
    )
    assert cfg.dataset.shift_test and cfg.dataset.official_test is False  # simpsons.yaml
    result = run_cell(cfg)
    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(result.run_id)
    assert run.data.params["n_shift"] == str(sum(TESTED.values()))
    table = client.load_table(run.info.experiment_id, "shift_predictions.json", [result.run_id])
    assert len(table) == sum(TESTED.values()) and table.path.str.startswith("kaggle_").all()
    metrics = run.data.metrics
    assert (table.label == table.predicted).mean() == pytest.approx(metrics["shift_test_acc"])
    assert "shift_test_loss" in metrics
    native = client.load_table(run.info.experiment_id, "test_predictions.json", [result.run_id])
    assert (native.label == native.predicted).mean() == pytest.approx(metrics["test_acc"])
    assert not native.path.str.startswith("kaggle_").any()
