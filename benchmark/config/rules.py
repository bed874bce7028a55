"""The rules a composed config must satisfy before a cell runs: every number in its range, and
the cross-group rules (a protocol without a validation split tunes nothing, a probe needs its C
values). Checked once, at the entry points, before any data is read or any run opened."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

from benchmark.config.schema import Fit, Selection

# (key, test, what it must be): every number a cell reads, checked on the composed config
# before any data is touched or any run is opened (`python -m benchmark` refuses the cell).
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("trainer.max_epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    ("data.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("data.num_workers", lambda v: v >= 0, "an integer >= 0"),
    ("dataset.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("dataset.test_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    ("strategy.lr", lambda v: v > 0, "> 0"),
    ("strategy.trainable_stages", lambda v: v is None or v >= 0, "null (all) or >= 0"),
    ("strategy.unfreeze_at_epoch", lambda v: v is None or v >= 1, "null or >= 1"),
    ("strategy.unfreeze_stages", lambda v: v is None or v >= 1, "null (all) or >= 1"),
    ("strategy.unfreeze_lr_factor", lambda v: v > 0, "> 0"),
    ("strategy.probe_c", lambda v: all(c > 0 for c in v), "positive numbers"),
    ("head.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("head.hidden", lambda v: all(w >= 1 for w in v), "widths >= 1"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.lr_factor", lambda v: v > 0, "> 0"),
    ("optim.backbone_lr_factor", lambda v: v >= 0, ">= 0"),
    ("optim.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.step_size", lambda v: v >= 1, ">= 1"),
    ("optim.gamma", lambda v: v > 0, "> 0"),
    ("optim.early_stopping_patience", lambda v: v is None or v >= 1, "null or >= 1"),
    ("speed.augmented_views", lambda v: v >= 0, ">= 0"),
    ("tune.trials", lambda v: v is None or v >= 1, "null (no tuning) or >= 1"),
    ("tune.epochs", lambda v: v is None or v >= 1, "null (the cell's) or >= 1"),
    (
        "tune.lr_range",
        lambda v: v is None or (len(v) == 2 and 0 < v[0] < v[1]),
        "null or [low, high] with 0 < low < high",
    ),
    (
        "tune.weight_decay_range",
        lambda v: v is None or (len(v) == 2 and 0 < v[0] < v[1]),
        "null or [low, high] with 0 < low < high",
    ),
]


class ConfigError(ValueError):
    """A value out of its range: the message names each key and what it must be."""


def check(cfg: DictConfig) -> None:
    """Raise ConfigError listing every value out of range (see RULES)."""
    if found := problems(cfg):
        raise ConfigError(" ".join(found))


def problems(cfg: DictConfig) -> list[str]:
    """What is out of range in a composed config, one line each naming the key and the fix."""
    from omegaconf import OmegaConf

    found = []
    for key, valid, requirement in RULES:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None and not requirement.startswith("null"):
            continue  # not in this config (a trainer without the key): Lightning's default
        try:
            ok = valid(value)
        except TypeError:
            ok = False
        if not ok:
            found.append(f"{key}={value}: must be {requirement} (set {key}=...).")
    if cfg.protocol.selection == Selection.max_eval:
        if cfg.strategy.fit == Fit.lbfgs:
            found.append(
                f"protocol={cfg.protocol.name} has no linear probe (the study fine-tuned and "
                "froze): use strategy=finetune or strategy=freeze with it."
            )
        if cfg.dataset.val_fraction > 0:
            found.append(
                f"protocol={cfg.protocol.name} reads the evaluation split every epoch and "
                f"carves no validation split: dataset.val_fraction={cfg.dataset.val_fraction} "
                "must be 0."
            )
    if cfg.tune.trials and cfg.strategy.fit == Fit.lbfgs:
        found.append(
            "strategy=linear_probe already chooses its C on the validation split: tune.trials "
            "is for the strategies fitted with SGD (drop tune.trials)."
        )
    if cfg.tune.trials and cfg.protocol.selection == Selection.max_eval:
        found.append(
            f"protocol={cfg.protocol.name} has no validation split to tune on: drop tune.trials."
        )
    if cfg.strategy.fit == Fit.lbfgs and not cfg.strategy.probe_c:
        found.append("strategy.probe_c is empty: give the C values to choose from.")
    return found
