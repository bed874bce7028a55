"""Equal tuning, for real (issue 32): every strategy of a cell spends the same budget of
trial-epochs, and pruning and the choice read the same score (a trial's best validation accuracy
so far), so a trial is never dropped for a number the choice would have kept. The trials here fit
a scripted module whose validation accuracy per epoch is given, so the search itself is tested,
in seconds, without images."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from benchmark.cell import tune
from tests.stubs import synthetic_data

SETTINGS = [
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


class Scripted(L.LightningModule):
    """Logs the given val_acc after each epoch, whatever it learns."""

    def __init__(self, curve: list[float]) -> None:
        super().__init__()
        self.curve = curve
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return (self.weight**2).sum() + 0.0 * batch[0].sum()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.log("val_acc", self.curve[min(self.current_epoch, len(self.curve) - 1)])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def by_lr(curves: dict[float, list[float]]):
    """make_model for tune.choose: the trial's learning rate picks its curve (the nearest one)."""

    def make(spec) -> Scripted:
        lr = spec.strategy.lr
        return Scripted(curves[min(curves, key=lambda known: abs(math.log(known / lr)))])

    return make


def enqueued(monkeypatch, *values: dict[str, float]) -> None:
    create_study = tune.optuna.create_study

    def seeded(**kwargs):
        study = create_study(**kwargs)
        for trial in values:
            study.enqueue_trial(trial)
        return study

    monkeypatch.setattr(tune.optuna, "create_study", seeded)


def test_a_trial_that_peaked_early_is_neither_pruned_at_its_end_nor_dropped(make_cfg, monkeypatch):
    """Trial 0 climbs to 0.74; trial 1 reaches 0.80 after its first epoch, then falls to 0.50.
    Its best (0.80) is the best of the search: it must be the choice. Pruning on the current
    epoch's 0.50 at the last epoch (rung 3 of successive halving) dropped it before."""
    wd = 1e-4
    enqueued(
        monkeypatch,
        {"strategy.lr": 0.01, "optim.weight_decay": wd},
        {"strategy.lr": 0.1, "optim.weight_decay": wd},
    )
    spec = make_cfg(
        "strategy=freeze",
        "tune=fair",
        "tune.trials=2",
        "tune.epochs_fraction=0.3",
        "tune.min_epochs=1",
        *SETTINGS,
    )
    assert tune.trial_epochs(spec) == 3
    curves = {0.01: [0.70, 0.72, 0.74], 0.1: [0.80, 0.60, 0.50]}
    chosen = tune.choose(spec, synthetic_data(), by_lr(curves))
    rows = {row["number"]: row for row in chosen.table}
    assert rows[1]["state"] == "COMPLETE" and rows[1]["val_acc"] == pytest.approx(0.80)
    assert chosen.values["strategy.lr"] == pytest.approx(0.1)
    assert chosen.val_acc == pytest.approx(0.80)


