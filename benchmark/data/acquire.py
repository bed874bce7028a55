"""Getting a dataset's official files onto disk: a public URL, torchvision's downloader, or
Kaggle's own client. Whatever the route, extraction happens in a temporary folder that is moved
into place only when complete, so an interrupted download never leaves a half-extracted tree."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmark.data.scan import DatasetError


def download_and_extract_archive(url: str, download_root: str, remove_finished: bool) -> None:
    """torchvision's downloader, imported when used (it brings torch)."""
    from torchvision.datasets import utils

    utils.download_and_extract_archive(url, download_root, remove_finished=remove_finished)


def extract_archive(archive: str, to: str, remove_finished: bool) -> None:
    from torchvision.datasets import utils

    utils.extract_archive(archive, to, remove_finished=remove_finished)


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file's relative path and content: checks what was extracted."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def install(
    fetch: Callable[[Path], Path], data_root: Path, name: str, fix: str, sha256: str | None = None
) -> Path:
    """Run `fetch(tmp) -> extracted folder` in a temporary folder under `data_root`, check it,
    then move it to `data_root/name`. Any failure becomes a DatasetError that ends with `fix`."""
    data_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_root, prefix=f".{name}-") as tmp:
        try:
            extracted = fetch(Path(tmp))
        except DatasetError as error:
            raise DatasetError(f"Could not fetch {name}: {error} Or by hand: {fix}") from error
        except Exception as error:  # network, HTTP, credentials, archive: the fix is the same
            raise DatasetError(f"Could not fetch {name} ({error}). {fix}") from error
        if sha256 and tree_digest(extracted) != sha256:
            raise DatasetError(f"{name} did not unpack to the expected files (checksum). {fix}")
        shutil.rmtree(data_root / name, ignore_errors=True)
        shutil.move(extracted, data_root / name)
    return data_root / name


def from_url(url: str, folder: str) -> Callable[[Path], Path]:
    """Download with progress and extract; the archive holds `folder` at its top."""

    def fetch(tmp: Path) -> Path:
        download_and_extract_archive(url, download_root=str(tmp), remove_finished=True)
        return tmp / folder

    return fetch


def kaggle_config() -> Path:
    return Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle")) / "kaggle.json"


def kaggle_credentials() -> bool:
    return kaggle_config().is_file() or {"KAGGLE_USERNAME", "KAGGLE_KEY"} <= set(os.environ)


def from_kaggle(
    slug: str, competition: bool, inner: Callable[[Path], Path]
) -> Callable[[Path], Path]:
    """Kaggle's own API with the user's credentials; `inner(folder)` returns the folder to install
    from what was unpacked (a competition's files arrive as nested zips)."""

    def fetch(tmp: Path) -> Path:
        if not kaggle_credentials():
            raise DatasetError(
                f"Kaggle credentials not found: put your API token at {kaggle_config()} (or set "
                "KAGGLE_USERNAME and KAGGLE_KEY) and `pip install kaggle`."
            )
        try:
            from kaggle.api.kaggle_api_extended import KaggleApi
        except ImportError as error:
            raise DatasetError("Kaggle's client is not installed: `pip install kaggle`.") from error
        api = KaggleApi()
        api.authenticate()
        download = tmp / "download"
        if competition:
            api.competition_download_files(slug, path=str(download), quiet=False)
        else:
            api.dataset_download_files(slug, path=str(download), quiet=False)
        while archives := sorted(download.glob("*.zip")):  # competitions nest zips in a zip
            for archive in archives:
                extract_archive(str(archive), str(download), remove_finished=True)
        return inner(download)

    return fetch
