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
from tests.conftest import FEW, TINY


class FitLr(Callback):
    """The learning rate and weight decay the cell's own fit starts with."""

    def on_fit_start(self, trainer, module) -> None:
        optimizer = trainer.optimizers[0]
        self.lr = max(group["lr"] for group in optimizer.param_groups)
        self.backbone_lr = optimizer.param_groups[-1]["lr"]  # the head's group comes first
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
    assert "freeze · tuned (at most 2 trials)" in (out / "o" / "report.md").read_text()


# ---------------------------------------------------------------- tune=fair (issue 21 items 1-2)

FAIR_SPACE = {  # strategy -> what tune=fair searches besides lr and weight decay (fair.yaml)
    "finetune": "optim.backbone_lr_factor",
    "partial": "optim.backbone_lr_factor",
    "lp_ft": "optim.backbone_lr_factor",
    "two_stage": "strategy.unfreeze_lr_factor",
    "freeze": None,
    "freeze_bn_train": None,
}


@pytest.mark.parametrize("strategy", list(FAIR_SPACE))
def test_fair_gives_every_strategy_the_same_trials_and_its_own_space(make_cfg, strategy):
    from benchmark.config.rules import problems

    spec = make_cfg(f"strategy={strategy}", "tune=fair")
    assert problems(spec) == []
    assert (spec.tune.name, spec.tune.trials, str(spec.tune.pruner)) == (
        "fair",
        16,
        "successive_halving",
    )
    space = tune.search_space(spec)
    common = {"strategy.lr": (1e-4, 0.3), "optim.weight_decay": (1e-6, 1e-2)}
    factor = FAIR_SPACE[strategy]
    assert space == (common | {factor: (0.1, 1.0)} if factor else common)
    assert tune.trial_epochs(spec) == 5  # half of trainer.max_epochs=10
    assert tune.budget_epochs(spec) == 20  # 2 x 10 trial-epochs
    if strategy == "two_stage":  # a short trial unfreezes at the same share of its epochs
        assert tune.compressed(spec, 5).strategy.unfreeze_at_epoch == 2  # 5 of 10 -> 2 of 5


def test_fair_leaves_linear_probe_its_c_grid(make_cfg):
    from benchmark.config.rules import problems

    assert problems(make_cfg("strategy=linear_probe", "tune=fair")) == []  # no refusal: no trials


def trials_of(uri, run):
    """The run's trials table artifact (tune_trials.json), as MLflow loads it."""
    client = mlflow.MlflowClient(uri)
    return client.load_table(run.info.experiment_id, "tune_trials.json", [run.info.run_id])


@pytest.fixture
def eighty_ants_and_bees(tmp_path, shared_data):
    """40 ants and 40 bees: a validation split of 16 images, enough to tell a head that learnt
    from one that did not."""
    import shutil

    root = tmp_path / "eighty"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for photo in sorted((shared_data / "hymenoptera_data/train" / label).glob("*.jpg"))[:40]:
            shutil.copy(photo, root / label / photo.name)
    return root


def test_the_pruner_ends_a_hopeless_trial_before_its_last_epoch(
    make_cfg, eighty_ants_and_bees, monkeypatch
):
    """Two good trials (lr 0.1), then one at lr 1e-6: successive halving compares it with them
    after its first epoch and prunes it; the good ones run all four."""
    create_study = tune.optuna.create_study

    def seeded(**kwargs):
        study = create_study(**kwargs)
        for lr in (0.1, 0.1, 1e-6):
            study.enqueue_trial({"strategy.lr": lr, "optim.weight_decay": 1e-4})
        return study

    monkeypatch.setattr(tune.optuna, "create_study", seeded)
    cell = ["dataset=imagefolder", f"dataset.root={eighty_ants_and_bees}", "strategy=freeze"]
    settings = [o for o in TINY if not o.startswith(("trainer.limit_", "speed.", "data.batch"))]
    summary = run_cell(
        make_cfg(
            *cell,
            *settings,
            "trainer.max_epochs=8",
            "data.batch_size=8",
            "tune=fair",
            "tune.trials=3",
            "tune.epochs_fraction=0.5",
            "tune.min_epochs=1",  # a hopeless trial can stop after its first epoch
            "tune.lr_range=[1e-6,0.3]",
        )
    )
    run = mlflow.MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    trials = trials_of(summary.tracking_uri, run)
    by_lr = trials.set_index("number")
    assert list(by_lr.state) == ["COMPLETE", "COMPLETE", "PRUNED"], trials
    assert list(by_lr.epochs) == [4, 4, 1]  # half of 8 epochs; the hopeless one stopped at 1
    assert by_lr.loc[2, "strategy.lr"] == pytest.approx(1e-6)
    assert run.data.metrics["tune_trials_pruned"] == 1
    assert run.data.metrics["tune_epochs_run"] == 9
    assert run.data.params["tune.trials"] == "3" and run.data.params["tune.name"] == "fair"