def test_a_pruned_trial_with_the_best_score_is_chosen(make_cfg, monkeypatch):
    """A trial pruned on its score can still hold the best score seen (here 0.9 at epoch 1,
    pruned at epoch 3 of 9 against trials that reached 0.95 by then): the choice reads the
    same score, so when it is the best of all it is chosen, pruned or not."""
    wd = 1e-4
    enqueued(
        monkeypatch,
        {"strategy.lr": 0.01, "optim.weight_decay": wd},
        {"strategy.lr": 0.1, "optim.weight_decay": wd},
    )
    spec = make_cfg(
        "strategy=freeze", "tune=fair", "tune.trials=2", "tune.epochs_fraction=0.9", *SETTINGS
    )
    curves = {
        0.01: [0.5, 0.6, 0.95, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
        0.1: [0.97, 0.5, 0.5] + [0.5] * 6,
    }
    chosen = tune.choose(spec, synthetic_data(), by_lr(curves))
    assert chosen.values["strategy.lr"] == pytest.approx(0.1)
    assert chosen.val_acc == pytest.approx(0.97)


@pytest.mark.parametrize("epochs", [10, 7])
def test_every_strategy_of_a_cell_spends_the_same_trial_budget(make_cfg, epochs):
    """finetune, lp_ft and freeze of one cell under tune=fair: the same dimensions over the
    same ranges where they apply, the same budget in trial-epochs, all of it spent (pruned
    trials' epochs go to further trials)."""
    curves = {lr: [0.9 - abs(math.log10(lr) + 2) / 10 - 0.02 * e for e in range(9)]
              for lr in (1e-4, 1e-3, 1e-2, 1e-1)}  # fmt: skip
    spent, spaces = {}, {}
    for strategy in ("finetune", "lp_ft", "freeze"):
        spec = make_cfg(
            f"strategy={strategy}",
            "tune=fair",
            "tune.trials=100",  # the budget binds, not the count
            f"trainer.max_epochs={epochs}",
            *SETTINGS,
        )
        spaces[strategy] = tune.search_space(spec)
        chosen = tune.choose(spec, synthetic_data(), by_lr(curves))
        spent[strategy] = (chosen.budget_epochs, sum(int(r["epochs"]) for r in chosen.table))
    budget = round(2.0 * epochs)
    assert spent == {s: (budget, budget) for s in spent}
    common = {"strategy.lr": (1e-4, 0.3), "optim.weight_decay": (1e-6, 1e-2)}
    assert spaces["freeze"] == common
    assert (
        spaces["finetune"] == spaces["lp_ft"] == common | {"optim.backbone_lr_factor": (0.1, 1.0)}
    )


def test_lp_ft_tunes_the_rate_of_what_trains(make_cfg):
    """lp_ft's ft_lr_factor (0.1) scales its configured rate, never a searched one: its trials
    try the same rates as finetune's."""
    spec = make_cfg("strategy=lp_ft", "tune=fair")
    assert spec.strategy.ft_lr_factor == 0.1
    tuned = tune.with_values(spec, {"strategy.lr": 0.2})
    assert tuned.strategy.lr == 0.2 and tuned.strategy.ft_lr_factor is None


def test_the_first_trials_are_the_recipe_then_an_even_cover_of_the_space(make_cfg):
    """tune.recipe_first: the untuned values (lp_ft's rate as the rate of what trains, clipped
    into the ranges) are trial 1; tune.startup=sobol: the next ones a scrambled Sobol sequence
    seeded by the cell's seed, inside the ranges, each dimension's range covered."""
    spec = make_cfg("strategy=finetune", "tune=fair", "optim.weight_decay=0")
    space = tune.search_space(spec)
    placed = tune.first_trials(spec, space)
    assert placed[0] == {
        "strategy.lr": spec.strategy.lr,
        "optim.weight_decay": 1e-6,  # 0 clipped into the range
        "optim.backbone_lr_factor": 1.0,
    }
    startup = placed[1:]
    assert len(startup) == spec.tune.startup_trials == 4
    for key, (low, high) in space.items():
        logs = sorted(math.log(p[key]) for p in startup)
        assert low <= math.exp(logs[0]) and math.exp(logs[-1]) <= high
        # one point in each quarter of the (log) range: covered, not clustered
        quarters = {int(4 * (v - math.log(low)) / (math.log(high) - math.log(low))) for v in logs}
        assert quarters == {0, 1, 2, 3}, (key, logs)
    assert tune.first_trials(spec, space) == placed  # seeded
    other = make_cfg("strategy=finetune", "tune=fair", "optim.weight_decay=0", "seed=1")
    assert tune.first_trials(other, space)[1:] != startup
    lp_ft = make_cfg("strategy=lp_ft", "tune=fair")
    assert tune.first_trials(lp_ft, space)[0]["strategy.lr"] == pytest.approx(
        lp_ft.strategy.lr * lp_ft.strategy.ft_lr_factor
    )


def test_the_recipe_is_trial_one_and_chosen_when_nothing_beats_it(make_cfg):
    """Whatever the sampler finds, a tuned cell is never worse on validation than its recipe at
    a trial's length: the recipe's curve (lr 0.03 here) is the best, and it is chosen."""
    curves = {lr: [0.5, 0.6, 0.7] for lr in (1e-4, 1e-3, 1e-2, 0.1, 0.3)} | {0.03: [0.8, 0.9, 0.95]}
    spec = make_cfg("strategy=finetune", "strategy.lr=0.03", "tune=fair", *SETTINGS)
    chosen = tune.choose(spec, synthetic_data(), by_lr(curves))
    assert chosen.table[0]["strategy.lr"] == pytest.approx(0.03)
    assert chosen.values["strategy.lr"] == pytest.approx(0.03)
    assert chosen.val_acc == pytest.approx(0.95)
