"""`plan=true`: before a sweep starts, every cell of it (done or to run, its images, its estimated
time from the history of FINISHED runs), with nothing trained, no run opened and no store
written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.entities import Metric, Param, RunStatus

from benchmark.config.schema import register_configs
from benchmark.config.spec import from_config
from benchmark.orchestration import plan, sweep
from benchmark.tracking import history, identity, store
from tests.conftest import CONF, PROJECT

EXPERIMENT = "benchmark"


def log_cell_run(
    uri: str,
    *,
    strategy: str = "finetune",
    n_train: int = 100,
    epochs: int = 10,
    wall_time_s: float = 100.0,
    precision: str = "32-true",
    input: str = "images",
    tune_s: float | None = None,
    tune_epochs_run: int | None = None,
    key: str = "history",
    debug: bool = False,
) -> str:
    """A FINISHED cell run as the harness logs one (the tags, params and metrics a plan reads)."""
    client = mlflow.MlflowClient(uri)
    run = client.create_run(
        store.experiment_id(uri, EXPERIMENT),
        tags={
            identity.HARNESS_TAG: "benchmark",
            identity.KIND_TAG: "cell",
            identity.CELL_KEY_TAG: key,
            identity.DEBUG_TAG: str(debug).lower(),
            "device": "cpu",
        },
    )
    params = {
        "strategy": strategy,
        "backbone": "efficientnet_lite0",
        "input": input,
        "trainer.precision": precision,
        "trainer.max_epochs": epochs,
        "n_train": n_train,
        "tune.trials": 16 if tune_s is not None else None,
        "strategy.fit": "sgd",
    }
    metrics = {"wall_time_s": wall_time_s, "epochs_run": epochs, "test_acc": 0.9}
    if tune_s is not None:
        metrics |= {"tune_s": tune_s, "tune_epochs_run": tune_epochs_run or 0}
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items()],
        params=[Param(k, str(v)) for k, v in params.items()],
    )
    client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return run.info.run_id


@pytest.fixture
def history_store(tmp_path: Path, empty_store: Path) -> str:
    """A store whose history is one untuned finetune cell: 100 s for 100 train images x 10
    epochs (0.1 s per image-epoch), and one tuned finetune cell: the same fit and 50 s of tuning
    for 5 trial-epochs of its 100 images (0.1 s per image x trial-epoch); and a partial-budget
    (debug) finetune cell, whose time is no one's."""
    file = tmp_path / "history" / "mlflow.db"
    file.parent.mkdir()
    shutil.copy(empty_store, file)
    uri = f"sqlite:///{file}"
    log_cell_run(uri)
    log_cell_run(uri, wall_time_s=150.0, tune_s=50.0, tune_epochs_run=5)
    log_cell_run(uri, wall_time_s=5000.0, key="debug", debug=True)
    return uri


def work(**changes: object) -> history.Work:
    values: dict[str, object] = {
        "strategy": "finetune",
        "backbone": "efficientnet_lite0",
        "input": "images",
        "device": "cpu",
        "tuned": False,
        "precision": "32-true",
        "train_images": 200,
        "epochs": 10,
    }
    return history.Work(**(values | changes))  # type: ignore[arg-type]


def test_history_scales_its_seconds_by_the_cells_train_images_and_epochs(history_store):
    runs = history.finished_runs(history_store, EXPERIMENT)
    assert "debug" in set(runs.cell_key)  # FINISHED: a launch would skip it...
    past = history.History(runs)  # ...but it times nothing
    untuned = past.estimate(work())  # 0.1 s x 200 images x 10 epochs
    assert untuned.supported and untuned.seconds == pytest.approx(200.0)
    assert untuned.basis == "1 run"  # the untuned run only: tuning matches
    # A tuned cell: the fit at the tuned run's rate (its wall time less its tuning), plus its
    # budget of 18 trial-epochs at 0.1 s per image x trial-epoch.
    tuned = past.estimate(work(tuned=True, tune_epochs=18))
    assert tuned.seconds == pytest.approx(200.0 + 0.1 * 200 * 18)
    assert tuned.basis == "1 run; tuning 1 run"
    # Another precision: what matches is let go of, and said.
    other = past.estimate(work(precision="bf16-mixed", train_images=50, epochs=4))
    assert other.seconds == pytest.approx(0.1 * 50 * 4) and other.basis == "1 run, any precision"
    assert past.per_strategy() == {"finetune": 2}


