"""Each dataset of the study, and the user's own, read from exactly what its source ships.

A preparer finds the official layout under `paths.data_root` (fetching it when it can), and returns
a `Source`: the usable images with labels (and the official split when there is one), what was
skipped and why, and the folder that paths in the manifest are relative to.
"""

from __future__ import annotations

import csv as std_csv
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from filelock import FileLock
from PIL import Image

from benchmark.config.registry import Registry
from benchmark.config.schema import DatasetConfig
from benchmark.data import acquire
from benchmark.data.scan import (
    DatasetError,
    Scan,
    class_folder_files,
    excluded,
    flat_files,
    harness_cache,
    scan_class_folders,
    select_classes,
    undecodable,
    verify,
)
from benchmark.runtime.files import make_folder, writing_in

log = logging.getLogger(__name__)


@dataclass
class Source:
    scan: Scan  # images: path, label[, split]
    root: Path


log = logging.getLogger("benchmark")

Preparer = Callable[[DatasetConfig, Path], Source]
PREPARERS: Registry[Preparer] = Registry()
register_dataset = PREPARERS.register


def first_existing(*candidates: Path) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


# ---------------------------------------------------------------- Hymenoptera

HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
# tree_digest() of the official archive's hymenoptera_data/ folder (398 files).
HYMENOPTERA_SHA256 = "4d9516c2fb161c30f41a394c6690b6c88f5c14ffbacac3cef9ddb3412df91248"


@register_dataset("hymenoptera")
def hymenoptera(cfg: DatasetConfig, data_root: Path) -> Source:
    """Official train/ gives train and val; official val/ is the held-out test split."""
    folder = data_root / "hymenoptera_data"
    fix = (
        f"Download {HYMENOPTERA_URL} and unzip it into {data_root} so that {folder}/train/ants "
        "exists, or point paths.data_root (or BENCHMARK_DATA_ROOT) at the folder that holds "
        "hymenoptera_data/."
    )
    layout = [folder / split / cls for split in ("train", "val") for cls in ("ants", "bees")]
    if not all(p.is_dir() for p in layout):
        if not cfg.download:
            raise DatasetError(f"Hymenoptera not found at {folder}. {fix}")
        acquire.install(
            acquire.from_url(HYMENOPTERA_URL, "hymenoptera_data"),
            data_root,
            "hymenoptera_data",
            fix,
            HYMENOPTERA_SHA256,
        )
    placeholder = {"imageNotFound.gif"}
    train = scan_class_folders(folder / "train", placeholder, cfg.classes)
    test = scan_class_folders(folder / "val", placeholder, cfg.classes)
    train.images["split"], test.images["split"] = "train", "test"
    return Source(Scan.concat([train, test]), folder)


# ---------------------------------------------------------------- Dogs vs. Cats

KAGGLE_DOGS_VS_CATS = "dogs-vs-cats"


def _dogs_vs_cats_layout(download: Path) -> Path:
    """The competition's train.zip unpacks to train/; keep it under dogs-vs-cats/."""
    target = download / "dogs-vs-cats"
    target.mkdir()
    (download / "train").rename(target / "train")
    return target


@register_dataset("dogs_vs_cats")
def dogs_vs_cats(cfg: DatasetConfig, data_root: Path) -> Source:
    """Kaggle's flat train/cat.N.jpg, dog.N.jpg (label = file-name prefix), or Microsoft's
    PetImages/{Cat,Dog} mirror (label = folder, lower-cased)."""
    kaggle = data_root / "dogs-vs-cats" / "train"
    pets = first_existing(data_root / "dogs-vs-cats" / "PetImages", data_root / "PetImages")
    if pets is not None:
        wanted = None if cfg.classes is None else [c.capitalize() for c in cfg.classes]
        scan = scan_class_folders(pets, classes=wanted)
        scan.images["label"] = scan.images.label.str.lower()
        return Source(scan, pets)
    if not kaggle.is_dir():
        fix = (
            f"Download train.zip of the Kaggle competition '{KAGGLE_DOGS_VS_CATS}' and unzip it so "
            f"that {kaggle}/cat.0.jpg exists (or put Microsoft's PetImages/ folder in "
            f"{data_root / 'dogs-vs-cats'}); with Kaggle credentials this happens automatically."
        )
        if not cfg.download:
            raise DatasetError(f"Dogs vs. Cats not found at {kaggle}. {fix}")
        fetch = acquire.from_kaggle(KAGGLE_DOGS_VS_CATS, True, _dogs_vs_cats_layout)
        acquire.install(fetch, data_root, "dogs-vs-cats", fix)
    found, not_utf8 = flat_files(kaggle)
    files = pd.DataFrame({"path": [str(p) for p in found if p.is_file()]})
    files["label"] = files.path.map(lambda p: Path(p).name.split(".")[0].lower())
    named = files.label.isin(["cat", "dog"])
    unnamed = excluded(files.path[~named], "file name has no cat./dog. prefix")
    files, left_out = select_classes(files[named], ["cat", "dog"], cfg.classes, kaggle)
    scan = verify(files, desc="checking dogs-vs-cats")
    skipped = [unnamed, left_out, scan.skipped, *([not_utf8] if len(not_utf8) else [])]
    return Source(Scan(scan.images, pd.concat(skipped)), kaggle)


