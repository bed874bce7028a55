"""More seeds where undecided (issue 33, item 4): `python -m benchmark.tools.seeds` plans seeds
for the two cells of each undecided primary contrast (up to --cap), prints the plan before
anything runs, launches the cells tagged as a second look, and the report then decides at
alpha/2 (Bonferroni over the two looks). Stores of constructed runs whose params are those of a
composed config, so the tool can read each cell's overrides back; no training."""

from __future__ import annotations

import subprocess

import mlflow
import numpy as np
import pytest
from mlflow.entities import Metric, Param, RunTag

from benchmark.report.verdicts import VerdictRule, looks, with_looks
from benchmark.tools import seeds
from benchmark.tracking import identity
from tests.test_report import new_store, report_of
from tests.test_verdicts import wrong_on

CELL = ["dataset=hymenoptera", "backbone=efficientnet_lite0"]
RULE = VerdictRule(looks=seeds.LOOKS)


def cell_run(
    client: mlflow.MlflowClient,
    experiment: str,
    overrides: list[str],
    seed: int,
    correct: np.ndarray,
    order: int,
    look: str | None = None,
) -> str:
    """A FINISHED run as a cell of these overrides logs one: every param of its config, its
    tags (cell_group the config's), test_acc and test_predictions.json (`correct`: right or
    wrong, image by image, the same paths for every run)."""
    spec = seeds.compose_cell(overrides)
    params = {k: str(v) for k, v in identity.run_params(spec).items() if k != "tracking.uri"}
    params |= {"seed": str(seed), "n_test": str(len(correct))}
    tags = {
        identity.HARNESS_TAG: "benchmark",
        identity.SCHEMA_TAG: identity.SCHEMA_VERSION,
        identity.KIND_TAG: "cell",
        identity.CELL_GROUP_TAG: identity.cell_group(spec),
        identity.DEBUG_TAG: "false",
        "device": "cpu",
    }
    if look:
        tags[identity.LOOK_TAG] = look
    run_id = client.create_run(experiment, start_time=1_000_000 + order).info.run_id
    client.log_batch(
        run_id,
        metrics=[Metric("test_acc", float(np.mean(correct)), 0, 0)],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    n = len(correct)
    labels = ["ants" if i % 2 else "bees" for i in range(n)]
    other = {"ants": "bees", "bees": "ants"}
    predicted = [label if ok else other[label] for label, ok in zip(labels, correct, strict=True)]
    paths = [f"{label}/{i:04d}.jpg" for i, label in enumerate(labels)]
    with mlflow.start_run(run_id=run_id):
        mlflow.log_table({"path": paths, "label": labels, "predicted": predicted},
                         "test_predictions.json")  # fmt: skip
    client.set_terminated(run_id, "FINISHED")
    return run_id


def small_gap(client, experiment, colour: str, order, seeds_=(0, 1)) -> None:
    """finetune wrong on 100 of 1,000 images, freeze on those and 30 (seed 0) or 10 (seed 1)
    more: +0.03 and +0.01, undecided on 2 seeds, about 4 more would decide it."""
    for seed in seeds_:
        extra = 30 if seed % 2 == 0 else 10
        cell_run(client, experiment, [*CELL, f"colour={colour}", "strategy=finetune"], seed,
                 wrong_on(1000, range(100)), next(order))  # fmt: skip
        cell_run(client, experiment, [*CELL, f"colour={colour}", "strategy=freeze"], seed,
                 wrong_on(1000, range(100 + extra)), next(order))  # fmt: skip


def wide_gap(client, experiment, colour: str, order) -> None:
    """finetune about 0.95, freeze about 0.70 over 3 seeds: better, at either alpha."""
    for seed in range(3):
        cell_run(client, experiment, [*CELL, f"colour={colour}", "strategy=finetune"], seed,
                 wrong_on(400, range(20 + seed)), next(order))  # fmt: skip
        cell_run(client, experiment, [*CELL, f"colour={colour}", "strategy=freeze"], seed,
                 wrong_on(400, range(120 + 2 * seed)), next(order))  # fmt: skip


@pytest.fixture
def no_launch(monkeypatch):
    """subprocess.run in the tool: a failure if called (nothing may be launched)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"launched {args}")

    monkeypatch.setattr(seeds.subprocess, "run", refuse)


def test_an_undecided_contrast_gets_seeds_for_its_two_cells_up_to_the_cap(tmp_path, empty_store):
    """rgb: a small gap on 2 seeds, undecided; gray: a wide one, decided. The plan adds seeds
    2, 3, ... to rgb's finetune and freeze alone, as many as the estimate, at most --cap."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    small_gap(client, experiment, "rgb", order)
    wide_gap(client, experiment, "gray", order)
    look = seeds.first_look(uri, "benchmark", RULE)
    assert look.added == 0
    (undecided,) = look.contrasts[look.contrasts.verdict == "undecided"].itertuples()
    estimate = int(undecided.more_seeds)
    assert (undecided.colour, undecided.seeds) == ("rgb", 2) and 3 < estimate < 10, estimate

    wide = seeds.plan(look, cap=10)
    assert sorted(c.column for c in wide.cells) == ["finetune", "freeze"]
    assert {c.row[1] for c in wide.cells} == {"rgb"}
    for cell in wide.cells:
        assert cell.add == set(range(2, 2 + estimate)) and not cell.problem
    assert len(wide.table) == 1 and wide.table.iloc[0]["seeds now"] == 2

    capped = seeds.plan(look, cap=4)
    for cell in capped.cells:
        assert cell.add == {2, 3}  # 2 seeds now, at most 4: two more, fewer than the estimate
        assert cell.overrides[:4] == [
            "dataset=hymenoptera",
            "colour=rgb",
            f"strategy={cell.column}",
            "backbone=efficientnet_lite0",
        ]
        # The overrides read back make the same cell again (its runs' cell_group).
        spec = seeds.compose_cell(cell.overrides)
        assert identity.cell_group(spec) == cell.group
    assert seeds.plan(look, cap=2).cells == []  # at the cap already
    assert any("at the cap" in s for s in seeds.plan(look, cap=2).left_out)


def test_a_store_where_everything_is_decided_plans_nothing(
    tmp_path, empty_store, capsys, no_launch
):
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    wide_gap(client, experiment, "rgb", order)
    wide_gap(client, experiment, "gray", order)
    look = seeds.first_look(uri, "benchmark", RULE)
    assert set(look.contrasts.verdict) == {"better"}
    made = seeds.plan(look, cap=10)
    assert made.cells == [] and made.table.empty and made.left_out == []
    assert seeds.main(["--tracking-uri", uri, "--run"]) == 0  # --run: still nothing launched
    said = capsys.readouterr().out
    assert "0 undecided" in said and "Nothing to add." in said


def test_the_plan_is_printed_before_anything_is_launched(tmp_path, empty_store, capsys,
                                                          monkeypatch):  # fmt: skip
    client, uri, experiment = new_store(tmp_path, empty_store)
    small_gap(client, experiment, "rgb", iter(range(100)))
    launched = []

    def launch(command, env, check):
        launched.append((command, env[identity.LOOK_ENV], capsys.readouterr().out))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(seeds.subprocess, "run", launch)
    extra = "paths.data_root=/data/elsewhere"
    assert seeds.main(["--tracking-uri", uri, "--cap", "4", extra]) == 0
    said = capsys.readouterr().out
    assert not launched and "Plan only: --run launches it." in said
    assert "| dataset" in said and "seeds to add" in said

    assert seeds.main(["--tracking-uri", uri, "--cap", "4", "--run", extra]) == 0
    assert len(launched) == 2  # one command per cell group: finetune, freeze
    first_output = launched[0][2]
    plan_at = first_output.index("seeds to add")
    assert first_output.index("alpha=0.05 split between them") < plan_at
    assert first_output.index("BENCHMARK_LOOK=2") > plan_at  # the commands, printed too
    for command, look, _ in launched:
        assert command[1:5] == ["-m", "benchmark", "-m", "seed=2,3"]
        assert look == seeds.ADDED_LOOK
        assert extra in command and f"tracking.uri={uri}" in command
        assert any(o.startswith("hydra.sweep.dir=multirun/more-seeds/") for o in command)
    strategies = {o for c, _, _ in launched for o in c if o.startswith("strategy=")}
    assert strategies == {"strategy=finetune", "strategy=freeze"}


def test_extra_overrides_that_change_the_cell_are_refused(tmp_path, empty_store, capsys):
    client, uri, experiment = new_store(tmp_path, empty_store)
    small_gap(client, experiment, "rgb", iter(range(100)))
    look = seeds.first_look(uri, "benchmark", RULE)
    made = seeds.plan(look, cap=4, extra=["trainer.max_epochs=3"])
    assert made.cells == [] and "change what the cell computes" in made.left_out[0]


def test_overrides_read_back_from_params_make_the_same_cell():
    """A tuned lp_ft on Simpsons with settings off the defaults, a Lightning argument the config
    lacks, and a key its run predates (not logged: null keeps its identity)."""
    overrides = [
        "dataset=simpsons",
        "colour=gray",
        "strategy=lp_ft",
        "tune=fair",
        "tune.reuse_seed=0",
        "tune.trials=8",
        "strategy.bn=eval",
        "dataset.classes=null",
        "dataset.official_test=null",
        "trainer.precision=bf16-mixed",
        "trainer.max_epochs=3",
        "optim.weight_decay=1e-06",
        "+trainer.gradient_clip_val=1.0",
    ]
    spec = seeds.compose_cell(overrides)
    group = identity.cell_group(spec)
    params = {k: str(v) for k, v in identity.run_params(spec).items()}
    del params["dataset.official_test"]  # a run from before the key
    params |= {"seed": "1", "n_test": "195", "tune.chosen.strategy.lr": "0.01"}
    again = seeds.cell_overrides(params, group)
    assert identity.cell_group(seeds.compose_cell([*again, "seed=5"])) == group
    assert "tune=fair" in again and "+trainer.gradient_clip_val=1.0" in again
    assert "dataset.official_test=null" in again and "trainer.precision=bf16-mixed" in again
    other = dict(params, **{"strategy.lr": "0.5"})  # params that make another cell: refused
    with pytest.raises(seeds.NotReproducible, match="another cell"):
        seeds.cell_overrides(other, group)
    assert seeds.with_extra(again, ["paths.data_root=/x", "data.num_workers=0"], group)
    with pytest.raises(seeds.NotReproducible, match="change what the cell computes"):
        seeds.with_extra(again, ["trainer.max_epochs=4"], group)


def test_the_reports_alpha_is_halved_once_added_runs_are_in(tmp_path, empty_store):
    """The same store read before and after runs tagged benchmark.look=2 are in: the report
    says which looks ran, each contrast's interval is at 1 - alpha/2 (one contrast in the row),
    and the first look (the tool's) still reads the initial seeds alone."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(100))
    small_gap(client, experiment, "rgb", order)
    _, before = report_of(uri, tmp_path / "before")
    assert "Looks: one" in before and "| 95.0%" in before and "97.5%" not in before

    small_gap(client, experiment, "rgb", order, seeds_=(2,))
    for run in client.search_runs([experiment], "params.seed = '2'"):
        client.set_tag(run.info.run_id, identity.LOOK_TAG, seeds.ADDED_LOOK)
    _, after = report_of(uri, tmp_path / "after")
    assert "Looks: 2" in after and "0.025 per look" in after
    assert "| 97.5%" in after and "| 95.0%" not in after
    look = seeds.first_look(uri, "benchmark", RULE)
    assert look.added == 2 and int(look.contrasts.seeds.iloc[0]) == 2


def test_looks_counts_the_tagged_runs():
    import pandas as pd

    assert looks(pd.DataFrame({"look": [pd.NA, pd.NA]})) == 1
    assert looks(pd.DataFrame({"seed": [0]})) == 1  # a frame from before the tag
    assert looks(pd.DataFrame({"look": [pd.NA, "2"]})) == 2
    assert with_looks(VerdictRule(alpha=0.05), pd.DataFrame({"look": ["2"]})).look_alpha == 0.025


def test_a_cell_launched_by_the_second_look_is_tagged_so(monkeypatch):
    """The tool launches its cells with BENCHMARK_LOOK=2; the cell's run carries it as the tag
    benchmark.look, which the report counts its looks by. A cell launched otherwise has none."""
    from benchmark.cell.mlflow_run import cell_tags

    spec = seeds.compose_cell([*CELL, "colour=rgb", "strategy=freeze"])
    monkeypatch.delenv(identity.LOOK_ENV, raising=False)
    assert identity.LOOK_TAG not in cell_tags(spec, "key")
    monkeypatch.setenv(identity.LOOK_ENV, seeds.ADDED_LOOK)
    assert cell_tags(spec, "key")[identity.LOOK_TAG] == "2"


def test_a_cell_whose_data_changed_since_its_runs_is_not_relaunched(
    tmp_path, empty_store, monkeypatch
):
    """A cell group leaves its data out: seeds added on other images would be pooled with the
    first ones. The data a cell reads now must be its runs' (data_sha256; before it was logged,
    classes and images); a run that logged neither is not checked, and no data is read."""
    import pandas as pd

    class Manifest:
        content_sha256 = "a" * 64
        classes = ("ants", "bees")
        frame = pd.DataFrame({"split": ["train"] * 6 + ["val"] * 2 + ["test"] * 2 + ["shift"]})

    monkeypatch.setattr(seeds, "cell_manifest", lambda spec: Manifest())
    spec = seeds.compose_cell([*CELL, "colour=rgb", "strategy=freeze"])
    assert seeds.data_problem(spec, {identity.DATA_PARAM: "a" * 64}) == ""
    assert "its data changed" in seeds.data_problem(spec, {identity.DATA_PARAM: "b" * 64})
    before = {"n_classes": "2", "n_train": "6", "n_val": "2", "n_test": "2"}
    assert seeds.data_problem(spec, before) == ""
    assert "2 classes, 12 images then" in seeds.data_problem(spec, {**before, "n_train": "8"})

    def unread(spec):
        raise AssertionError("data read for a run that logged nothing to compare")

    monkeypatch.setattr(seeds, "cell_manifest", unread)
    assert seeds.data_problem(spec, {"n_test": "2"}) == ""

    client, uri, experiment = new_store(tmp_path, empty_store)  # runs on other images: refused
    small_gap(client, experiment, "rgb", iter(range(100)))
    for run in client.search_runs([experiment]):
        client.log_param(run.info.run_id, identity.DATA_PARAM, "b" * 64)
    monkeypatch.setattr(seeds, "cell_manifest", lambda spec: Manifest())
    made = seeds.plan(seeds.first_look(uri, "benchmark", RULE), cap=4)
    assert made.cells == [] and "its data changed" in made.left_out[0]
