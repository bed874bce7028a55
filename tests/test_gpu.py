"""The GPU paths, on a CUDA device: `pytest -m gpu` (and `make gpu-check` on a lent GPU machine).

Each cell runs through the command line as users run it, with tiny settings: one CUDA cell in
bf16, channels-last batches and bf16 autocast, torch.compile, hydra/launcher=gpus on one GPU, and
trainer=ddp on one device.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark.config.schema import DatasetConfig
from benchmark.data import build_manifest
from benchmark.data.loading import ManifestDataModule
from benchmark.models.backbones import create_backbone
from tests.conftest import PROJECT
from tests.conftest import TINY as CPU_TINY
from tests.test_e2e import runs_in

# The GPU's own precision (trainer=gpu: bf16-mixed), not the CPU tests' float32.
TINY = [o for o in CPU_TINY if not o.startswith("trainer.precision")]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.e2e,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def benchmark(*args: str, cwd: Path, data_root: Path) -> subprocess.CompletedProcess:
    """`python -m benchmark ARGS` in `cwd`, its store `cwd/mlflow.db`. PYTHONPATH keeps what
    the caller had (make gpu-check installs the pack's wheels there)."""
    env = {**os.environ, "BENCHMARK_DATA_ROOT": str(data_root)}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT), os.environ.get("PYTHONPATH", "")) if p
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "benchmark", *args, f"paths.cache_dir={cwd / 'cache'}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def said(done: subprocess.CompletedProcess) -> str:
    return done.stdout[-3000:] + done.stderr[-3000:]


def finished_on_the_gpu(store: Path, cells: int) -> pd.DataFrame:
    runs = runs_in(store)
    assert len(runs) == cells and set(runs.status) == {"FINISHED"}, runs.get("tags.error")
    assert set(runs["tags.device"]) == {torch.cuda.get_device_name(0)}
    assert set(runs["tags.precision"]) == {"bf16-mixed"}
    assert (runs["metrics.peak_gpu_mem_mb"] > 0).all()
    assert runs["metrics.test_acc"].between(0, 1).all()
    return runs


def test_a_cuda_cell_finishes_in_bf16_and_names_its_gpu(tmp_path, shared_data):
    done = benchmark("trainer=gpu", *TINY, cwd=tmp_path, data_root=shared_data)
    assert done.returncode == 0, said(done)
    assert "test_acc=" in done.stdout + done.stderr
    runs = finished_on_the_gpu(tmp_path / "mlflow.db", cells=1)
    assert runs["params.speed.channels_last"].iloc[0] == "True"
    assert (runs["metrics.train_images_per_s"] > 0).all()


def test_channels_last_batches_and_bf16_autocast_on_cuda(tmp_path, shared_data):
    """What a `trainer=gpu` cell does with a batch: uint8 to the GPU, normalised there into
    channels-last floats, through a channels-last backbone in bf16 autocast; the features agree
    with float32 in the default memory format."""
    manifest = build_manifest(
        DatasetConfig(name="hymenoptera"), shared_data, 0, tmp_path / "cache"
    ).frame
    backbone = create_backbone("efficientnet_lite0")
    data = ManifestDataModule(manifest, backbone.preprocess, False, 8, 0, channels_last=True)
    images, targets = next(iter(data.test_dataloader()))
    assert images.dtype == torch.uint8
    cuda = torch.device("cuda")
    images, targets = data.on_after_batch_transfer((images.to(cuda), targets.to(cuda)), 0)
    assert images.is_cuda and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)

    reference = copy.deepcopy(backbone.model).to(cuda).eval()
    model = backbone.model.to(cuda).to(memory_format=torch.channels_last).eval()
    weight = next(p for p in model.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            features = model(images)
        expected = reference(images.contiguous())
    assert features.dtype == torch.bfloat16 and torch.isfinite(features.float()).all()
    agreement = torch.nn.functional.cosine_similarity(features.float(), expected, dim=1)
    assert agreement.min() > 0.98, agreement


def test_a_compiled_cell_finishes_on_cuda(tmp_path, shared_data):
    done = benchmark(
        "trainer=gpu", "speed.compile=true", *TINY, cwd=tmp_path, data_root=shared_data
    )
    assert done.returncode == 0, said(done)
    runs = finished_on_the_gpu(tmp_path / "mlflow.db", cells=1)
    assert runs["params.speed.compile"].iloc[0] == "True"


def test_the_gpus_launcher_runs_two_cells_on_one_gpu(tmp_path, shared_data):
    done = benchmark(
        "-m",
        "hydra/launcher=gpus",
        "hydra.launcher.gpus=[0]",
        "trainer=gpu",
        "seed=0,1",
        *TINY,
        cwd=tmp_path,
        data_root=shared_data,
    )
    assert done.returncode == 0, said(done)
    assert "Launching 2 cells on GPUs 0" in done.stdout + done.stderr
    assert "Sweep done: 2 cells: 2 finished, 0 skipped, 0 failed." in done.stdout + done.stderr
    runs = finished_on_the_gpu(tmp_path / "mlflow.db", cells=2)
    assert sorted(runs["params.seed"]) == ["0", "1"] and runs["tags.sweep"].nunique() == 1


def test_a_ddp_cell_on_one_gpu(tmp_path, shared_data):
    done = benchmark("trainer=ddp", "trainer.devices=1", *TINY, cwd=tmp_path, data_root=shared_data)
    assert done.returncode == 0, said(done)
    runs = finished_on_the_gpu(tmp_path / "mlflow.db", cells=1)
    assert runs["params.trainer.strategy"].iloc[0] == "ddp"
