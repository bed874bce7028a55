"""tune.trials: the learning rate (and a head's weight decay) chosen on the validation split
alone, before the cell's own fit; never from the test split; never pooled with untuned runs."""

from __future__ import annotations

import mlflow
import pytest
from lightning.pytorch.callbacks import Callback

from benchmark.cell import tune
from benchmark.cell.run import run_cell
from benchmark.config.rules import ConfigError
from benchmark.data.loading import SplitLoaders
from tests.conftest import FEW


class FitLr(Callback):
    """The learning rate and weight decay the cell's own fit starts with."""

    def on_fit_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        self.lr = max(group["lr"] for group in optimizer.param_groups)
        self.weight_decay = module.hparams.optim["weight_decay"]


def test_tuning_chooses_on_validation_and_the_fit_uses_the_choice(make_cfg, ants_and_bees):
    fit = FitLr()
    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze", *FEW]
    summary = run_cell(make_cfg(*cell, "tune.trials=3"), callbacks=[fit])
    run = mlflow.MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    chosen_lr = float(run.data.params["tune.chosen.strategy.lr"])
    chosen_wd = float(run.data.params["tune.chosen.optim.weight_decay"])  # a head: wd too
    assert 1e-4 <= chosen_lr <= 0.3 and 1e-6 <= chosen_wd <= 1e-2
    assert run.data.params["strategy.lr"] == "0.03"  # the config's, as it was asked
    assert fit.lr == pytest.approx(chosen_lr) and fit.weight_decay == pytest.approx(chosen_wd)
    assert 0 <= run.data.metrics["tune_best_val_acc"] <= 1 and run.data.metrics["tune_s"] > 0
    assert run.data.params["tune.trials"] == "3"


def test_the_test_split_is_never_read_before_the_choice(make_cfg, ants_and_bees, monkeypatch):
    events: list[str] = []
    original_test, original_choose = SplitLoaders.test_dataloader, tune.choose

    def test_dataloader(self):
        events.append("test read")
        return original_test(self)

    def choose(cfg, datamodule, make_model, **kwargs):
        trials = tune.without_test(datamodule)
        rows = trials.manifest if hasattr(trials, "manifest") else None
        assert rows is None or not (rows.split == "test").any()  # the trials cannot see it
        chosen = original_choose(cfg, datamodule, make_model, **kwargs)
        events.append("chosen")
        return chosen

    monkeypatch.setattr(SplitLoaders, "test_dataloader", test_dataloader)
    monkeypatch.setattr(tune, "choose", choose)
    for strategy in ("freeze", "finetune"):  # cached features, and images
        events.clear()
        cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", f"strategy={strategy}"]
        run_cell(make_cfg(*cell, *FEW, "tune.trials=2", "tune.epochs=1"))
        assert events == ["chosen", "test read"], (strategy, events)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["strategy=linear_probe", "tune.trials=3"], "already chooses its C"),
        (["tune.trials=0"], "tune.trials=0: must be null"),
        (["tune.trials=2", "tune.lr_range=[0.1,0.01]"], "tune.lr_range"),
        (["protocol=study", "tune.trials=2"], "no validation split to tune on"),
    ],
)
def test_tuning_that_cannot_work_is_refused_in_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_cell(make_cfg(*overrides))


def test_tuned_and_untuned_runs_are_separate_columns_and_tuned_ones_say_so(
    make_cfg, ants_and_bees, tmp_path
):
    import pandas as pd

    from benchmark.report.__main__ import main as report

    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze", *FEW]
    summary = run_cell(make_cfg(*cell))
    run_cell(make_cfg(*cell, "tune.trials=2"))
    out = tmp_path / "report"
    args = ["--tracking-uri", summary.tracking_uri, "--out", str(out), "--include-debug"]
    assert report(args) == 0
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 2 and list(table.n) == [1, 1]  # never pooled
    assert "tune.trials=2" in (out / "report.md").read_text()
    only_tuned = tmp_path / "only"
    run_cell(make_cfg(*cell, "tune.trials=2", f"tracking.uri=sqlite:///{only_tuned}.db"))
    assert report(["--tracking-uri", f"sqlite:///{only_tuned}.db", "--out", str(out / "o"),
                   "--include-debug"]) == 0  # fmt: skip
    assert "freeze · tuned (2 trials)" in (out / "o" / "report.md").read_text()