# ---------------------------------------------------------------- The Simpsons

KAGGLE_SIMPSONS = "alexattia/the-simpsons-characters-dataset"


@register_dataset("simpsons")
def simpsons(cfg: DatasetConfig, data_root: Path) -> Source:
    """simpsons_dataset/<character>/. The Kaggle archive also ships a duplicate copy of the whole
    tree nested as simpsons_dataset/simpsons_dataset/, which is reported and ignored."""
    folder = first_existing(
        data_root / "simpsons" / "simpsons_dataset", data_root / "simpsons_dataset"
    )
    if folder is None:
        folder = data_root / "simpsons" / "simpsons_dataset"
        fix = (
            f"Download the Kaggle dataset '{KAGGLE_SIMPSONS}' and unzip it so that "
            f"{folder}/homer_simpson exists; with Kaggle credentials this happens automatically."
        )
        if not cfg.download:
            raise DatasetError(f"Simpsons not found at {folder}. {fix}")
        fetch = acquire.from_kaggle(KAGGLE_SIMPSONS, False, lambda download: download)
        acquire.install(fetch, data_root, "simpsons", fix)
    nested = folder / "simpsons_dataset"
    wanted, skipped = cfg.classes, excluded(pd.Series(dtype=str), "")
    if nested.is_dir():  # the duplicate copy must not be taken for a character
        if wanted is None:  # (a name that is not UTF-8, or the cache, is no character)
            wanted = [
                p.name
                for p in folder.iterdir()
                if p.is_dir() and p != nested and not undecodable(p) and not harness_cache(p)
            ]
        skipped = excluded(pd.Series([str(nested)]), "duplicate copy nested in the Kaggle archive")
    scan = scan_class_folders(folder, classes=wanted)
    scan = Scan(scan.images, pd.concat([skipped, scan.skipped], ignore_index=True))
    testset = folder.parent / SIMPSONS_TESTSET
    if not testset.is_dir():
        return Source(scan, folder)
    if cfg.official_test is False:
        if not cfg.shift_test:
            return Source(scan, folder)
        return Source(with_shift_test(scan, testset), folder.parent)
    return Source(with_official_test(scan, testset), folder.parent)


SIMPSONS_TESTSET = "kaggle_simpson_testset"
SIMPSONS_TEST_NAME = re.compile(r"^(?P<label>.+)_\d+$")  # bart_simpson_12.jpg: bart_simpson


def official_testset(train: Scan, testset: Path) -> Scan:
    """Kaggle's flat test set (`<character>_N.jpg`): its checked images of the characters
    trained on, and what it left out (stray files, characters not trained on, unusable files)."""
    entries, not_utf8 = flat_files(testset)
    files = pd.DataFrame({"path": [str(p) for p in entries if p.is_file()]})
    files["label"] = files.path.map(lambda p: SIMPSONS_TEST_NAME.match(Path(p).stem))
    named = files.label.notna()
    files.loc[named, "label"] = files.label[named].map(lambda m: m["label"])
    stray = pd.concat(
        [
            excluded(files.path[~named], "file name is not <character>_N"),
            excluded(pd.Series([str(p) for p in entries if not p.is_file()], dtype=str), "folder"),
            *([not_utf8] if len(not_utf8) else []),
        ]
    )
    trained = set(train.images.label)
    test = verify(files[named & files.label.isin(trained)], desc=f"checking {SIMPSONS_TESTSET}")
    untrained = excluded(
        files.path[named & ~files.label.isin(trained)], "character not in the training classes"
    )
    return Scan(test.images, pd.concat([stray, untrained, test.skipped], ignore_index=True))


