"""The boundary: a composed Hydra config becomes one typed, frozen `CellSpec`, once, at an entry
point (the command, the launchers, the tools). Below it nothing reads a DictConfig: functions
take the spec, or the groups of it they need (`spec.strategy`, `spec.optim`...), which are the
schema's own dataclasses (`OmegaConf.to_object`), changed only with `dataclasses.replace`.

The decisions every layer used to re-derive from keys live here, once: whether the backbone is
frozen, what the head trains on (`InputKind`), whether the budget is partial (`debug`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from benchmark.config.schema import (
    AugmentConfig,
    BackboneConfig,
    BatchNorm,
    ColourConfig,
    Config,
    DataConfig,
    DatasetConfig,
    Fit,
    HeadConfig,
    HeadInit,
    OptimConfig,
    PathsConfig,
    ProtocolConfig,
    Selection,
    SpeedConfig,
    StrategyConfig,
    TrackingConfig,
    TuneConfig,
)


class InputKind(str, Enum):
    """What the head trains on (the run param `input`)."""

    features = "features"  # a frozen backbone's features, extracted once
    feature_views = "feature_views"  # ...of `speed.augmented_views` augmented views per image
    images = "images"  # the backbone runs every epoch

    def param(self, views: int) -> str:
        """The run param's value (`features:4views` for cached augmented views)."""
        return f"features:{views}views" if self is InputKind.feature_views else self.value


@dataclass(frozen=True)
class CellSpec:
    """One cell of the grid, typed: every group of conf/ as its schema dataclass, the Lightning
    Trainer's and loggers' arguments as plain mappings (they pass through to Lightning)."""

    dataset: DatasetConfig
    colour: ColourConfig
    strategy: StrategyConfig
    backbone: BackboneConfig
    head: HeadConfig
    augment: AugmentConfig
    trainer: Mapping[str, Any]
    logger: Mapping[str, Any]
    callbacks: Mapping[str, Any] | None
    optim: OptimConfig
    protocol: ProtocolConfig
    tune: TuneConfig
    data: DataConfig
    speed: SpeedConfig
    paths: PathsConfig
    tracking: TrackingConfig
    seed: int = 0
    rerun: bool = False
    plan: bool = False
    verbose: bool = False

    # ------------------------------------------------------------ decisions, defined once

    @property
    def frozen(self) -> bool:
        """The backbone never trains and runs as at inference: no stage trains, BatchNorm keeps
        ImageNet statistics and nothing unfreezes later (two_stage is not frozen)."""
        strategy = self.strategy
        return (
            strategy.trainable_stages == 0
            and strategy.bn in (BatchNorm.eval, BatchNorm.frozen)
            and strategy.unfreeze_at_epoch is None
        )

    @property
    def head_only(self) -> bool:
        """Only the head ever gets gradients (BatchNorm may still drift: freeze_bn_train)."""
        return self.strategy.trainable_stages == 0 and self.strategy.unfreeze_at_epoch is None

    @property
    def backbone_lr_factor_key(self) -> str:
        """The key of the factor the backbone's rate is the head's times: two_stage's
        `strategy.unfreeze_lr_factor` (the stages it unfreezes), else `optim.backbone_lr_factor`."""
        if self.strategy.unfreeze_at_epoch is not None:
            return "strategy.unfreeze_lr_factor"
        return "optim.backbone_lr_factor"

    @property
    def distributed(self) -> bool:
        """DDP: every rank would extract the features itself."""
        return "ddp" in str(self.trainer.get("strategy", "")).lower()

    @property
    def probe(self) -> bool:
        return self.strategy.fit == Fit.lbfgs

    @property
    def probe_head(self) -> bool:
        """LP-FT: the head starts as the linear probe fitted on the frozen backbone's features."""
        return self.strategy.head_init == HeadInit.probe

    @property
    def max_eval(self) -> bool:
        """protocol=study: the evaluation split is read after every epoch, its maximum kept."""
        return self.protocol.selection == Selection.max_eval

    def input_kind(self, augmented: bool) -> InputKind:
        """What the head trains on, given whether the training images are augmented."""
        if self.probe:
            return InputKind.features  # the rules guarantee a frozen, single-device backbone
        if not (self.frozen and self.speed.feature_cache) or self.distributed:
            return InputKind.images
        if not augmented:
            return InputKind.features
        return InputKind.feature_views if self.speed.augmented_views else InputKind.images

    @property
    def name(self) -> str:
        """dataset/colour/strategy/backbone/seed=N: the cell's name in logs and MLflow."""
        return (
            f"{self.dataset.name}/{self.colour.name}/{self.strategy.name}/"
            f"{self.backbone.name}/seed={self.seed}"
        )

    @property
    def progress_bar(self) -> bool:
        return bool(self.trainer.get("enable_progress_bar", True))

    @property
    def output_dir(self) -> Path:
        return Path(self.paths.output_dir)

    @property
    def cache_dir(self) -> Path:
        return Path(self.paths.cache_dir)

    @property
    def max_epochs(self) -> int:
        return int(self.trainer.get("max_epochs", 1))

    def with_trainer(self, **arguments: Any) -> CellSpec:
        """The same cell with these Trainer arguments set."""
        return dataclasses.replace(self, trainer={**self.trainer, **arguments})

    def as_dict(self) -> dict[str, Any]:
        """The resolved config as plain values (Enums as their names): what `config.yaml` and
        the run params hold, and what the cell key hashes."""
        return {field.name: plain(getattr(self, field.name)) for field in dataclasses.fields(self)}


def plain(value: Any) -> Any:
    """Dataclasses, mappings and sequences as dicts and lists of plain values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value


def from_config(cfg: DictConfig) -> CellSpec:
    """THE boundary: the composed config (its `hydra` node, if any, left out), resolved and
    converted to the schema's dataclasses. Called by entry points only."""
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, Config):  # composed without the schema (a test's bare config)
        typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    groups = {f.name: getattr(typed, f.name) for f in dataclasses.fields(Config)}
    return CellSpec(**groups)