def test_a_fair_finetune_searches_the_backbone_rate_and_logs_its_trials(make_cfg, ants_and_bees):
    fit = FitLr()
    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=finetune", *TINY]
    cfg = make_cfg(*cell, "trainer.max_epochs=2", "tune=fair", "tune.trials=2")
    summary = run_cell(cfg, callbacks=[fit])
    run = mlflow.MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    params, metrics = run.data.params, run.data.metrics
    lr = float(params["tune.chosen.strategy.lr"])
    factor = float(params["tune.chosen.optim.backbone_lr_factor"])
    assert 0.01 <= factor <= 1.0 and params["tune.searched"] == (
        "strategy.lr,optim.weight_decay,optim.backbone_lr_factor"
    )
    assert fit.lr == pytest.approx(lr) and fit.backbone_lr == pytest.approx(lr * factor)
    trials = trials_of(summary.tracking_uri, run)
    assert list(trials.number) == [0, 1] and set(trials.state) <= {"COMPLETE", "PRUNED"}
    assert {"strategy.lr", "optim.backbone_lr_factor", "val_acc", "epochs"} <= set(trials)
    assert trials.epochs[0] == 2  # max(2, 0.3 of 2); the second is pruned after 1 if worse
    completed = list(trials.state).count("COMPLETE")
    assert metrics["tune_trials_completed"] == completed >= 1
    assert metrics["tune_epochs_run"] == sum(trials.epochs)
    assert metrics["tune_s"] > 0 and metrics["wall_time_s"] > metrics["tune_s"]


def test_other_seeds_reuse_the_values_that_seed_0_chose(make_cfg, ants_and_bees):
    """tune.reuse_seed=0: seed 0 tunes; seed 1 finds seed 0's FINISHED run (same config but the
    seed), fits at its values and runs no trial; without a donor a seed tunes itself."""
    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze", *FEW]
    tuned = [*cell, "tune.trials=2", "tune.reuse_seed=0"]
    first = run_cell(make_cfg(*tuned, "seed=0"))
    fit = FitLr()
    second = run_cell(make_cfg(*tuned, "seed=1"), callbacks=[fit])
    client = mlflow.MlflowClient(first.tracking_uri)
    donor, taker = (client.get_run(s.run_id).data for s in (first, second))
    assert "tune.reused_from" not in donor.params and donor.metrics["tune_trials_completed"] == 2
    assert taker.params["tune.reused_from"] == first.run_id
    chosen = {k: v for k, v in donor.params.items() if k.startswith("tune.chosen.")}
    assert chosen and all(taker.params[k] == v for k, v in chosen.items())
    assert fit.lr == pytest.approx(float(chosen["tune.chosen.strategy.lr"]))
    assert taker.metrics["tune_s"] == 0 and "tune_trials_completed" not in taker.metrics
    alone = run_cell(make_cfg(*cell, "tune.trials=2", "tune.reuse_seed=5", "seed=1"))
    data = client.get_run(alone.run_id).data  # seed 5 never ran: seed 1 tunes on its own split
    assert "tune.reused_from" not in data.params and data.metrics["tune_trials_completed"] == 2


def test_fair_starts_tpe_after_the_recipe_and_four_sobol_trials(make_cfg, monkeypatch):
    """Optuna's TPE models after 10 random trials by default: with 8 trials it never would.
    tune=fair places 5 first (the recipe, 4 Sobol points): TPE models from the sixth."""
    seen = {}
    sampler = tune.optuna.samplers.TPESampler

    def recording(**kwargs):
        seen.update(kwargs)
        return sampler(**kwargs)

    monkeypatch.setattr(tune.optuna.samplers, "TPESampler", recording)
    monkeypatch.setattr(tune.optuna.Study, "optimize", lambda self, *a, **k: None)
    row = {"number": 0, "strategy.lr": 0.1, "optim.weight_decay": 1e-4, "val_acc": 0.5}
    monkeypatch.setattr(tune, "trials_table", lambda study: [row])
    monkeypatch.setattr(tune, "without_test", lambda datamodule: datamodule)
    monkeypatch.setattr(tune.optuna.Study, "best_params", {}, raising=False)
    monkeypatch.setattr(tune.optuna.Study, "best_value", 0.0, raising=False)
    tune.choose(make_cfg("strategy=freeze", "tune=fair"), None, lambda spec: None)
    assert seen == {"seed": 0, "n_startup_trials": 5}


def test_the_report_names_a_tune_group_and_says_when_seeds_reused_a_choice(
    make_cfg, ants_and_bees, tmp_path
):
    """Untuned and tune=fair columns: named by the group (never by what a seed chose), and a
    line under the table says that seed 1 reused seed 0's choice."""
    from benchmark.report.__main__ import main as report

    cell = ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=freeze", *FEW]
    first = run_cell(make_cfg(*cell))
    fair = [*cell, "tune=fair", "tune.trials=2", "tune.reuse_seed=0"]
    for seed in (0, 1):
        run_cell(make_cfg(*fair, f"seed={seed}"))
    out = tmp_path / "report"
    args = ["--tracking-uri", first.tracking_uri, "--out", str(out), "--include-debug"]
    assert report(args) == 0
    text = (out / "report.md").read_text()
    assert "freeze · tune=fair, tune.reuse_seed=0 · tuned (at most 2 trials)" in text, text
    assert "freeze · tune=none" in text and "tune.chosen" not in text
    assert "Tuned once, on seed 0's validation split" in text
