"""Weak spots of the data and its caches (issue 37, faults round four, the data/input group):
each ends in one line that names the file or folder and the fix, or is skipped with its reason,
and nothing else is lost."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from benchmark.config.schema import DatasetConfig
from benchmark.data import DatasetError, build_manifest, scan
from benchmark.data.cache import build_image_cache, files_key, stored_size
from benchmark.data.images import Preprocess
from benchmark.runtime import files
from tests.test_faults import folder_of as faults_folder_of
from tests.test_faults import photos

LITE = Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


def folder_of(tmp_path: Path, shared_data: Path) -> Path:
    """test_faults' small imagefolder of real photos (ants/, bees/), 5 of each."""
    return faults_folder_of(tmp_path, shared_data, count=5)


def manifest_of(root: Path, cache: Path | None) -> object:
    return build_manifest(DatasetConfig(name="imagefolder", root=str(root)), root.parent, 0, cache)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def latin1(folder: Path, name: bytes) -> Path:
    """`folder`/`name`, a name in bytes that are not UTF-8 (as Python holds such a name)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


# ---------------------------------------------------------------- 1. a name that is not UTF-8


def test_a_file_name_that_is_not_utf8_is_skipped_naming_it_the_rest_is_used(tmp_path, shared_data):
    root = folder_of(tmp_path, shared_data)
    shutil.copy(photos(shared_data, "ants", 6)[-1], latin1(root / "ants", b"bad\xff.jpg"))
    wasps = latin1(root, b"w\xe9sps")  # a class folder of its own, named in Latin-1
    wasps.mkdir()
    shutil.copy(photos(shared_data, "bees", 6)[-1], wasps / "wasp.jpg")
    built = manifest_of(root, tmp_path / "cache")
    assert sorted(built.classes) == ["ants", "bees"] and len(built.frame) == 10  # nothing lost
    reasons = dict(zip(built.skipped.path, built.skipped.reason, strict=True))
    bad_file, bad_folder = f"{root}/ants/bad\\xff.jpg", f"{root}/w\\xe9sps"
    assert "not valid UTF-8" in reasons[bad_file] and "rename" in reasons[bad_file]
    assert "not valid UTF-8" in reasons[bad_folder] and "rename" in reasons[bad_folder]
    built.skipped.to_csv(tmp_path / "skipped.csv")  # the run's artifact can be written
    # A Kaggle-style flat folder (Dogs vs. Cats): the same.
    kaggle = tmp_path / "data" / "dogs-vs-cats" / "train"
    kaggle.mkdir(parents=True)
    for i, (name, label) in enumerate([("ants", "cat"), ("bees", "dog")] * 10):
        shutil.copy(photos(shared_data, name, 20)[i], kaggle / f"{label}.{i}.jpg")
    shutil.copy(photos(shared_data, "ants", 1)[0], latin1(kaggle, b"cat.\xff.jpg"))
    dogs = build_manifest(DatasetConfig(name="dogs_vs_cats"), tmp_path / "data", 0, None)
    assert len(dogs.frame) == 20 and f"{kaggle}/cat.\\xff.jpg" in set(dogs.skipped.path)


# ---------------------------------------------------------------- 2. CSV labels and splits


def write_csv(tmp_path: Path, rows: list[tuple[str, ...]], header: str) -> str:
    file = tmp_path / "labels.csv"
    file.write_text(header + "\n" + "".join(",".join(row) + "\n" for row in rows))
    return str(file)


def test_csv_labels_none_and_na_are_labels_not_missing(tmp_path, shared_data):
    rows = [(str(p), "None") for p in photos(shared_data, "ants", 5)]
    rows += [(str(p), "NA") for p in photos(shared_data, "bees", 5)]
    cfg = DatasetConfig(name="csv", file=write_csv(tmp_path, rows, "path,label"))
    built = build_manifest(cfg, tmp_path, 0)
    assert built.classes == ["NA", "None"] and len(built.frame) == 10
    # A blank label is still refused, with the lines named.
    rows[3] = (rows[3][0], "")
    cfg = DatasetConfig(name="csv", file=write_csv(tmp_path, rows, "path,label"))
    with pytest.raises(DatasetError, match=r"line\(s\) 5 have an empty path or label"):
        build_manifest(cfg, tmp_path, 0)


def test_csv_split_values_in_any_case_are_read_and_a_blank_split_is_one_line(tmp_path, shared_data):
    ants, bees = photos(shared_data, "ants", 4), photos(shared_data, "bees", 4)
    splits = ["Train", " TRAIN", "test ", "Val"]
    rows = [(str(p), "ant", s) for p, s in zip(ants, splits, strict=True)]
    rows += [(str(p), "bee", s) for p, s in zip(bees, splits, strict=True)]
    header = "path,label,split"
    cfg = DatasetConfig(name="csv", file=write_csv(tmp_path, rows, header))
    built = build_manifest(cfg, tmp_path, 0)
    assert built.frame.split.value_counts().to_dict() == {"train": 4, "test": 2, "val": 2}
    assert built.test_split == "official"
    rows[1], rows[6] = (*rows[1][:2], ""), (*rows[6][:2], " ")  # blank, beside "Train"
    cfg = DatasetConfig(name="csv", file=write_csv(tmp_path, rows, header))
    with pytest.raises(DatasetError) as raised:
        build_manifest(cfg, tmp_path, 0)
    said = str(raised.value)
    assert "\n" not in said and cfg.file in said and "line(s) 3, 8" in said
    assert "empty split" in said and "train, val or test" in said
    # A split column left empty in every row is no split given: the splits are carved.
    rows = [(*row[:2], "") for row in rows]
    cfg = DatasetConfig(name="csv", file=write_csv(tmp_path, rows, header))
    assert build_manifest(cfg, tmp_path, 0).test_split == "carved"


# ---------------------------------------------------------------- 3. a damaged image-check cache


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text + 'garbage,"unterminated\nmore,1,2\n',  # a line of another shape
        lambda text: text.replace(",", ";", 3),  # a damaged header
        lambda text: text[: len(text) // 2] + "\x00\xff" + text[len(text) // 2 :],
    ],
)
def test_a_damaged_image_check_cache_is_dropped_with_one_warning_never_fatal(
    tmp_path, shared_data, caplog, monkeypatch, damage
):
    root = folder_of(tmp_path, shared_data)
    cache = tmp_path / "cache"
    first = manifest_of(root, cache)
    file = cache / scan.VERDICTS_FILE
    file.write_text(damage(file.read_text()), errors="surrogateescape")
    decoded = []
    inspect = scan.inspect_image
    monkeypatch.setattr(
        scan, "inspect_image", lambda content: decoded.append(1) or inspect(content)
    )
    caplog.clear()
    assert manifest_of(root, cache).sha256 == first.sha256
    (warning,) = warnings(caplog)
    assert str(file) in warning and ("checked again" in warning or "unreadable" in warning)
    assert len(decoded) <= 10
    caplog.clear()
    decoded.clear()
    assert manifest_of(root, cache).sha256 == first.sha256  # rewritten clean: all reused
    assert warnings(caplog) == [] and decoded == []


def test_an_unreadable_image_check_cache_is_rebuilt(tmp_path, shared_data, caplog):
    root = folder_of(tmp_path, shared_data)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / scan.VERDICTS_FILE).write_bytes(os.urandom(3000))
    assert len(manifest_of(root, cache).frame) == 10
    (warning,) = warnings(caplog)
    assert str(cache / scan.VERDICTS_FILE) in warning


# ---------------------------------------------------------------- 4. the cache inside the data


def test_a_cache_folder_inside_the_dataset_folder_is_not_a_class(tmp_path, shared_data, caplog):
    root = folder_of(tmp_path, shared_data)
    cache = root / "cache"
    first = manifest_of(root, cache)
    assert (cache / scan.VERDICTS_FILE).is_file()
    caplog.clear()
    again = manifest_of(root, cache)  # the cache folder is there now
    assert again.classes == ["ants", "bees"] and again.sha256 == first.sha256
    assert len(again.skipped) == len(first.skipped)  # nothing moves, whichever cell came first
    (warning,) = warnings(caplog)
    assert str(cache) in warning and "paths.cache_dir" in warning and "outside" in warning


def test_a_cache_folder_left_in_the_data_by_an_earlier_setting_is_not_a_class(
    tmp_path, shared_data, caplog
):
    root = folder_of(tmp_path, shared_data)
    first = manifest_of(root, root / "cache")
    caplog.clear()
    again = manifest_of(root, tmp_path / "elsewhere")  # the cache moved; the old one is there
    assert again.classes == ["ants", "bees"] and again.sha256 == first.sha256
    (warning,) = warnings(caplog)
    assert str(root / "cache") in warning and "remove it" in warning


@pytest.mark.parametrize("inside", ["", "ants"])
def test_the_dataset_folder_or_a_class_folder_as_the_cache_is_refused_in_one_line(
    tmp_path, shared_data, inside
):
    root = folder_of(tmp_path, shared_data)
    with pytest.raises(DatasetError) as raised:
        manifest_of(root, root / inside)
    said = str(raised.value)
    assert "\n" not in said and str(root / inside) in said and "paths.cache_dir" in said
    assert "outside the data" in said and not (root / inside / scan.VERDICTS_FILE).exists()


# ---------------------------------------------------------------- 5. content replaced in place


def replace_in_place(file: Path, other: Path) -> bytes:
    """`file` rewritten with `other`'s image, padded to the same size, its mtime put back."""
    before = file.stat()
    content = other.read_bytes()
    assert len(content) < before.st_size
    content += b"\0" * (before.st_size - len(content))  # after the JPEG's end: ignored
    file.write_bytes(content)
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = file.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return content