def test_without_history_the_default_rate_is_said_as_unsupported(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    runs = history.finished_runs(f"sqlite:///{missing}", EXPERIMENT)
    assert runs.empty and not missing.parent.exists()  # read only: nothing created
    guess = history.History(runs).estimate(work(strategy="freeze", input="features"))
    assert not guess.supported
    # a head on cached features: the cheaper guess (a fine-tune's would be 5x over for it)
    assert guess.seconds == pytest.approx(history.DEFAULT_S_PER_FEATURE_EPOCH * 200 * 10)
    assert guess.basis == "none: default 0.007 s/image-epoch"
    images = history.History(runs).estimate(work(strategy="finetune", input="images"))
    assert images.seconds == pytest.approx(history.DEFAULT_S_PER_IMAGE_EPOCH * 200 * 10)
    cell = plan.PlannedCell("a/cell", plan.TO_RUN, {"train": 200}, 10, guess, device="cpu")
    said = plan.render(plan.Plan([cell], "sqlite:///x", {}))
    assert "Unsupported: 1 cell(s) have no history like them" in said
    assert f"default {history.DEFAULT_S_PER_IMAGE_EPOCH:g} s per (train image x epoch)" in said
    assert f"{history.DEFAULT_S_PER_FEATURE_EPOCH:g} s on cached features" in said


def test_a_sweeps_cells_are_composed_as_hydra_composes_them(shared_data, shared_cache, tmp_path):
    """The plan composes once per set of group choices and sets plain values on a copy: the
    cells must be those Hydra's own `load_sweep_config` gives."""
    register_configs()
    overrides = [
        f"paths.data_root={shared_data}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    jobs = [
        ["seed=3", "strategy=freeze", "dataset.classes=null", "+trainer.fast_dev_run=true"],
        ["seed=4", "strategy=freeze", "dataset.classes=[ants,bees]", "tune=fair"],
    ]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        config = compose("config", overrides=overrides, return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        configs = sweep.JobConfigs(config)
        for index, job in enumerate(jobs):
            fast = configs.spec(job, index)
            hydra_own = loader.load_sweep_config(config, job)
            hydra_own.hydra.runtime.output_dir = fast.paths.output_dir
            with sweep.as_current(hydra_own):
                assert fast == from_config(hydra_own), job
        assert len(configs.composed) == 2  # tune=fair is a group choice, seed is a value


def test_a_seed_that_takes_another_seeds_tuning_is_timed_without_tuning(make_cfg, history_store):
    specs = [
        make_cfg(
            "tune=fair", "tune.reuse_seed=0", f"seed={seed}", "trainer.precision=32-true",
            f"tracking.history={history_store}",
        )
        for seed in (0, 1)
    ]  # fmt: skip
    donor, taker = plan.Planner().plan(specs, [spec.name for spec in specs]).cells
    assert donor.state == taker.state == plan.TO_RUN and donor.splits["train"] == 195
    # Seed 0 tunes: its fit (195 images x 10 epochs at 0.1 s) and 20 trial-epochs at 0.1 s.
    assert donor.estimate.seconds == pytest.approx(195 + 0.1 * 195 * 20)
    assert donor.estimate.basis == "1 run; tuning 1 run" and donor.note == ""
    # Seed 1 takes seed 0's values (seed 0's cell is in the plan): its fit alone.
    assert taker.estimate.seconds == pytest.approx(195) and taker.note == "tuning: seed 0's values"


@pytest.mark.parametrize(
    "overrides",
    [
        ("tune=fair",),
        ("tune=fair", "trainer.max_epochs=3"),
        ("tune=fair", "trainer.max_epochs=7"),  # 2 x 7: 14 trial-epochs of 4-epoch trials
        ("tune=fair", "trainer.max_epochs=25", "tune.budget_fraction=0.5"),
        ("tune.trials=4",),
        ("tune.trials=3", "tune.epochs=2"),
        ("tune.trials=5", "tune.epochs_fraction=0.2", "trainer.max_epochs=7"),
    ],
)
def test_the_plans_tuning_budget_is_the_tunings_own(make_cfg, overrides):
    from benchmark.cell.tune import budget_epochs

    spec = make_cfg(*overrides)
    assert plan.tuning_budget(spec) == budget_epochs(spec) > 0


def _benchmark(*args: str, cwd: Path, data_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENCHMARK_DATA_ROOT": str(data_root), "PYTHONPATH": str(PROJECT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "benchmark", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _rows(stdout: str) -> dict[str, str]:
    """The plan's table rows by cell name."""
    rows = {}
    for line in stdout.splitlines():
        if match := re.match(r"^\d+\s+(\S+)\s+(.*)$", line):
            rows[match[1]] = match[2]
    return rows


@pytest.mark.e2e
def test_plan_of_a_2x2_sweep_marks_the_done_cell_and_opens_no_run(
    tmp_path, tmp_store, shared_data, history_store, make_cfg
):
    from benchmark.cell.run import plan as cell_plan  # the key as the cell's own process has it

    cell = ("strategy=freeze", "seed=0", "trainer.precision=32-true")
    _, _, key = cell_plan(make_cfg(*cell))
    uri = f"sqlite:///{tmp_store}"
    done = log_cell_run(uri, strategy="freeze", input="features", key=key)
    before = mlflow.MlflowClient(uri).search_runs([store.experiment_id(uri, EXPERIMENT)])

    planned = _benchmark(
        "-m", "seed=0,1", "strategy=finetune,freeze", "trainer.precision=32-true", "plan=true",
        f"tracking.uri={uri}", f"tracking.history={history_store}",
        cwd=tmp_path, data_root=shared_data,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-3000:]
    rows = _rows(planned.stdout)
    name = "hymenoptera/rgb/{}/efficientnet_lite0/seed={}"
    assert list(rows) == [name.format(s, seed) for seed in (0, 1) for s in ("finetune", "freeze")]
    assert rows[name.format("freeze", 0)].startswith("done")
    for cell_name in (name.format("finetune", 0), name.format("finetune", 1)):
        # Hymenoptera's 195 train images x 10 epochs at the history's 0.1 s: 195 s.
        assert rows[cell_name].split()[:8] == ["to", "run", "195", "49", "153", "10", "3", "min"]
        assert rows[cell_name].split()[8:] == ["15", "s", "1", "run"]
    assert "none: default" in rows[name.format("freeze", 1)]  # no freeze history
    assert "Cells to run: 3; done: 1; not planned: 0." in planned.stdout
    assert "Unsupported: 1 cell(s)" in planned.stdout
    assert "Basis: 2 FINISHED cell run(s)" in planned.stdout
    assert "(per strategy: finetune 2)" in planned.stdout

    after = mlflow.MlflowClient(uri).search_runs([store.experiment_id(uri, EXPERIMENT)])
    assert [r.info.run_id for r in after] == [r.info.run_id for r in before] == [done]
    assert not (tmp_path / "multirun").exists()  # no cell folder either


@pytest.mark.e2e
def test_plan_of_a_single_run_on_an_empty_store_writes_no_store(tmp_path, shared_data):
    missing = tmp_path / "never" / "mlflow.db"
    planned = _benchmark(
        "plan=true", "strategy=finetune", "trainer.max_epochs=3", f"tracking.uri=sqlite:///{missing}",
        cwd=tmp_path, data_root=shared_data,
    )  # fmt: skip
    assert planned.returncode == 0, planned.stderr[-3000:]
    row = _rows(planned.stdout)["hymenoptera/rgb/finetune/efficientnet_lite0/seed=0"]
    assert row.split()[:6] == ["to", "run", "195", "49", "153", "3"]
    assert "none: default" in row and "Cells to run: 1; done: 0" in planned.stdout
    assert "Basis: 0 FINISHED cell run(s)" in planned.stdout
    assert not missing.parent.exists() and not (tmp_path / "mlflow.db").exists()
