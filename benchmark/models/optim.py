"""The optimizer and learning-rate schedule of a fit, built from the typed `optim` group.

One table per choice: adding an optimizer or a schedule is an `Optimizer` / `Scheduler` member
(config/schema.py, where OmegaConf refuses any other value when the config is composed) and one
entry here, no string comparison and no error of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from benchmark.config.schema import OptimConfig, Optimizer, Scheduler

ParamGroups = Iterable[dict[str, Any]]

OPTIMIZERS: dict[Optimizer, Callable[[ParamGroups, float, OptimConfig], torch.optim.Optimizer]] = {
    Optimizer.sgd: lambda groups, lr, o: torch.optim.SGD(
        groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay
    ),
    Optimizer.adamw: lambda groups, lr, o: torch.optim.AdamW(
        groups, lr=lr, weight_decay=o.weight_decay
    ),
}


def optimizer(groups: ParamGroups, lr: float, optim: OptimConfig) -> torch.optim.Optimizer:
    """`optim.optimizer` over the parameter groups (each with its own `lr`)."""
    return OPTIMIZERS[Optimizer(optim.optimizer)](groups, lr, optim)


def _cosine(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int) -> LRScheduler:
    """Cosine over the epochs, after `optim.warmup_epochs` of linear warm-up from a tenth."""
    schedules = torch.optim.lr_scheduler
    warmup = min(optim.warmup_epochs, epochs - 1)
    cosine = schedules.CosineAnnealingLR(optimizer, T_max=epochs - warmup)
    if not warmup:
        return cosine
    ramp = schedules.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return schedules.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


SCHEDULERS: dict[Scheduler, Callable[[torch.optim.Optimizer, OptimConfig, int], LRScheduler]] = {
    Scheduler.cosine: _cosine,
    Scheduler.step: lambda optimizer, o, _: torch.optim.lr_scheduler.StepLR(
        optimizer, o.step_size, o.gamma
    ),
    Scheduler.constant: lambda optimizer, o, _: torch.optim.lr_scheduler.ConstantLR(
        optimizer, factor=1.0
    ),
}


def scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, epochs: int) -> LRScheduler:
    """`optim.scheduler`, stepped once an epoch over `epochs` (at least 1)."""
    return SCHEDULERS[Scheduler(optim.scheduler)](optimizer, optim, max(1, epochs))