def with_shift_test(train: Scan, testset: Path) -> Scan:
    """The native frames as they are (their test split is carved from them), and Kaggle's test
    set as the `shift` split: a second test of the same model at the x0.357 resolution."""
    shift = official_testset(train, testset)
    native = train.images.assign(split="train")
    images = pd.concat([native, shift.images.assign(split="shift")], ignore_index=True)
    return Scan(images, pd.concat([train.skipped, shift.skipped], ignore_index=True))


def with_official_test(train: Scan, testset: Path) -> Scan:
    """Kaggle's test set as the test split of the characters it covers; characters of training
    without a test image are left out of every split (one line names them), test images of
    characters not trained on are left out too."""
    test = official_testset(train, testset)
    trained = set(train.images.label)
    untested = sorted(trained - set(test.images.label))
    if untested:
        log.warning(
            "simpsons: %s %s no images in %s: left out of train, val and test "
            "(dataset.official_test=false keeps them, with a test split carved from training)",
            ", ".join(untested),
            "has" if len(untested) == 1 else "have",
            SIMPSONS_TESTSET,
        )
    untested_rows = train.images.label.isin(untested)
    kept = train.images[~untested_rows].assign(split="train")
    left_out = excluded(train.images.path[untested_rows], f"no test images in {SIMPSONS_TESTSET}")
    images = pd.concat([kept, test.images.assign(split="test")], ignore_index=True)
    return Scan(images, pd.concat([train.skipped, left_out, test.skipped], ignore_index=True))


# ---------------------------------------------------------------- Caltech-256


def _caltech_layout(tmp: Path) -> Path:
    from torchvision.datasets import Caltech256  # torch: imported only to download

    Caltech256(str(tmp), download=True)  # torchvision knows the official archive and its md5
    return tmp / "caltech256" / "256_ObjectCategories"


@register_dataset("caltech256")
def caltech256(cfg: DatasetConfig, data_root: Path) -> Source:
    """256_ObjectCategories/NNN.name/NNN_XXXX.jpg; the label is the folder name. Stray nested
    folders (056.dog/greg, 198.spider/RENAME2), which the study deleted by hand, are reported and
    ignored."""
    folder = first_existing(
        data_root / "256_ObjectCategories", data_root / "caltech256" / "256_ObjectCategories"
    )
    if folder is None:
        folder = data_root / "256_ObjectCategories"
        fix = (
            f"Download 256_ObjectCategories.tar (Caltech-256) and extract it into {data_root} "
            f"so that {folder}/001.ak47 exists."
        )
        if not cfg.download:
            raise DatasetError(f"Caltech-256 not found at {folder}. {fix}")
        acquire.install(_caltech_layout, data_root, "256_ObjectCategories", fix)
    classes = cfg.classes
    if not cfg.include_clutter:
        found, _, _ = class_folder_files(folder)
        classes = [c for c in (classes or found) if c != "257.clutter"]
    return Source(scan_class_folders(folder, classes=classes), folder)


# ---------------------------------------------------------------- synthetic (made here)

# Noise images in which the class shows as one bright channel, in colour or grey (the channels
# differ in luminance): the stub's random features separate them (linear_probe, lp_ft: test
# accuracy 1.0), though the SGD strategies' default 10 epochs of 2 steps barely move from chance.
# Bytes from SHAKE-256 of the class and index, written as uncompressed BMP: the same files, digest
# and cell keys on every machine and library version (a PNG's bytes depend on the zlib Pillow was
# built with).
SYNTHETIC_CLASSES = ("red", "green", "blue")
SYNTHETIC_PER_CLASS = 32
SYNTHETIC_PX = 24
# tree_digest() of the folder `synthetic_images` writes: a change of the generator must change it.
SYNTHETIC_SHA256 = "d892ef59d33b02c1082c9abd93f6fdeffa0e0e4b865521947eac36ac42dbdb1b"


def synthetic_image(label: str, index: int) -> Image.Image:
    """Image `index` of class `label`: noise in [0, 128), its class's channel raised by 128."""
    size = SYNTHETIC_PX * SYNTHETIC_PX * 3
    noise = hashlib.shake_256(f"benchmark synthetic {label} {index}".encode()).digest(size)
    pixels = np.frombuffer(noise, dtype=np.uint8).reshape(SYNTHETIC_PX, SYNTHETIC_PX, 3) // 2
    pixels[..., SYNTHETIC_CLASSES.index(label)] += 128
    return Image.fromarray(pixels)


def synthetic_images(tmp: Path) -> Path:
    """The synthetic dataset as class folders: `<class>/<class>_NN.bmp`."""
    folder = tmp / "synthetic"
    for label in SYNTHETIC_CLASSES:
        (folder / label).mkdir(parents=True)
        for index in range(SYNTHETIC_PER_CLASS):
            synthetic_image(label, index).save(folder / label / f"{label}_{index:02d}.bmp")
    return folder