def test_an_image_replaced_with_the_same_size_and_mtime_is_checked_again(
    tmp_path, shared_data, monkeypatch
):
    root = folder_of(tmp_path, shared_data)
    cache = tmp_path / "cache"
    first = manifest_of(root, cache)
    largest = max((root / "ants").iterdir(), key=lambda p: p.stat().st_size)
    smaller = min(photos(shared_data, "bees", 5), key=lambda p: p.stat().st_size)
    paths = sorted(str(p) for p in root.rglob("*.jpg"))
    image_key = files_key(paths, stored_size(LITE), LITE.interpolation)
    content = replace_in_place(largest, smaller)
    decoded = []
    inspect = scan.inspect_image
    monkeypatch.setattr(
        scan, "inspect_image", lambda content: decoded.append(1) or inspect(content)
    )
    again = manifest_of(root, cache)
    digest = again.frame.set_index("path").sha256[str(largest)]
    assert digest == hashlib.sha256(content).hexdigest()
    assert again.sha256 != first.sha256  # a new cell key: not skipped as FINISHED
    assert len(decoded) == 1  # the unchanged files' checks are reused
    # The decoded-image (and feature) cache's key changes too: no stale pixels.
    assert files_key(paths, stored_size(LITE), LITE.interpolation) != image_key


