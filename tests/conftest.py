"""Shared fixtures: the real images in ../shared/data and Hydra configs composed as the CLI does."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import ViewType
from omegaconf import DictConfig

from benchmark.config.schema import register_configs
from benchmark.config.spec import CellSpec, from_config
from benchmark.tracking.identity import HARNESS_TAG

PROJECT = Path(__file__).resolve().parents[1]
CONF = PROJECT / "conf"
# The real images: ../shared/data, or where BENCHMARK_TEST_DATA says (make gpu-check points it at
# the images of .gpu-pack on a GPU machine, where ../shared does not travel).
SHARED_DATA = Path(os.environ.get("BENCHMARK_TEST_DATA", PROJECT.parent / "shared" / "data"))
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"

# Tiny settings that still run every stage (fit, validation, checkpoint, test) on real images.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "data.batch_size=4",
    "data.num_workers=0",
    # A frozen backbone's features would be extracted for every image, whatever the limits
    # above; tests/test_speed.py covers that path on a small folder.
    "speed.feature_cache=false",
    # float32: on this CPU bf16 autocast's first training step costs 5-7 s of kernel set-up per
    # cell, and one batch does not test the fast path. It has its own tests (test_speed,
    # test_config); test_e2e's four-cell grid runs the default.
    "trainer.precision=32-true",
]


# TINY with a few batches of two epochs: enough for a curve, a choice, a cache hit.
FEW = [o for o in TINY if not o.startswith(("trainer.limit_", "speed."))] + [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules with end-to-end tests (`e2e`: minutes of subprocesses) first, the rest in their
    order: `make test` hands whole modules to its workers in this order as they free up (--dist
    loadfile --no-loadscope-reorder; xdist would otherwise sort them by test count), and
    a long module handed out last would run alone at the end."""
    heavy = {item.module for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.module not in heavy)  # stable: the order within stays


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert HYMENOPTERA.is_dir(), f"tests need the real images in {SHARED_DATA} (see its README)"
    return SHARED_DATA


@pytest.fixture
def ants_and_bees(tmp_path: Path, shared_data: Path) -> Path:
    """A small image folder of real photos: 15 ants and 15 bees."""
    root = tmp_path / "antsbees"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for photo in sorted((shared_data / "hymenoptera_data/train" / label).glob("*.jpg"))[:15]:
            shutil.copy(photo, root / label / photo.name)
    return root


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the session's cells, in this process and in the commands the tests
    start ($BENCHMARK_CACHE_DIR): the real images are checked, hashed and decoded once, not once
    per test (every cache entry is keyed by the files and the settings, which is what the caches
    promise, and built under a file lock). Tests of the caches themselves use their own."""
    cache = tmp_path_factory.mktemp("shared-cache")
    saved = os.environ.get("BENCHMARK_CACHE_DIR")
    os.environ["BENCHMARK_CACHE_DIR"] = str(cache)
    yield cache
    if saved is None:
        os.environ.pop("BENCHMARK_CACHE_DIR", None)
    else:
        os.environ["BENCHMARK_CACHE_DIR"] = saved


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new MLflow SQLite store, tables created and migrated by MLflow itself, once per session:
    creating one costs 2-4 s of schema migrations, which most tests would pay for each store."""
    file = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{file}").search_experiments()
    return file


@pytest.fixture
def tmp_store(tmp_path: Path, empty_store: Path) -> Path:
    """tmp_path/mlflow.db (the default store of a command run in tmp_path) as a copy of
    `empty_store`, for tests whose point is not its creation: the four-cell grid of test_e2e
    creates one, and test_tracking_concurrency has processes race to create one."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    return tmp_path / "mlflow.db"


def compose_config(*overrides: str) -> DictConfig:
    """conf/ composed as `python -m benchmark overrides` composes it, with Hydra's compose API in
    a context manager: Hydra's global state lives for the composition only, so this is a plain
    function, callable from any test or helper (no fixture, no @hydra.main, nothing left set).
    Paths, store and cache are conf/'s defaults unless the overrides say otherwise; the
    `compose_cfg` fixture pins them under the test's tmp_path."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def cell_spec(*overrides: str) -> CellSpec:
    """`compose_config`, then through the boundary as the entry points do: the typed cell.
    paths.output_dir, which Hydra sets per run (the job's folder), is outputs/ unless an
    override says where (a later override of a key wins)."""
    return from_config(compose_config("paths.output_dir=outputs", *overrides))


@pytest.fixture
def compose_cfg(
    tmp_path: Path, shared_data: Path, shared_cache: Path, empty_store: Path
) -> Callable[..., DictConfig]:
    """Compose conf/ like `python -m benchmark`, with the store and outputs under tmp_path and
    the session's cache (pass paths.cache_dir=... for a test's own). The store starts as a copy
    of `empty_store`; `store=False` leaves it to be created by the code under test."""

    def make(
        *overrides: str, data_root: Path | None = shared_data, store: bool = True
    ) -> DictConfig:
        if store and not (tmp_path / "mlflow.db").exists():
            shutil.copy(empty_store, tmp_path / "mlflow.db")
        pinned = [f"paths.data_root={data_root}"] if data_root else []
        return compose_config(
            *pinned,
            f"paths.output_dir={tmp_path / 'out'}",
            f"paths.cache_dir={shared_cache}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        )

    return make


@pytest.fixture
def make_cfg(compose_cfg: Callable[..., DictConfig]) -> Callable[..., CellSpec]:
    """`compose_cfg`, then through the boundary as the entry points do: the typed cell (as
    `cell_spec`, with the test's paths)."""

    def make(*overrides: str, **options: Any) -> CellSpec:
        return from_config(compose_cfg(*overrides, **options))

    return make


@pytest.fixture(autouse=True)
def no_stray_runs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """After every test, every run in the test's store (tmp_path/mlflow.db), in any experiment,
    is the harness's: a cell or a sweep, tagged as such, none in MLflow's "Default" experiment
    (where a run opened by mistake, e.g. by a DDP rank other than 0, would land). Tests that
    write foreign runs on purpose are marked `foreign_runs`."""
    yield
    store = tmp_path / "mlflow.db"
    if request.node.get_closest_marker("foreign_runs") or not store.is_file():
        return
    client = mlflow.MlflowClient(f"sqlite:///{store}")
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)
    names = {e.experiment_id: e.name for e in experiments}
    stray = [
        f"{run.info.run_name} in {names[run.info.experiment_id]!r}"
        for run in runs
        if run.data.tags.get(HARNESS_TAG) != "benchmark"
        or names[run.info.experiment_id] == "Default"
    ]
    assert not stray, f"runs the harness did not mean to make: {stray}"
