"""Every dataset from its real layout: the three real sets in ../shared/data, a Caltech-256
stand-in in its exact layout, the user's own folders and CSVs, and the mess real archives hold."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.cell.run import run_cell
from benchmark.config.schema import DatasetConfig
from benchmark.data import DatasetError, build_manifest
from benchmark.data.images import load_rgb
from benchmark.tools.data import main as data_cli
from tests.conftest import TINY

STUDY_SIMPSONS = 20
SHARED_FRAMES, SHARED_MAGGIE = 300, 98  # native Simpsons frames in ../shared/data


def manifest_of(data_root: Path, seed: int = 0, **dataset) -> pd.DataFrame:
    return build_manifest(DatasetConfig(**dataset), data_root, seed).frame


def per_class_split(frame: pd.DataFrame) -> dict:
    return frame.groupby(["label", "split"]).size().to_dict()


def test_dogs_vs_cats_from_the_flat_kaggle_layout(shared_data):
    frame = manifest_of(shared_data, name="dogs_vs_cats")
    assert frame.label.value_counts().to_dict() == {"cat": 700, "dog": 700}
    counts = per_class_split(frame)
    assert [counts[("cat", s)] for s in ("train", "val", "test")] == [448, 112, 140]
    assert all(
        Path(p).name.startswith(f"{label}.")
        for p, label in zip(frame.path, frame.label, strict=True)
    )


def test_the_studys_sorted_80_20_split_is_reproducible(shared_data):
    frame = manifest_of(shared_data, name="dogs_vs_cats", test_split="sorted")
    cats = sorted(Path(p).name for p in frame[frame.label == "cat"].path)
    test_cats = sorted(
        Path(p).name for p in frame[(frame.label == "cat") & (frame.split == "test")].path
    )
    assert test_cats == cats[-140:]


def test_simpsons_from_simpsons_dataset(shared_data):
    # ../shared holds Kaggle's test set too: it is the test split, and maggie (none in it) is out.
    frame = manifest_of(shared_data, name="simpsons", classes=None)
    test = frame[frame.split == "test"].label.value_counts().to_dict()
    assert test == {
        "bart_simpson": 50,
        "homer_simpson": 50,
        "lisa_simpson": 45,
        "marge_simpson": 50,
    }
    # ../shared/data/README: 300 native frames each of bart, homer, lisa and marge, 98 of maggie;
    # the frames within dataset.near_duplicate_bits of an official test image leave training.
    trained = frame[frame.split != "test"].label.value_counts().to_dict()
    assert trained == {
        "bart_simpson": SHARED_FRAMES - 14,
        "homer_simpson": SHARED_FRAMES - 1,
        "lisa_simpson": SHARED_FRAMES - 11,
        "marge_simpson": SHARED_FRAMES - 13,
    }
    assert "maggie_simpson" not in set(frame.label)
    frame = manifest_of(shared_data, name="simpsons", classes=None, official_test=False)
    assert frame.label.value_counts().to_dict() == {
        "bart_simpson": SHARED_FRAMES,
        "homer_simpson": SHARED_FRAMES,
        "lisa_simpson": SHARED_FRAMES,
        "maggie_simpson": SHARED_MAGGIE,
        "marge_simpson": SHARED_FRAMES,
    }
    two = manifest_of(shared_data, name="simpsons", classes=["lisa_simpson", "bart_simpson"])
    assert sorted(two.label.unique()) == ["bart_simpson", "lisa_simpson"]


def test_simpsons_tests_on_native_frames_by_default(make_cfg, shared_data):
    """Composed as a cell is: the test split is carved from the native frames (validation's
    distribution), maggie included; Kaggle's downscaled set is only the `shift` split (a second
    test), less its copies of native frames, or the test split with dataset.official_test=true."""
    cfg = make_cfg("dataset=simpsons", "dataset.classes=null")
    assert cfg.dataset.official_test is False and cfg.dataset.shift_test
    built = build_manifest(cfg.dataset, shared_data, 0)
    assert built.test_split == "carved"
    official = built.frame.path.str.contains("kaggle_simpson_testset")
    assert (built.frame.split[official] == "shift").all()
    assert 100 < official.sum() < 195  # some are near-duplicates of native frames: left out
    left_out = built.skipped[built.skipped.path.str.contains("kaggle_simpson_testset")]
    assert len(left_out) == 195 - official.sum() and left_out.reason.str.contains("pic_").all()
    test = built.frame[built.frame.split == "test"].label.value_counts()
    assert set(test.index) == {f"{c}_simpson" for c in ("bart", "homer", "lisa", "maggie", "marge")}
    assert abs(len(built.frame[built.frame.split == "test"]) - 0.2 * 1298) < 15  # whole groups
    assert built.frame.groupby("group").split.nunique().max() == 1  # none straddles


def test_simpsons_default_is_the_studys_20_and_absent_ones_are_named(make_cfg, shared_data):
    cfg = make_cfg("dataset=simpsons")
    assert len(cfg.dataset.classes) == STUDY_SIMPSONS
    with pytest.raises(DatasetError) as error:
        build_manifest(cfg.dataset, shared_data, 0)
    assert "ned_flanders" in str(error.value) and "dataset.classes=null" in str(error.value)


def test_simpsons_duplicate_nested_copy_is_reported_not_a_class(tmp_path, shared_data):
    real = shared_data / "simpsons" / "simpsons_dataset"
    folder = tmp_path / "simpsons" / "simpsons_dataset"
    for character in ("bart_simpson", "lisa_simpson"):
        shutil.copytree(real / character, folder / character)
        shutil.copytree(real / character, folder / "simpsons_dataset" / character)
    manifest = build_manifest(DatasetConfig(name="simpsons", classes=None), tmp_path, 0)
    assert sorted(manifest.classes) == ["bart_simpson", "lisa_simpson"]
    assert len(manifest.frame) == 2 * SHARED_FRAMES  # the nested copy adds none
    assert "duplicate copy" in " ".join(manifest.skipped.reason)


def caltech_standin(root: Path, shared_data: Path) -> Path:
    """256_ObjectCategories/NNN.name/NNN_XXXX.jpg with 257.clutter and a stray nested folder,
    filled with real photos."""
    photos = sorted((shared_data / "dogs-vs-cats" / "train").glob("*.jpg"))
    folder = root / "256_ObjectCategories"
    classes = ["001.ak47", "002.american-flag", "056.dog", "257.clutter"]
    for c, name in enumerate(classes):
        number = name.split(".")[0]
        (folder / name).mkdir(parents=True)
        for i in range(6):
            shutil.copy(photos[c * 6 + i], folder / name / f"{number}_{i + 1:04d}.jpg")
    (folder / "056.dog" / "greg").mkdir()
    shutil.copy(photos[-1], folder / "056.dog" / "greg" / "056_0001.jpg")
    return folder


def test_caltech256_standin_layout(tmp_path, shared_data):
    caltech_standin(tmp_path, shared_data)
    manifest = build_manifest(DatasetConfig(name="caltech256"), tmp_path, 0)
    assert manifest.classes == ["001.ak47", "002.american-flag", "056.dog", "257.clutter"]
    assert len(manifest.frame) == 24
    assert set(manifest.frame.split) == {"train", "val", "test"}
    greg = manifest.skipped[manifest.skipped.path.str.endswith("greg")]
    assert list(greg.reason) == ["nested folder inside a class folder, ignored"]
    without = build_manifest(DatasetConfig(name="caltech256", include_clutter=False), tmp_path, 0)
    assert "257.clutter" not in without.classes and len(without.frame) == 18


def test_caltech256_standin_trains_for_a_step(tmp_path, shared_data, make_cfg):
    caltech_standin(tmp_path / "data", shared_data)
    cfg = make_cfg(
        "dataset=caltech256", f"paths.data_root={tmp_path / 'data'}", "strategy=freeze", *TINY
    )
    result = run_cell(cfg)
    assert 0.0 <= result.test_acc <= 1.0


def broken_corpus(folder: Path) -> dict[str, str]:
    """Every kind of file real archives hold; returns name -> expected outcome."""
    folder.mkdir(parents=True)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(folder / "good.jpg")
    full = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(folder / "cmyk.jpg")  # pure cyan
    rgba = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))
    rgba.save(folder / "alpha.png")
    Image.new("P", (32, 32), 3).save(folder / "palette.gif")
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(folder / "deep.png")
    Image.new("L", (32, 32), 90).save(folder / "gray.jpg")
    rotated = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = rotated.getexif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated.save(folder / "rotated.jpg", exif=exif)
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "readme.txt").write_text("credits")
    return {
        "truncated.jpg": "corrupt or truncated",
        "zero.jpg": "empty file",
        "notes.jpg": "not an image",
        ".DS_Store": "system file",
        "Thumbs.db": "system file",
        "readme.txt": "not an image file (.txt)",
    }


def test_broken_files_are_found_at_scan_time_and_reported(tmp_path):
    expected = broken_corpus(tmp_path / "mine" / "things")
    broken_corpus(tmp_path / "mine" / "other")
    manifest = build_manifest(
        DatasetConfig(
            name="imagefolder", root=str(tmp_path / "mine"), test_fraction=0.2, val_fraction=0.2
        ),
        tmp_path,
        0,
    )
    skipped = manifest.skipped.assign(name=manifest.skipped.path.map(lambda p: Path(p).name))
    mine = skipped[skipped.path.str.contains("/things/")]
    for name, reason in expected.items():
        (row,) = mine[mine.name == name].reason
        assert reason in row, (name, row)
    usable = {Path(p).name for p in manifest.frame.path if "/things/" in p}
    # "other" holds the same bytes: each image's copies stay in one split (test_faults.py).
    usable |= set(mine.name[mine.reason.str.startswith("same content as")])
    assert usable == {
        "good.jpg",
        "cmyk.jpg",
        "alpha.png",
        "palette.gif",
        "deep.png",
        "gray.jpg",
        "rotated.jpg",
    }


def test_every_image_mode_becomes_correct_rgb(tmp_path):
    broken_corpus(tmp_path / "corpus")
    loaded = {
        name: load_rgb(str(tmp_path / "corpus" / name))
        for name in ("cmyk.jpg", "alpha.png", "palette.gif", "deep.png", "gray.jpg", "rotated.jpg")
    }
    assert all(image.mode == "RGB" for image in loaded.values())
    cyan = np.asarray(loaded["cmyk.jpg"]).reshape(-1, 3).mean(0)
    assert cyan[0] < 60 and cyan[1] > 200 and cyan[2] > 200
    alpha = np.asarray(loaded["alpha.png"])
    assert tuple(alpha[0, 0]) == (0, 0, 255) and tuple(alpha[0, 31]) == (255, 255, 255)
    assert np.asarray(loaded["deep.png"]).min() == 255  # 16-bit white stays white
    gray = np.asarray(loaded["gray.jpg"]).astype(int)
    assert abs(gray[..., 0] - gray[..., 2]).max() <= 1 and abs(gray.mean() - 90) < 3
    assert loaded["rotated.jpg"].size == (20, 40)  # EXIF orientation honoured


def test_empty_class_and_too_small_class_are_named_before_training(tmp_path, shared_data):
    root = tmp_path / "mine"
    for name in ("ants", "bees"):
        shutil.copytree(shared_data / "hymenoptera_data" / "val" / name, root / name)
    (root / "wasps").mkdir()
    with pytest.raises(DatasetError, match=r"wasps have no usable images"):
        manifest_of(tmp_path, name="imagefolder", root=str(root))
    shutil.copy(next((root / "ants").glob("*.jpg")), root / "wasps" / "one.jpg")
    with pytest.raises(DatasetError, match=r"\['wasps'\] have too few images"):
        manifest_of(tmp_path, name="imagefolder", root=str(root))


def test_wrong_paths_and_missing_kaggle_credentials_say_how_to_fix(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match=r"dataset\.root=/path/to/your/images"):
        manifest_of(tmp_path, name="imagefolder")
    with pytest.raises(DatasetError, match="no such folder"):
        manifest_of(tmp_path, name="imagefolder", root=str(tmp_path / "typo"))
    with pytest.raises(DatasetError, match="no such file"):
        manifest_of(tmp_path, name="csv", file=str(tmp_path / "labels.csv"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    with pytest.raises(DatasetError) as error:
        manifest_of(tmp_path / "data", name="dogs_vs_cats")
    assert "kaggle.json" in str(error.value) and "train.zip" in str(error.value)
    assert not (tmp_path / "data" / "dogs-vs-cats").exists()


def test_manifest_is_deterministic_and_seeds_move_only_validation(shared_data):
    cfg = DatasetConfig(name="dogs_vs_cats")
    first, again = build_manifest(cfg, shared_data, 0), build_manifest(cfg, shared_data, 0)
    other = build_manifest(cfg, shared_data, 1)
    assert first.sha256 == again.sha256 and first.sha256 != other.sha256
    test = lambda m: set(m.frame[m.frame.split == "test"].path)  # noqa: E731
    val = lambda m: set(m.frame[m.frame.split == "val"].path)  # noqa: E731
    assert test(first) == test(other) and val(first) != val(other)
    assert per_class_split(first.frame) == per_class_split(other.frame)
    moved = build_manifest(DatasetConfig(name="dogs_vs_cats", split_seed=1), shared_data, 0)
    assert test(moved) != test(first)


def test_stats_prints_counts_and_every_skipped_file(make_cfg, shared_data, capsys, tmp_path):
    code = data_cli(
        [
            "stats",
            "dataset=hymenoptera",
            f"paths.data_root={shared_data}",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "ants      98   25    70  193" in out and "all      195   49   153  397" in out
    assert "imageNotFound.gif placeholder shipped with the dataset" in out
    assert list((tmp_path / "cache" / "manifests").glob("hymenoptera-*.csv"))