@register_dataset("synthetic")
def synthetic(cfg: DatasetConfig, data_root: Path) -> Source:
    """`dataset=synthetic`: tiny images made here (no download, nothing to unpack) in
    `data_root`/synthetic/, made again whenever the folder is not exactly what the generator
    writes; test and validation are carved as for any dataset without official splits."""
    folder = data_root / "synthetic"
    if not folder.is_dir() or acquire.tree_digest(folder) != SYNTHETIC_SHA256:
        fix = f"Check that {data_root} is writable, or set paths.data_root to a folder that is."
        make_folder(data_root)  # cells of a sweep starting at once: one makes it
        with writing_in(data_root), FileLock(data_root / ".synthetic.lock"):
            if not folder.is_dir() or acquire.tree_digest(folder) != SYNTHETIC_SHA256:
                acquire.install(synthetic_images, data_root, "synthetic", fix, SYNTHETIC_SHA256)
    return Source(scan_class_folders(folder, classes=cfg.classes), folder)


# ---------------------------------------------------------------- the user's own


OFFICIAL_SPLITS = ("train", "val", "test")
CSV_SEPARATORS = ",;\t|"


def csv_separator(file: Path) -> str:
    """The separator of a labels CSV, sniffed from its header line (`,`, `;`, tab or `|`: a
    spreadsheet in a comma-decimal locale saves `;`); `,` when the header has none of them."""
    try:
        with file.open(newline="", encoding="utf-8-sig", errors="replace") as handle:
            header = handle.readline()
        return std_csv.Sniffer().sniff(header, delimiters=CSV_SEPARATORS).delimiter
    except (std_csv.Error, OSError):
        return ","


@register_dataset("imagefolder")
def imagefolder(cfg: DatasetConfig, data_root: Path) -> Source:
    """`dataset.root` holds class folders, or train/ (+ val/, test/) each holding class folders.
    With train/ and val/ but no test/, val/ is the held-out test split (as for Hymenoptera) and
    validation is carved from train/."""
    if not cfg.root:
        raise DatasetError("dataset=imagefolder needs dataset.root=/path/to/your/images.")
    root = Path(cfg.root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset.root={cfg.root}: no such folder ({root}).")
    present = [s for s in OFFICIAL_SPLITS if (root / s).is_dir()]
    if "train" not in present:
        return Source(scan_class_folders(root, classes=cfg.classes), root)
    rename = {"train": "train", "val": "val" if "test" in present else "test", "test": "test"}
    scans = []
    for split in present:
        scan = scan_class_folders(root / split, classes=cfg.classes)
        scan.images["split"] = rename[split]
        scans.append(scan)
    return Source(Scan.concat(scans), root)


@register_dataset("csv")
def csv(cfg: DatasetConfig, data_root: Path) -> Source:
    """A CSV with columns `path,label` (and optionally `split`: train/val/test, in any case);
    relative paths are relative to the CSV's folder. Every value is text: a label `None` or `NA`
    is a label, only an empty cell is missing."""
    file = _labels_file(cfg)
    table = _labelled_rows(_read_labels(file), file)
    return _listed_images(table, file, cfg.classes)


def _labels_file(cfg: DatasetConfig) -> Path:
    """The labels CSV `dataset.file` names, resolved; refused when unset or not a file."""
    if not cfg.file:
        raise DatasetError("dataset=csv needs dataset.file=/path/to/labels.csv (path,label).")
    file = Path(cfg.file).expanduser().resolve()
    if not file.is_file():
        raise DatasetError(f"dataset.file={cfg.file}: no such file ({file}).")
    return file


def _read_labels(file: Path) -> pd.DataFrame:
    """The labels CSV as text, its column names lower case; refused (saying how to fix it) when
    it is not UTF-8, not a CSV, lacks the path or label column, or has no rows."""
    try:
        separator = csv_separator(file)
        table = pd.read_csv(
            file,
            sep=separator,
            dtype=str,
            skipinitialspace=True,
            keep_default_na=False,  # pandas' NA words (None, NA, null, n/a...) are labels here
            na_values=[""],
        )
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"{file} is not UTF-8 text (it holds the byte "
            f"{error.object[error.start : error.start + 1]!r}): save it as UTF-8 (in a "
            "spreadsheet: CSV UTF-8)."
        ) from None
    except pd.errors.EmptyDataError:
        raise DatasetError(
            f"{file} is empty: it needs a header path,label and a row per image."
        ) from None
    except pd.errors.ParserError as error:
        raise DatasetError(f"{file} is not a readable CSV ({error}).") from None
    table.columns = [str(c).strip().lower() for c in table.columns]  # Path,Label is path,label
    missing = {"path", "label"} - set(table.columns)
    if missing:
        raise DatasetError(
            f"{file} lacks the column(s) {sorted(missing)} (header read with separator "
            f"{separator!r} as {list(table.columns)}); it needs a header path,label, separated "
            "by , ; tab or |."
        )
    if table.empty:
        raise DatasetError(f"{file} has a header but no rows: add a row path,label per image.")
    return table


