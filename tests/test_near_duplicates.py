"""No near-duplicates across splits: images whose perceptual hashes (256-bit difference hashes)
differ in at most dataset.near_duplicate_bits are one group, which never straddles train,
validation and test; the manifest records each image's group, and the hashes are cached with the
image checks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.config.schema import DatasetConfig
from benchmark.data import build_manifest, scan
from benchmark.data.manifest import NEAR_DUPLICATE_BITS, Manifest, hash_distances, hash_words
from benchmark.data.scan import PERCEPTUAL_COLUMN, VERDICT_COLUMNS, VERDICTS_FILE

SEEDS = range(12)


def textured(i: int, size: int = 64) -> Image.Image:
    """A blocky random picture, its own for each i (unrelated ones are ~100 of 256 bits apart)."""
    cells = np.random.default_rng(i).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((size, size), Image.Resampling.NEAREST)


def reencoded(image: Image.Image) -> bytes:
    """The same picture resized (64 -> 48 px) and saved again as a JPEG: other bytes, 11 of 256
    hash bits apart."""
    buffer = io.BytesIO()
    image.resize((48, 48), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes of 10 distinct pictures; ants/a_original.jpg has a near-duplicate,
    ants/z_copy.jpg (resized, re-encoded)."""
    root = tmp_path / "mine"
    for c, label in enumerate(("ants", "bees")):
        (root / label).mkdir(parents=True)
        for i in range(10):
            textured(100 * c + i).save(root / label / f"p{i:02d}.jpg", quality=90)
    textured(999).save(root / "ants" / "a_original.jpg", quality=90)
    (root / "ants" / "z_copy.jpg").write_bytes(reencoded(textured(999)))
    return root


def manifest_of(root: Path, seed: int = 0, cache: Path | None = None, **dataset) -> Manifest:
    cfg = DatasetConfig(name="imagefolder", root=str(root), **dataset)
    return build_manifest(cfg, root.parent, seed, cache)


def split_of(manifest: Manifest, name: str) -> str:
    (split,) = manifest.frame.split[manifest.frame.path.str.endswith(name)]
    return split


def pair_splits(root: Path, cache: Path, bits: int | None) -> set[tuple[str, str]]:
    """(original's split, copy's split) over seeds and split seeds."""
    found = set()
    for seed in SEEDS:
        built = manifest_of(root, seed, cache, split_seed=seed, near_duplicate_bits=bits)
        found.add((split_of(built, "a_original.jpg"), split_of(built, "z_copy.jpg")))
    return found


def test_a_near_duplicate_pair_is_never_split_across_train_val_and_test(folder, tmp_path):
    found = pair_splits(folder, tmp_path / "cache", bits=None)  # the default, 21
    assert all(original == copy for original, copy in found), found
    assert {split for split, _ in found} >= {"train", "test"}  # the pair moves, whole


def test_without_grouping_the_same_seeds_split_the_pair(folder, tmp_path):
    """The seeds above do put the pair in two splits when nothing groups it: the test above
    would fail on the code before near-duplicate groups (near_duplicate_bits=0: identical
    hashes only)."""
    found = pair_splits(folder, tmp_path / "cache", bits=0)
    assert any(original != copy for original, copy in found), found


def test_a_near_duplicate_of_an_official_test_image_leaves_training(tmp_path):
    root = tmp_path / "splits"
    for split in ("train", "test"):
        for c, label in enumerate(("ants", "bees")):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                textured(1000 * (split == "test") + 100 * c + i).save(
                    root / split / label / f"p{i}.jpg"
                )
    textured(999).save(root / "test" / "ants" / "original.jpg")
    (root / "train" / "ants" / "copy.jpg").write_bytes(reencoded(textured(999)))
    built = manifest_of(root)
    assert built.test_split == "official"
    assert not built.frame.path.str.endswith("copy.jpg").any()
    assert split_of(built, "original.jpg") == "test"
    (reason,) = built.skipped.reason[built.skipped.path.str.endswith("copy.jpg")]
    assert reason.startswith(f"near-duplicate of {root / 'test/ants/original.jpg'} (test split;")
    assert built.removed_across_splits == 1 and built.merged_groups == 1
    assert manifest_of(root, near_duplicate_bits=0).frame.path.str.endswith("copy.jpg").any()


