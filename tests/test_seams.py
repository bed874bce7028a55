"""Unit tests of the strategies, the tuning and the callbacks on the fast seams (tests/stubs.py:
a stub backbone and a synthetic dataset): no real image, weight file, store or run, a second or
two each. The same behaviours are tested end to end on real images elsewhere."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from benchmark.cell import tune
from benchmark.models.classifier import MinSteps, make_model, recipe_callbacks
from benchmark.models.convergence import Convergence
from benchmark.models.features import FeatureDataModule
from tests.stubs import quiet_trainer, stub_backbone, synthetic_data

# What a trial's Trainer needs here besides the cell's (the cell resolves `auto` itself).
TRIAL = {"accelerator": "cpu", "devices": 1, "precision": "32-true"}


def model_for(spec):
    return make_model(spec.strategy, spec.head, spec.optim, stub_backbone(), 2)


def parts_changed(before: dict[str, torch.Tensor], model) -> set[str]:
    """Which parts' weights a fit moved: `head`, or the backbone's `stem`, `stage1`, `stage2`;
    a part named with `:bn` when only its BatchNorm running statistics moved."""
    changed = set()
    for name, value in model.state_dict().items():
        if torch.equal(before[name], value) or name.endswith("num_batches_tracked"):
            continue
        part = name.split(".")[1] if name.startswith("backbone.") else "head"
        running = "running_" in name
        changed.add(f"{part}:bn" if running else part)
    return {p for p in changed if not (p.endswith(":bn") and p.removesuffix(":bn") in changed)}


@pytest.mark.parametrize(
    ("overrides", "trained"),
    [
        (["strategy=finetune"], {"stem", "stage1", "stage2", "head"}),
        (["strategy=freeze"], {"head"}),  # BatchNorm in eval: its statistics stay
        (["strategy=freeze_bn_train"], {"head", "stem:bn", "stage1:bn", "stage2:bn"}),
        (["strategy=partial", "strategy.trainable_stages=1"], {"stage2", "head"}),
    ],
)
def test_each_strategy_trains_what_it_says(make_cfg, overrides, trained):
    model = model_for(make_cfg(*overrides))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quiet_trainer(max_epochs=1).fit(model, datamodule=synthetic_data())
    assert parts_changed(before, model) == trained


class PartsPerEpoch(Callback):
    def __init__(self) -> None:
        self.seen: list[set[str]] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self.before = {k: v.clone() for k, v in module.state_dict().items()}

    def on_train_epoch_end(self, trainer, module) -> None:
        self.seen.append(parts_changed(self.before, module))


def test_two_stage_trains_the_head_then_unfreezes_the_top_stage(make_cfg):
    spec = make_cfg(
        "strategy=two_stage", "strategy.unfreeze_at_epoch=1", "strategy.unfreeze_stages=1"
    )
    parts = PartsPerEpoch()
    trainer = quiet_trainer(
        max_epochs=2, callbacks=[*recipe_callbacks(spec.strategy, spec.optim), parts]
    )
    trainer.fit(model_for(spec), datamodule=synthetic_data())
    assert parts.seen[0] == {"head"}
    assert parts.seen[1] == {"head", "stage2"}  # BatchNorm of an unfrozen stage trains too


def test_min_steps_raises_the_epochs_to_the_step_budget():
    """32 training images at batch 8 are 4 steps an epoch: min_steps=10 needs 3 epochs."""
    trainer = quiet_trainer(max_epochs=1, min_steps=10, callbacks=[MinSteps()])
    spec_free = make_model_default()
    trainer.fit(spec_free, datamodule=synthetic_data())
    assert (trainer.current_epoch, trainer.global_step) == (3, 12)


def make_model_default():
    from benchmark.config.schema import HeadConfig, OptimConfig, StrategyConfig

    strategy = StrategyConfig(name="finetune", lr=0.01)
    return make_model(
        strategy, HeadConfig(name="linear"), OptimConfig(name="sgd_cosine"), stub_backbone(), 2
    )


def test_convergence_reports_the_last_epoch_and_the_best_one(make_cfg):
    convergence = Convergence()
    trainer = quiet_trainer(max_epochs=3, callbacks=[convergence])
    trainer.fit(
        model_for(make_cfg("strategy=finetune", "strategy.lr=0.05")), datamodule=synthetic_data()
    )
    metrics = convergence.metrics(trainer)
    assert metrics["epochs_run"] == 3 and 0 <= metrics["best_val_epoch"] <= 2
    assert metrics["final_train_acc"] > 0.5 and metrics["final_train_loss"] > 0  # it learnt


def test_tuning_on_the_stub_chooses_in_its_space_and_never_reads_the_test_split(
    make_cfg, monkeypatch
):
    def forbidden(self):
        raise AssertionError("a trial read the test split")

    monkeypatch.setattr(FeatureDataModule, "test_dataloader", forbidden)
    spec = make_cfg("strategy=freeze", "tune=fair", "tune.trials=3", "trainer.max_epochs=4")
    tuned = tune.choose(spec, synthetic_data(), model_for, **TRIAL)
    assert set(tuned.values) == {"strategy.lr", "optim.weight_decay"}  # a head alone: its wd
    assert 1e-4 <= tuned.values["strategy.lr"] <= 0.3
    assert [row["number"] for row in tuned.table] == [0, 1, 2] and 0 <= tuned.val_acc <= 1


def test_the_pruner_stops_a_hopeless_trial_on_the_stub(make_cfg, monkeypatch):
    """Two trials at lr 0.1, then one at 1e-6: successive halving compares it with them after
    its first epoch and prunes it; the good ones run all four."""
    create_study = tune.optuna.create_study

    def seeded(**kwargs):
        study = create_study(**kwargs)
        for lr in (0.1, 0.1, 1e-6):
            study.enqueue_trial({"strategy.lr": lr, "optim.backbone_lr_factor": 1.0})
        return study

    monkeypatch.setattr(tune.optuna, "create_study", seeded)
    spec = make_cfg(
        "strategy=finetune",
        "tune=fair",
        "tune.trials=3",
        "tune.epochs_fraction=0.5",
        "tune.min_epochs=1",  # compared after its first epoch
        "tune.lr_range=[1e-6,0.3]",
        "trainer.max_epochs=8",
    )
    tuned = tune.choose(spec, synthetic_data(), model_for, **TRIAL)
    assert [(r["state"], r["epochs"]) for r in tuned.table] == [
        ("COMPLETE", 4),
        ("COMPLETE", 4),
        ("PRUNED", 1),
    ], tuned.table
