"""Typed schema behind `conf/`: a misspelt key or a wrong type fails when the config is composed,
before any data is touched or any run is opened.

Each dataclass is the schema of one config group, and each group mirrors one module:
`dataset` -> `benchmark.data`, `backbone` and `strategy` -> `benchmark.models`,
`trainer` -> Lightning's Trainer (arguments pass through), `tracking` -> `benchmark.tracking`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DatasetConfig:
    name: str = MISSING
    # imagefolder: the folder of class folders (or of train/, val/, test/ holding them).
    root: str | None = None
    # csv: a file with columns path,label[,split]; relative paths are relative to it.
    file: str | None = None
    # A subset of the classes (folder names); None takes every class found.
    classes: list[str] | None = None
    # caltech256: keep 257.clutter as a class, as the study did.
    include_clutter: bool = True
    # Without an official test split: `random` (stratified, fixed by split_seed for every run)
    # or `sorted` (the study's: the last test_fraction of each class's sorted file names).
    test_split: str = "random"
    test_fraction: float = 0.2
    split_seed: int = 0
    # Share of each class of the training data held back as the validation split that selects
    # the checkpoint; drawn with the run's seed. The test split is never used for selection.
    val_fraction: float = 0.2
    # Fetch the official files (URL or Kaggle) when the data is not under paths.data_root.
    download: bool = True


@dataclass
class ColourConfig:
    name: str = MISSING
    # Luminance only, replicated to the backbone's three input channels.
    grayscale: bool = False


@dataclass
class StrategyConfig:
    name: str = MISSING
    # False: the backbone is frozen (no gradients, BatchNorm statistics fixed); the head learns.
    train_backbone: bool = True
    lr: float = 1e-3


@dataclass
class BackboneConfig:
    name: str = MISSING
    # A local state-dict file with the ImageNet weights; overrides packaged or downloaded weights.
    weights_path: str | None = None


@dataclass
class OptimConfig:
    """SGD with momentum and a cosine schedule over `trainer.max_epochs`."""

    momentum: float = 0.9
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0


@dataclass
class DataConfig:
    batch_size: int = 32
    num_workers: int = 2


@dataclass
class PathsConfig:
    data_root: str = "${oc.env:BENCHMARK_DATA_ROOT,data}"
    # Remembered image checks and the split manifests, beside the data.
    cache_dir: str = "${paths.data_root}/.benchmark_cache"
    # Where checkpoints of this run go; Hydra's per-run folder by default.
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class TrackingConfig:
    # None: a SQLite store `mlflow.db` in the current directory (MLflow's own default).
    uri: str | None = "${oc.env:MLFLOW_TRACKING_URI,null}"
    experiment: str = "benchmark"


@dataclass
class Config:
    dataset: DatasetConfig = MISSING
    colour: ColourConfig = MISSING
    strategy: StrategyConfig = MISSING
    backbone: BackboneConfig = MISSING
    # Keyword arguments of lightning.pytorch.Trainer, instantiated as they are.
    trainer: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
