"""The rules a composed config must satisfy before a cell runs: every number in its range, and
the cross-group rules (a protocol without a validation split tunes nothing, a probe needs its C
values). Checked once, at the entry points, before any data is read or any run opened."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from benchmark.config.spec import CellSpec


@dataclass(frozen=True)
class Rule:
    """What one key of the composed config must be: `valid` tests a value that is set, and
    `requirement` says it in the refusal. A `nullable` key may be null (its default meaning is
    in `requirement`, "null (all) or >= 0"); any other key that is null is not in this config (a
    Trainer argument not set: Lightning's default), and so not checked either."""

    key: str
    valid: Callable[[Any], bool]
    requirement: str
    nullable: bool = False

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        try:
            return self.valid(value)
        except TypeError:
            return False


def _range(value: Any) -> bool:
    return len(value) == 2 and 0 < value[0] < value[1]


# Every number a cell reads, checked on the composed config before any data is touched or any
# run is opened (`python -m benchmark` refuses the cell).
SEED_RANGE = f"an integer in [0, {2**32 - 1}] (numpy's seed range)"
RANGE = "null or [low, high] with 0 < low < high"
RULES: list[Rule] = [
    Rule("seed", lambda v: isinstance(v, int) and 0 <= v < 2**32, SEED_RANGE),
    Rule("dataset.split_seed", lambda v: isinstance(v, int) and 0 <= v < 2**32, SEED_RANGE),
    Rule("trainer.max_epochs", lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    Rule("data.batch_size", lambda v: v >= 1, "an integer >= 1"),
    Rule("data.num_workers", lambda v: v >= 0, "an integer >= 0"),
    Rule("dataset.val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
    Rule("dataset.test_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
    Rule("strategy.lr", lambda v: v >= 0, ">= 0 (0: the do-nothing check)"),
    Rule("strategy.trainable_stages", lambda v: v >= 0, "null (all) or >= 0", nullable=True),
    Rule("strategy.unfreeze_at_epoch", lambda v: v >= 1, "null or >= 1", nullable=True),
    Rule("strategy.unfreeze_stages", lambda v: v >= 1, "null (all) or >= 1", nullable=True),
    Rule("strategy.unfreeze_lr_factor", lambda v: v > 0, "> 0"),
    Rule("strategy.probe_c", lambda v: all(c > 0 for c in v), "positive numbers"),
    Rule("strategy.ft_lr_factor", lambda v: v > 0, "null (1) or > 0", nullable=True),
    Rule("head.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    Rule("head.hidden", lambda v: all(w >= 1 for w in v), "widths >= 1"),
    Rule("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    Rule("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    Rule("optim.lr_factor", lambda v: v > 0, "> 0"),
    Rule("optim.backbone_lr_factor", lambda v: v >= 0, ">= 0"),
    Rule("optim.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    Rule("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    Rule("optim.step_size", lambda v: v >= 1, ">= 1"),
    Rule("optim.gamma", lambda v: v > 0, "> 0"),
    Rule("optim.early_stopping_patience", lambda v: v >= 1, "null or >= 1", nullable=True),
    Rule("protocol.min_steps", lambda v: v >= 1, "null (epochs alone) or >= 1", nullable=True),
    Rule("speed.augmented_views", lambda v: v >= 0, ">= 0"),
    Rule("tune.trials", lambda v: v >= 1, "null (no tuning) or >= 1", nullable=True),
    Rule("tune.epochs", lambda v: v >= 1, "null (the cell's) or >= 1", nullable=True),
    Rule("tune.lr_range", _range, RANGE, nullable=True),
    Rule("tune.weight_decay_range", _range, RANGE, nullable=True),
    Rule("tune.backbone_lr_factor_range", _range, RANGE, nullable=True),
    Rule(
        "tune.epochs_fraction",
        lambda v: 0 < v <= 1,
        "null (the cell's) or in (0, 1]",
        nullable=True,
    ),
    Rule("tune.reduction_factor", lambda v: v >= 2, "null (3) or >= 2", nullable=True),
    Rule("tune.min_epochs", lambda v: v >= 1, "null (1) or >= 1", nullable=True),
    Rule("tune.startup_trials", lambda v: v >= 1, "null (Optuna's 10) or >= 1", nullable=True),
    Rule(
        "tune.reuse_seed", lambda v: 0 <= v < 2**32, "null or a seed in [0, 2**32)", nullable=True
    ),
]


class ConfigError(ValueError):
    """A value out of its range: the message names each key and what it must be."""


def check(spec: CellSpec) -> None:
    """Raise ConfigError listing every value out of range and every rule broken."""
    if found := problems(spec):
        raise ConfigError(" ".join(found))


def value_at(spec: CellSpec, key: str) -> Any:
    """`strategy.lr` of the spec; None where the key is absent (a Trainer argument not set)."""
    if "." not in key:  # a top-level key: `seed`
        return getattr(spec, key, None)
    group, name = key.split(".", 1)
    holder = getattr(spec, group)
    if isinstance(holder, Mapping):
        return holder.get(name)
    return getattr(holder, name, None)


def problems(spec: CellSpec) -> list[str]:
    """What is out of range or contradictory in a cell, one line each naming the key and the
    fix: checked at the entry points, before any data is read or any run opened."""
    found = []
    for rule in RULES:
        value = value_at(spec, rule.key)
        if value is None and not rule.nullable:
            continue  # not in this config (a trainer without the key): Lightning's default
        if not rule.allows(value):
            found.append(f"{rule.key}={value}: must be {rule.requirement} (set {rule.key}=...).")
    if spec.max_eval and spec.dataset.val_fraction > 0:
        found.append(
            f"protocol={spec.protocol.name} reads the evaluation split every epoch and carves no "
            f"validation split: dataset.val_fraction={spec.dataset.val_fraction} must be 0."
        )
    if spec.tune.trials and spec.probe and spec.tune.name is None:  # tune=fair: its C grid
        found.append(
            "strategy=linear_probe already chooses its C on the validation split: tune.trials "
            "is for the strategies fitted with SGD (drop tune.trials)."
        )
    if spec.tune.trials and spec.max_eval:
        found.append(
            f"protocol={spec.protocol.name} has no validation split to tune on: drop tune.trials."
        )
    if spec.tune.epochs and spec.tune.epochs_fraction:
        found.append(
            "tune.epochs and tune.epochs_fraction both set a trial's epochs: drop one of them."
        )
    max_steps = spec.trainer.get("max_steps", -1)
    if (
        spec.protocol.min_steps
        and max_steps not in (None, -1)
        and max_steps < spec.protocol.min_steps
    ):
        found.append(
            f"protocol.min_steps={spec.protocol.min_steps} is more than trainer.max_steps="
            f"{max_steps}: lower protocol.min_steps or raise trainer.max_steps."
        )
    return found + probe_problems(spec)


def probe_problems(spec: CellSpec) -> list[str]:
    """The linear probe's rules, once for both of its uses: the cell's fit (strategy.fit=lbfgs,
    linear_probe) and LP-FT's first stage (strategy.head_init=probe, whose head starts as the
    probe and so must be linear). Either probe chooses its C among C values, on a validation
    split, from one device's features (the fit: those of a frozen backbone)."""
    if not (spec.probe or spec.probe_head):
        return []
    name, protocol, fit = spec.strategy.name, spec.protocol.name, spec.probe
    found = []
    if spec.probe_head and spec.head.hidden:
        found.append(
            f"strategy={name} fits its head as a linear probe: head={spec.head.name} has hidden "
            "layers (use head=linear)."
        )
    if not spec.strategy.probe_c:
        found.append(
            ("" if fit else f"strategy={name}: ")
            + "strategy.probe_c is empty: give the C values to choose from."
        )
    if fit and (not spec.frozen or spec.distributed):
        found.append(
            f"strategy.fit=lbfgs fits on one device's features of a frozen backbone, but "
            f"strategy={name} has trainable_stages={spec.strategy.trainable_stages}, "
            f"bn={spec.strategy.bn}, unfreeze_at_epoch={spec.strategy.unfreeze_at_epoch}, "
            f"trainer.strategy={spec.trainer.get('strategy', 'auto')}: use trainable_stages=0, "
            "bn=eval or frozen, no unfreezing and a single-device trainer (not trainer=ddp)."
        )
    elif spec.distributed:
        found.append(
            f"strategy={name} fits its probe on one device's features: use a single-device "
            "trainer (not trainer=ddp)."
        )
    if spec.max_eval and fit:
        found.append(
            f"protocol={protocol} has no linear probe (the study fine-tuned and froze): use "
            "strategy=finetune or strategy=freeze with it."
        )
    elif spec.max_eval:
        found.append(
            f"protocol={protocol} has no validation split for strategy={name}'s probe to choose "
            "its C on: use protocol=default."
        )
    return found
