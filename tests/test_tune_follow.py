"""Tuning you can follow and browse (issue 36 A): a line per trial as it ends (pruned ones too)
and a closing line with the choice; the Optuna study kept in the cell's output folder, with the
same trials as an in-memory study; each trial an MLflow child run of the cell's run that no count
of cells takes for a cell."""

from __future__ import annotations

import logging
import math

import lightning as L
import mlflow
import optuna
import torch
from torch import nn

from benchmark.cell import tune
from benchmark.cell.run import run_cell
from benchmark.tracking import history, identity, store
from tests.conftest import FEW
from tests.stubs import synthetic_data

SETTINGS = [
    "trainer.precision=32-true",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
]


class Smooth(L.LightningModule):
    """Logs a validation accuracy that is a smooth function of the trial's values (best near
    lr 1e-2, weight decay 1e-4) and grows with the epoch: TPE's later suggestions depend on
    the scores it read, so a study that stored them differently would diverge."""

    def __init__(self, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.score = 0.9 - 0.1 * abs(math.log10(lr) + 2) - 0.05 * abs(math.log10(weight_decay) + 4)
        self.weight = nn.Parameter(torch.zeros(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return (self.weight**2).sum() + 0.0 * batch[0].sum()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        self.log("val_acc", self.score + 0.01 * self.current_epoch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def smooth(spec) -> Smooth:
    return Smooth(spec.strategy.lr, spec.optim.weight_decay)


def searched(chosen: tune.Tuned) -> list[tuple[object, ...]]:
    """Every trial as the search saw it: number, values, score, state, epochs."""
    return [tuple(sorted(row.items())) for row in chosen.table]


def test_a_kept_study_makes_the_same_trials_as_one_in_memory(make_cfg, monkeypatch):
    """tune=fair over 10 epochs: 4 random trials, then TPE on their scores, pruned by
    successive halving. Kept in <output_dir>/optuna.db, the same seed gives the same trials,
    values and choice as the in-memory study did before; the file holds them, under the cell's
    name, as optuna-dashboard reads it; a second tuning into the same folder replaces it."""
    spec = make_cfg("strategy=freeze", "tune=fair", *SETTINGS)
    kept = tune.choose(spec, synthetic_data(), smooth)
    assert kept.study == f"sqlite:///{spec.output_dir.resolve() / tune.STUDY_FILE}"
    assert len(kept.table) > 4, kept.table  # TPE modelled some of them
    assert {row["state"] for row in kept.table} == {"COMPLETE", "PRUNED"}
    monkeypatch.setattr(tune, "study_storage", lambda spec: None)
    in_memory = tune.choose(spec, synthetic_data(), smooth)
    assert in_memory.study is None
    assert searched(kept) == searched(in_memory)
    assert kept.values == in_memory.values
    monkeypatch.undo()
    again = tune.choose(spec, synthetic_data(), smooth)
    study = optuna.load_study(study_name=spec.name, storage=again.study)
    assert len(study.trials) == len(again.table)  # replaced, not appended to
    assert [t.params for t in study.trials] == [
        {k: v for k, v in row.items() if k in tune.search_space(spec)} for row in kept.table
    ]


def test_every_trial_is_said_as_it_ends_pruned_ones_too(make_cfg, monkeypatch, caplog):
    """Two good trials, then a hopeless one that successive halving prunes after its first
    epoch: three lines, `pruned at epoch 1` among them, then the choice in one line."""
    create_study = tune.optuna.create_study

    def seeded(**kwargs):
        study = create_study(**kwargs)
        for lr in (1e-2, 1e-2, 1e-4):
            study.enqueue_trial({"strategy.lr": lr, "optim.weight_decay": 1e-4})
        return study

    monkeypatch.setattr(tune.optuna, "create_study", seeded)
    spec = make_cfg(
        "strategy=freeze",
        "tune=fair",
        "tune.trials=3",
        "tune.epochs_fraction=0.5",
        "tune.budget_fraction=1.8",
        "tune.min_epochs=1",
        "trainer.max_epochs=6",
        *SETTINGS,
    )
    with caplog.at_level(logging.INFO, logger="benchmark"):
        chosen = tune.choose(spec, synthetic_data(), smooth)
    lines = [r.getMessage() for r in caplog.records if r.name == "benchmark"]
    trials = [line for line in lines if line.startswith("trial ")]
    assert len(trials) == 3, lines
    assert trials[0].startswith("trial 1/3: val_acc 0.9200 after 3 epoch(s) (strategy.lr=0.01")
    assert trials[2].startswith("trial 3/3 pruned at epoch 1: val_acc 0.7000 (strategy.lr=0.0001")
    assert trials[2].endswith("; 7/11 trial-epochs")  # 3 + 3 + 1 of round(1.8 x 6)
    closing = next(line for line in lines if line.startswith("tuned: "))
    assert closing.startswith("tuned: strategy.lr=0.01, optim.weight_decay=0.0001 (trial 1,")
    assert "3 trials: 2 completed, 1 pruned; 7/11 trial-epochs of the budget" in closing
    assert f"optuna-dashboard {chosen.study}" in lines[-1]


def test_trials_are_child_runs_of_the_cell_that_count_as_no_cell(make_cfg, ants_and_bees):
    """A tuned cell's trials: MLflow runs nested under the cell's run, each with its values,
    val_acc per epoch, best val_acc and state, FINISHED; tagged the harness's, kind `trial`,
    with no cell key: a relaunch finds the cell's run by its key, and the plan's history reads
    the trials as untimed non-cells."""
    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze", *FEW]
    summary = run_cell(make_cfg(*cell, "tune.trials=2"))
    client = mlflow.MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.run_id)
    trials = client.search_runs(
        [parent.info.experiment_id], f"tags.`{identity.KIND_TAG}` = '{identity.TRIAL_KIND}'"
    )
    assert len(trials) == 2
    for trial in sorted(trials, key=lambda run: run.data.tags["tune.trial"]):
        tags, params = trial.data.tags, trial.data.params
        assert tags["mlflow.parentRunId"] == summary.run_id
        assert tags[identity.HARNESS_TAG] == "benchmark" and identity.CELL_KEY_TAG not in tags
        assert tags["tune.state"] in {"COMPLETE", "PRUNED"} and trial.info.status == "FINISHED"
        assert {"strategy.lr", "optim.weight_decay"} <= set(params) and "dataset" not in params
        curve = client.get_metric_history(trial.info.run_id, "val_acc")
        assert [m.step for m in curve] == list(range(int(trial.data.metrics["epochs_run"])))
        assert trial.data.metrics["best_val_acc"] == max(m.value for m in curve)
    assert trials[0].info.run_name in {"trial 1/2", "trial 2/2"}
    found = store.finished_run(summary.tracking_uri, "benchmark", parent.data.tags["cell_key"])
    assert found is not None and found.info.run_id == summary.run_id
    rows = history.finished_runs(summary.tracking_uri, "benchmark").set_index("run_id")
    of_trials = rows.loc[[trial.info.run_id for trial in trials]]
    assert not of_trials.timed.any() and of_trials.cell_key.isna().all()  # the plan's reading


def test_the_report_takes_no_trial_for_a_foreign_run(make_cfg, ants_and_bees):
    from benchmark.report.tables import load_runs

    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze", *FEW]
    summary = run_cell(make_cfg(*cell, "tune.trials=2"))
    runs = load_runs(summary.tracking_uri, "benchmark", include_debug=True)
    assert len(runs.frame) == 1  # the cell
    assert runs.foreign == 0, runs.footnote()  # "2 run(s) not made by the harness"