def _labelled_rows(table: pd.DataFrame, file: Path) -> pd.DataFrame:
    """The rows with their labels stripped, their splits read (where given) and their paths
    absolute; refused when a row lacks its path or label, or an image has two labels."""
    blank = table.index[table.path.isna() | table.label.fillna("").str.strip().eq("")]
    if len(blank):
        lines = ", ".join(str(i + 2) for i in blank[:10])  # 1-based, after the header
        raise DatasetError(
            f"{file}: line(s) {lines} have an empty path or label: fill them in or remove them."
        )
    table["label"] = _stripped_labels(table.label, file)
    if "split" in table:
        table = _official_splits(table, file)
    table["path"] = [str((file.parent / p).resolve()) for p in table.path]
    labels = table.groupby("path").label.nunique()
    if (conflicting := labels[labels > 1]).any():
        shown = ", ".join(conflicting.index[:5])
        raise DatasetError(
            f"{file}: {len(conflicting)} image(s) are listed with two labels ({shown}): give "
            "each image one label."
        )
    return table


def _listed_images(table: pd.DataFrame, file: Path, classes: list[str] | None) -> Source:
    """The listed images of the configured `classes` that exist and decode; a repeated row, a
    missing file and an undecodable one are skipped, each with why."""
    repeated = table.duplicated("path")  # a file listed twice must not be in two splits
    twice = excluded(table.path[repeated], f"listed again in {file.name} (duplicate row)")
    table = table[~repeated]
    exists = table.path.map(lambda p: Path(p).is_file())
    absent = excluded(table.path[~exists], f"listed in {file.name} but missing")
    files, left_out = select_classes(table[exists], set(table.label), classes, file)
    scan = verify(files.reset_index(drop=True), desc=f"checking {file.name}")
    skipped = pd.concat([twice, absent, left_out, scan.skipped], ignore_index=True)
    return Source(Scan(scan.images, skipped), file.parent)


def _official_splits(table: pd.DataFrame, file: Path) -> pd.DataFrame:
    """The `split` column as train/val/test whatever its case and spaces (`Train `: train). A
    column empty in every row gives no split (dropped: the splits are carved, as without it);
    some rows empty is refused naming them (a row without a split would be trained on, or
    carved into test, by no rule the user wrote)."""
    split = table.split.fillna("").str.strip().str.lower()
    blank = split.eq("")
    if blank.all():
        log.warning(
            "%s: the split column is empty in every row: read as no split given (test and "
            "validation are carved, dataset.test_fraction and dataset.val_fraction).",
            file,
        )
        return table.drop(columns="split")
    if blank.any():
        lines = ", ".join(str(i + 2) for i in table.index[blank][:10])  # 1-based, after the header
        raise DatasetError(
            f"{file}: line(s) {lines} have an empty split: give each row train, val or test, "
            "or drop the split column to have test and validation carved."
        )
    if not (known := split.isin(OFFICIAL_SPLITS)).all():
        bad = sorted(set(table.split[~known]))
        lines = ", ".join(str(i + 2) for i in table.index[~known][:10])
        raise DatasetError(
            f"{file}: split values {bad} (line(s) {lines}) are not train, val or test: correct "
            "them, or drop the split column to have test and validation carved."
        )
    return table.assign(split=split)


def _stripped_labels(labels: pd.Series, file: Path) -> pd.Series:
    """Labels without the spaces around them (`ants ` is `ants`, not a class of its own), said
    in one line when there were any."""
    stripped = labels.str.strip()
    if (changed := stripped.ne(labels)).any():
        shown = ", ".join(repr(label) for label in sorted(set(labels[changed]))[:5])
        log.warning(
            "%s: %d row(s) have spaces around their label (%s): stripped, so they count as "
            "the class without the spaces.",
            file,
            int(changed.sum()),
            shown,
        )
    return stripped
