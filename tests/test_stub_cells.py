"""Every strategy of conf/strategy/ as a whole cell (data, backbone, fit, test, MLflow run) on
`backbone=stub dataset=synthetic`: a few seconds each on a CPU, no download, no weight file. The
strategies are read from the folder, so a new one is run here without an edit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest
import torch
from omegaconf import OmegaConf

from benchmark.cell.run import run_cell
from benchmark.config.spec import CellSpec
from benchmark.data.acquire import tree_digest
from benchmark.data.manifest import build_manifest
from benchmark.data.sources import SYNTHETIC_SHA256
from benchmark.models.backbones import STUB_WIDTH, create_backbone
from tests.conftest import CONF, cell_spec

# A frozen backbone runs in eval mode on purpose (as `python -m benchmark` says, nothing).
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")

STRATEGIES = sorted(file.stem for file in (CONF / "strategy").glob("*.yaml"))

# A whole cell, shortened where only time is saved: two epochs, float32 (bf16's set-up costs
# seconds a cell on this CPU), no loader processes, no system-metrics sampler.
STUB_CELL = [
    "backbone=stub",
    "dataset=synthetic",
    "trainer.max_epochs=2",
    "trainer.precision=32-true",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "data.num_workers=0",
    "tracking.system_metrics=false",
]


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """paths.data_root for dataset=synthetic: made there once per session (not in the shared
    real data, which tests only read)."""
    return tmp_path_factory.mktemp("synthetic-data")


def strategy_overrides(strategy: str) -> list[str]:
    """The strategy as it is, but for a later unfreezing (two_stage's epoch 5), moved to the
    second of the cell's two epochs so that both phases run."""
    settings = OmegaConf.load(CONF / "strategy" / f"{strategy}.yaml")
    unfreezes = settings.get("unfreeze_at_epoch") is not None
    return [f"strategy={strategy}", *(["strategy.unfreeze_at_epoch=1"] if unfreezes else [])]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_runs_a_whole_cell_on_the_stub(
    make_cfg: Callable[..., CellSpec], synthetic_root: Path, strategy: str
) -> None:
    spec = make_cfg(*STUB_CELL, *strategy_overrides(strategy), data_root=synthetic_root)
    summary = run_cell(spec)
    run = mlflow.MlflowClient(spec.tracking.uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy"] == strategy and run.data.params["backbone"] == "stub"
    assert 0.0 <= run.data.metrics["test_acc"] <= 1.0


def test_the_stub_and_the_synthetic_data_are_the_same_everywhere(tmp_path: Path) -> None:
    """The same images (bytes) in any folder, so the same data digest and cell keys; the stub's
    weights the same in every cell, the cell's generator untouched; both named from conf/."""
    spec = cell_spec("backbone=stub", "dataset=synthetic", f"paths.output_dir={tmp_path}")
    first, second = (
        build_manifest(spec.dataset, tmp_path / name, seed=0) for name in ("one", "two")
    )
    assert tree_digest(tmp_path / "one" / "synthetic") == SYNTHETIC_SHA256
    assert first.sha256 == second.sha256 and first.content_sha256 == second.content_sha256
    assert first.classes == ["blue", "green", "red"]
    assert set(first.frame.split) == {"train", "val", "test"}
    state = torch.get_rng_state()
    one, two = create_backbone(spec.backbone.name), create_backbone("stub")
    assert torch.equal(torch.get_rng_state(), state)  # the cell's generator, as it was
    assert one.num_features == STUB_WIDTH
    for a, b in zip(one.model.state_dict().values(), two.model.state_dict().values(), strict=True):
        assert a.equal(b)


def test_callbacks_early_stopping_ends_the_cells_fit_early_and_names_it_in_the_key(
    make_cfg: Callable[..., CellSpec], synthetic_root: Path
) -> None:
    """`callbacks=early_stopping` (conf/callbacks/): Lightning's EarlyStopping in the cell's fit,
    which stops after `patience` epochs without a better val_acc; the callback is in the cell's
    key (it changes what runs), and a cell without one keeps the key it had."""
    from benchmark.tracking.identity import cell_key

    # At lr 0 nothing learns: val_acc never rises after the first epoch.
    still = [*STUB_CELL, "trainer.max_epochs=8", "strategy.lr=0", "optim.weight_decay=0"]
    plain = make_cfg(*still, data_root=synthetic_root)
    stopping = make_cfg(*still, "callbacks=early_stopping", "callbacks.early_stopping.patience=2",
                        data_root=synthetic_root)  # fmt: skip
    assert plain.callbacks is None and cell_key(plain, "0") != cell_key(stopping, "0")
    summary = run_cell(stopping)
    run = mlflow.MlflowClient(stopping.tracking.uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["callbacks.early_stopping.patience"] == "2"
    assert run.data.metrics["epochs_run"] == 3  # epoch 1, then 2 without a better val_acc