# ---------------------------------------------------------------- 6. read-only or full caches


def fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.EROFS, "read-only"),
        (errno.EACCES, "read-only"),
        (errno.ENOSPC, "no space left"),
    ],
)
def test_a_cache_write_refused_by_the_folder_is_one_line_naming_it(
    tmp_path, monkeypatch, code, words
):
    target = tmp_path / "cache" / "x.csv"
    target.parent.mkdir()
    monkeypatch.setattr(files.tempfile, "mkstemp", fail_with(code))
    with pytest.raises(DatasetError) as raised:
        files.write_text_aside(target, "a")
    said = str(raised.value)
    assert "\n" not in said and words in said and str(target.parent) in said
    assert "paths.cache_dir" in said and not target.exists()


def test_a_full_disk_under_the_feature_cache_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import torch

    from benchmark.models.features import _cached

    file = tmp_path / "features" / "key.npy"
    file.parent.mkdir()
    monkeypatch.setattr(files.os, "fsync", fail_with(errno.ENOSPC))
    with pytest.raises(DatasetError) as raised:
        _cached(file, lambda: torch.zeros(4, 3), {"backbone": "w"})
    said = str(raised.value)
    assert "no space left" in said and str(file.parent) in said and "free" in said
    assert [p.name for p in file.parent.iterdir()] == ["key.npy.lock"]  # no partial left


def test_a_read_only_cache_folder_stops_a_manifest_in_one_line(tmp_path, shared_data, monkeypatch):
    root = folder_of(tmp_path, shared_data)
    monkeypatch.setattr(files.tempfile, "mkstemp", fail_with(errno.EROFS))
    with pytest.raises(DatasetError, match=r"read-only.*paths\.cache_dir") as raised:
        manifest_of(root, tmp_path / "cache")
    assert str(tmp_path / "cache") in str(raised.value)
    monkeypatch.setattr(Path, "mkdir", fail_with(errno.EACCES))
    with pytest.raises(DatasetError, match=r"read-only.*paths\.cache_dir") as raised:
        build_image_cache([str(p) for p in photos(shared_data, "ants", 2)], LITE, tmp_path / "c")
    assert str(tmp_path / "c" / "images") in str(raised.value)


def test_a_second_scan_of_the_simpsons_reuses_every_check(shared_data, shared_cache, monkeypatch):
    """The remembered checks of unchanged files are reused: a second scan decodes nothing."""
    cfg = DatasetConfig(name="simpsons", classes=None)
    first = build_manifest(cfg, shared_data, 0, shared_cache)
    decoded = []
    inspect = scan.inspect_image
    monkeypatch.setattr(
        scan, "inspect_image", lambda content: decoded.append(1) or inspect(content)
    )
    start = time.perf_counter()
    again = build_manifest(cfg, shared_data, 0, shared_cache)
    assert time.perf_counter() - start < 20 and decoded == []
    assert again.sha256 == first.sha256 and len(again.frame) > 1000