def test_the_manifest_records_each_images_group(folder):
    built = manifest_of(folder)
    rows = built.relative_frame().set_index("path")
    assert (
        rows.group["ants/a_original.jpg"] == rows.group["ants/z_copy.jpg"] == "ants/a_original.jpg"
    )
    singles = rows.drop(["ants/a_original.jpg", "ants/z_copy.jpg"])
    assert (singles.group == singles.index).all()  # each image without a near-duplicate alone
    assert built.merged_groups == 1 and built.removed_across_splits == 0
    assert built.csv.splitlines()[0] == "path,label,split,sha256,group"
    again = manifest_of(folder, near_duplicate_bits=0)
    assert again.merged_groups == 0 and again.sha256 != built.sha256


def test_hashes_are_cached_with_the_image_checks(folder, tmp_path, monkeypatch):
    decoded = []
    inspect = scan.inspect_image
    monkeypatch.setattr(
        scan, "inspect_image", lambda content: decoded.append(1) or inspect(content)
    )
    cache = tmp_path / "cache"
    first = manifest_of(folder, cache=cache)
    assert len(decoded) == 22
    table = pd.read_csv(cache / VERDICTS_FILE, keep_default_na=False)
    assert table[PERCEPTUAL_COLUMN].str.fullmatch("[0-9a-f]{64}").all()
    decoded.clear()
    assert manifest_of(folder, cache=cache).sha256 == first.sha256
    assert decoded == []  # the second build decodes nothing: verdicts and hashes come cached
    # A cache without hashes (an older format) is not trusted: everything is checked again.
    table[VERDICT_COLUMNS].to_csv(cache / VERDICTS_FILE, index=False)
    assert manifest_of(folder, cache=cache).sha256 == first.sha256
    assert len(decoded) == 22


def test_blank_images_of_different_colours_are_not_near_duplicates(tmp_path):
    """A featureless image's difference hash is all zeros whatever its colour: it gets no hash
    and is grouped with exact copies only."""
    root = tmp_path / "plain"
    for c, label in enumerate(("red", "blue")):
        (root / label).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (16, 16), (40 * i + 10, 90 * c, 60)).save(root / label / f"{i}.jpg")
    built = manifest_of(root)
    assert built.merged_groups == 0 and built.frame.group.is_unique


def test_no_official_simpsons_test_image_has_a_near_duplicate_in_training(
    shared_data, shared_cache
):
    cfg = DatasetConfig(name="simpsons", classes=None)
    built = build_manifest(cfg, shared_data, 0, shared_cache)
    assert built.test_split == "official"
    verdicts = pd.read_csv(shared_cache / VERDICTS_FILE, keep_default_na=False)
    # Verdicts are kept by (path, size, mtime): a path may have an older row beside its own.
    hashes = verdicts.drop_duplicates("path", keep="last").set_index("path")[PERCEPTUAL_COLUMN]
    frame = built.frame.assign(dhash=built.frame.path.map(hashes))
    assert (frame.dhash.str.len() == 64).all()  # every real frame has a hash
    test, kept = frame[frame.split == "test"], frame[frame.split != "test"]
    distances = hash_distances(hash_words(test.dhash), hash_words(kept.dhash))
    assert distances.min() > NEAR_DUPLICATE_BITS  # dataset.near_duplicate_bits=null
    # Training frames were near-duplicates of test images, and are left out naming them.
    removed = built.skipped[built.skipped.reason.str.contains(r"near-duplicate of .*\(test split")]
    assert built.removed_across_splits == len(removed) > 0
    assert removed.reason.str.contains("kaggle_simpson_testset").all()
    assert (built.frame.groupby("group").split.nunique() == 1).all()
