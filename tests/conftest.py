"""Shared fixtures: the real images in ../shared/data and Hydra configs composed as the CLI does."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmark.config import register_configs

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
]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert HYMENOPTERA.is_dir(), f"tests need the real images in {SHARED_DATA} (see its README)"
    return SHARED_DATA


@pytest.fixture
def make_cfg(tmp_path: Path, shared_data: Path) -> Callable[..., DictConfig]:
    """Compose conf/ like `python -m benchmark`, with the store and outputs under tmp_path."""
    register_configs()

    def make(*overrides: str, data_root: Path | None = shared_data) -> DictConfig:
        pinned = [f"paths.data_root={data_root}"] if data_root else []
        with initialize_config_dir(str(CONF), version_base="1.3"):
            return compose(
                "config",
                overrides=[
                    *pinned,
                    f"paths.output_dir={tmp_path / 'out'}",
                    f"paths.cache_dir={tmp_path / 'cache'}",
                    f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                    *overrides,
                ],
            )

    return make
