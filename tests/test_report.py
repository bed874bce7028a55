"""Golden-file tests of the report on a tracking store with known runs: three seeds, a rerun, a
failed cell, a running cell and never-run cells."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from benchmark.report.__main__ import RERUN_NOTE
from benchmark.report.__main__ import main as report
from benchmark.tracking.identity import (
    CELL_GROUP_TAG,
    DEBUG_TAG,
    GIT_COMMIT_TAG,
    HARNESS_TAG,
    KIND_TAG,
    SCHEMA_TAG,
    SCHEMA_VERSION,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# (dataset, colour, strategy, seed, status, test_acc, start order)
RUNS = [
    ("hymenoptera", "rgb", "finetune", 0, "FINISHED", 0.90, 1),
    ("hymenoptera", "rgb", "finetune", 1, "FINISHED", 0.92, 2),
    ("hymenoptera", "rgb", "finetune", 2, "FINISHED", 0.94, 3),
    ("hymenoptera", "rgb", "freeze", 0, "FINISHED", 0.50, 4),  # replaced by its rerun below
    ("hymenoptera", "rgb", "freeze", 1, "FINISHED", 0.95, 5),
    ("hymenoptera", "rgb", "freeze", 2, "FINISHED", 0.97, 6),
    ("hymenoptera", "rgb", "freeze", 0, "FINISHED", 0.96, 7),  # the rerun: counts
    ("hymenoptera", "gray", "finetune", 0, "FAILED", None, 8),
    ("hymenoptera", "gray", "finetune", 1, "FINISHED", 0.88, 9),
    ("hymenoptera", "gray", "freeze", 0, "FAILED", None, 10),
    ("dogs_vs_cats", "rgb", "finetune", 0, "RUNNING", None, 11),
    ("hymenoptera", "rgb", "finetune", 2, "FAILED", None, 12),  # a later failed retry: 0.94 counts
]

# Checked by hand: 0.92 ± 0.02 = mean/sd of 0.90, 0.92, 0.94, and its 95 % t interval
# 0.92 ± 4.303 x 0.02 / sqrt(3) = [0.870, 0.970]; the freeze rerun (0.96) replaces 0.50; the best
# mean of each row in bold; the study's numbers in columns of their own, nothing subtracted.
GOLDEN = Path(__file__).parent / "golden" / "report_table.md"

pytestmark = pytest.mark.foreign_runs  # runs written by hand, as another tool would


def log_run(
    client: mlflow.MlflowClient,
    experiment: str,
    cell: tuple,
    status: str,
    accuracy: float | None,
    order: int,
    extra: dict[str, str] | None = None,
    harness: bool = True,
    debug: bool = False,
) -> str:
    """A run as the harness logs one (tags included), or, `harness=False`, as another tool
    would log one with the same param names."""
    dataset, colour, strategy, seed = cell
    run = client.create_run(experiment, start_time=1_000_000 + order)
    params = {
        "dataset": dataset,
        "colour": colour,
        "strategy": strategy,
        "backbone": "efficientnet_lite0",
        "seed": str(seed),
        "trainer.max_epochs": "10",
        **(extra or {}),
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    group = "|".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "seed")
    tags = {"device": "cpu"}
    if harness:
        tags |= {
            HARNESS_TAG: "benchmark",
            SCHEMA_TAG: SCHEMA_VERSION,
            KIND_TAG: "cell",
            CELL_GROUP_TAG: group,
            DEBUG_TAG: str(debug).lower(),
        }
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    if accuracy is not None:
        for epoch, value in enumerate([accuracy - 0.1, accuracy]):
            client.log_metric(run.info.run_id, "val_acc", value, step=epoch)
        client.log_metric(run.info.run_id, "best_val_acc", accuracy)
        study = params.get("protocol.selection") == "max_eval"  # protocol=study: no test_acc
        client.log_metric(run.info.run_id, "max_val_acc" if study else "test_acc", accuracy)
        client.log_metric(run.info.run_id, "wall_time_s", 100.0 + order)
        client.log_metric(run.info.run_id, "train_images_per_s", 10.0)
        client.log_metric(run.info.run_id, "peak_rss_mb", 2000.0)
        with mlflow.start_run(run_id=run.info.run_id):
            confusion = {"classes": ["ants", "bees"], "matrix": [[8, 2], [1, 9]]}
            mlflow.log_dict(confusion, "confusion_matrix.json")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def new_store(folder: Path, empty_store: Path) -> tuple[mlflow.MlflowClient, str, str]:
    """A new store in `folder` (a copy of the session's empty MLflow store) with the experiment
    "benchmark", its artifacts in `folder`/artifacts: the client, the URI, the experiment."""
    shutil.copy(empty_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    return client, uri, client.create_experiment("benchmark", (folder / "artifacts").as_uri())


@pytest.fixture(scope="module")
def known_runs(tmp_path_factory: pytest.TempPathFactory, empty_store: Path) -> Path:
    """The store of RUNS, logged once per module (a test gets a copy: `store`)."""
    folder = tmp_path_factory.mktemp("known-runs")
    client, _, experiment = new_store(folder, empty_store)
    for dataset, colour, strategy, seed, status, accuracy, order in RUNS:
        log_run(client, experiment, (dataset, colour, strategy, seed), status, accuracy, order)
    return folder / "mlflow.db"


@pytest.fixture
def store(tmp_path: Path, known_runs: Path) -> str:
    """A copy of the store of RUNS in tmp_path, for the test to read or add runs to (the runs'
    artifacts stay where RUNS logged them: the copy refers to them)."""
    shutil.copy(known_runs, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def report_of(uri: str, out: Path, *flags: str) -> tuple[pd.DataFrame, str]:
    assert report(["--tracking-uri", uri, "--out", str(out), *flags]) == 0
    return pd.read_csv(out / "report.csv"), (out / "report.md").read_text()


def test_debug_runs_other_settings_and_foreign_runs_are_never_pooled(store, tmp_path):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("benchmark").experiment_id
    cell = ("hymenoptera", "rgb", "finetune")
    debug = {"trainer.limit_train_batches": "2"}
    for seed in (0, 1):  # two 2-batch debug runs
        log_run(
            client, experiment, (*cell, seed), "FINISHED", 0.2 + seed * 0.5, 20, debug, debug=True
        )
    for seed in (0, 1):  # the same cell with 3 epochs instead of 10
        log_run(client, experiment, (*cell, seed), "FINISHED", 0.8, 30, {"trainer.max_epochs": "3"})
    log_run(client, experiment, (*cell, 0), "FINISHED", 0.99, 40, harness=False)  # by hand
    log_run(client, experiment, ("mnist", "rgb", "sklearn", 0), "FINISHED", 0.5, 41, harness=False)
    sweep = client.create_run(experiment, tags={HARNESS_TAG: "benchmark", KIND_TAG: "sweep"})
    client.set_terminated(sweep.info.run_id, "FINISHED")  # a sweep's parent: ours, not a cell

    table, markdown = report_of(store, tmp_path / "out")
    default = table[(table.dataset == "hymenoptera") & (table.colour == "rgb")]
    tens = default[default.variant == "trainer.max_epochs=10"]  # labelled: it has a sibling
    assert (tens.n.iloc[0], tens.test_acc_mean.iloc[0]) == (3, 0.92)  # untouched by the others
    threes = default[default.variant == "trainer.max_epochs=3"]
    assert (threes.n.iloc[0], threes.test_acc_mean.iloc[0]) == (2, 0.8)  # a column of its own
    assert "finetune · trainer.max_epochs=3" in markdown
    assert "mnist" not in markdown and "sklearn" not in markdown  # foreign runs: not results
    assert "2 run(s) not made by the harness were ignored" in markdown
    assert "2 debug run(s) with a partial budget" in markdown

    with_debug, _ = report_of(store, tmp_path / "debug", "--include-debug")
    debug_rows = with_debug[with_debug.variant.fillna("").str.contains("limit_train_batches=2")]
    debug_rows = debug_rows[debug_rows.n > 0]
    assert len(debug_rows) == 1 and debug_rows.n.iloc[0] == 2  # its own column, when asked


def test_two_user_folders_are_two_rows_by_name(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    for order, (root, accuracy) in enumerate([("/data/bees_2024", 0.7), ("/data/wasps", 0.9)]):
        extra = {"dataset.root": root}
        log_run(
            client,
            experiment,
            ("imagefolder", "rgb", "freeze", 0),
            "FINISHED",
            accuracy,
            order,
            extra,
        )
    table, _ = report_of(uri, tmp_path / "out")
    assert sorted(table.dataset) == ["imagefolder:bees_2024", "imagefolder:wasps"]
    assert sorted(table.test_acc_mean) == [0.7, 0.9] and table.variant.isna().all()


def test_columns_are_named_by_settings_not_by_paths_logged_data_or_keys_older_code_lacked(
    tmp_path, empty_store
):
    """An untuned and a tune=fair group of one cell, as a real grid logs them: every run has its
    own output folder, the older untuned runs another store path and logger class and no
    `dataset.official_test` key (the new ones log it as None), and one superseded old run tested
    on another split. Only the tune group names a column."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    cell = ("simpsons", "rgb", "finetune")
    old = {"tracking.uri": "sqlite:////old/mlflow.db", "logger.mlflow._target_": "a.CellLogger"}
    new = {"tracking.uri": "sqlite:////new/mlflow.db", "logger.mlflow._target_": "b.CellLogger"}
    new |= {"dataset.official_test": "None", "test_split": "official"}
    fair = new | {"tune.name": "fair", "tune.reuse_seed": "0", "tune.trials": "8"}
    runs = [  # (settings, group, seed, accuracy, start order)
        (old | {"test_split": "carved", "n_test": "70"}, "none", 0, 0.7, 1),  # superseded by 4
        (new | {"n_test": "195"}, "none", 0, 0.5, 4),
        (new | {"n_test": "195"}, "none", 1, 0.4, 5),
        (fair | {"n_test": "195", "tune.chosen.strategy.lr": "0.1"}, "fair", 0, 0.8, 6),
        (fair | {"n_test": "195", "tune.chosen.strategy.lr": "0.1"}, "fair", 1, 0.6, 7),
    ]
    for settings, group, seed, accuracy, order in runs:
        where = {"paths.output_dir": f"/multirun/{order}_{group}-s{seed}"}
        run_id = log_run(
            client, experiment, (*cell, seed), "FINISHED", accuracy, order, settings | where
        )
        client.set_tag(run_id, CELL_GROUP_TAG, group)  # the harness: config less volatile keys
        if group == "fair":  # seed 0 tuned for 300 s, seed 1 reused its choice
            client.log_metric(run_id, "tune_s", 300.0 if seed == 0 else 0.0)
    table, markdown = report_of(uri, tmp_path / "out", "--datasets", "simpsons,caltech256")
    table = table[table.dataset == "simpsons"]  # caltech256: not run, in the same columns
    assert sorted(table.variant) == ["tune=fair, tune.reuse_seed=0", "tune=none"]
    header = next(line for line in markdown.splitlines() if line.startswith("| dataset"))
    columns = [name.strip() for name in header.strip("|").split("|")]
    # One short label per setting; the legend under the table says each in full.
    assert [c for c in columns if not c.startswith("study:")] == [
        "dataset",
        "colour",
        "finetune (tuned)",
        "finetune",
    ]
    assert (
        "- **finetune (tuned)**: finetune · tune=fair, tune.reuse_seed=0 · tuned (at most 8 trials)"
        in (markdown)
    )
    assert "- **finetune**: finetune · tune=none" in markdown
    untuned = table[table.variant == "tune=none"].iloc[0]
    assert untuned.n == 2 and untuned.test_acc_mean == pytest.approx(0.45)  # 0.7 superseded
    # The cost table names its rows as the accuracy table's columns, with the tuning's time.
    cost = markdown.split("## Cost per cell")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in cost.splitlines()[2:]]
    fair_row = next(row for row in rows if row and row[2] == "finetune (tuned)")
    untuned_row = next(row for row in rows if row and row[2] == "finetune")
    assert fair_row[4:6] == ["106.5", "300"]  # wall: mean of 106 and 107; the tuning: seed 0's
    assert untuned_row[4:6] == ["104.5", "—"]  # no tuning


def pair_of(line: str) -> set[str]:
    """The two columns of an exploratory line ("- row: a vs b: ..." / "a better than b by")."""
    said = re.match(r"- [^:]+: (.+?) (?:vs|better than) (.+?)(?::| by) ", line)
    assert said, line
    return {said[1], said[2]}


def test_pairs_are_compared_within_a_setting_or_a_strategy_and_holm_counts_them(
    tmp_path, empty_store
):
    """Tuned and untuned finetune and freeze plus linear_probe (no variant) on one row: never
    an untuned finetune against a tuned freeze; a p < 0.05 shows its Holm-adjusted p."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    fair = {"tune.name": "fair", "tune.trials": "8"}
    accuracies = {  # seeds 0, 1, 2; finetune fair above freeze fair by 0.1, 0.12, 0.11
        ("finetune", "fair"): [0.90, 0.92, 0.91],
        ("finetune", "none"): [0.70, 0.75, 0.72],
        ("freeze", "fair"): [0.80, 0.80, 0.80],
        ("freeze", "none"): [0.78, 0.79, 0.76],
        ("linear_probe", ""): [0.85, 0.84, 0.86],
    }
    order = 0
    for (strategy, tuning), values in accuracies.items():
        for seed, accuracy in enumerate(values):
            order += 1
            settings = fair if tuning == "fair" else {}
            run_id = log_run(
                client, experiment, ("hymenoptera", "rgb", strategy, seed), "FINISHED",
                accuracy, order, settings,
            )  # fmt: skip
            client.set_tag(run_id, CELL_GROUP_TAG, f"{strategy}-{tuning}")
    _, markdown = report_of(uri, tmp_path / "out")
    lines = [line for line in markdown.splitlines() if line.startswith("- hymenoptera / rgb")]
    # Short labels: "finetune (tuned)" (tune=fair, 8 trials) and "finetune" (tune=none).
    pairs = [pair_of(line) for line in lines]
    assert {"finetune (tuned)", "freeze (tuned)"} in pairs
    assert {"finetune (tuned)", "finetune"} in pairs
    assert {"linear_probe", "freeze"} in pairs
    crossed = {"finetune", "freeze (tuned)"}
    assert crossed not in pairs, lines  # a tuned freeze against an untuned finetune: no question
    # 2 settings x 1 pair + 2 strategies across settings + linear_probe against 4 columns.
    assert len(lines) == 8 and "8 tests in all" in markdown
    significant = [line for line in lines if "better than" in line]
    assert significant and all("(Holm-adjusted p=" in line for line in significant)


STUDY_PROTOCOL = {
    "protocol": "study",
    "protocol.selection": "max_eval",
    "trainer.max_epochs": "15",
    "data.batch_size": "4",
}


def test_study_protocol_runs_have_their_own_column_and_the_delta_uses_them(store, tmp_path):
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("benchmark").experiment_id
    for seed, accuracy in enumerate([0.95, 0.97, 0.96]):  # max val over epochs: optimistic
        cell = ("hymenoptera", "rgb", "finetune", seed)
        log_run(client, experiment, cell, "FINISHED", accuracy, 50 + seed, STUDY_PROTOCOL)
    table, markdown = report_of(store, tmp_path / "out")
    ours = table[(table.dataset == "hymenoptera") & (table.colour == "rgb")]
    finetune = ours[ours.strategy == "finetune"].iloc[0]
    # ours are untouched (n=3, 0.92: never pooled with the study protocol's 0.96) ...
    assert finetune.n == 3 and finetune.test_acc_mean == pytest.approx(0.92)
    assert len(ours[ours.strategy == "finetune"]) == 1  # no variant column for the protocol
    # ... and the study protocol's number sits beside them, with ours minus it.
    assert finetune.study_protocol_n == 3
    assert finetune.study_protocol_mean == pytest.approx(0.96)
    assert finetune.delta_vs_study_protocol == pytest.approx(-0.04)
    legend = "- **finetune (protocol=study)**: protocol=study, the study's recipe on our backbone"
    assert legend in markdown
    assert "0.960 ± 0.010 [0.935, 0.985] (n=3); ours minus it: -0.040 finetune" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| dataset"))
    assert header.count("(protocol=study)") == 1  # one column, however many variants


def test_a_dataset_never_run_is_one_line_and_a_column_never_run_is_hidden(store, tmp_path):
    """caltech256 named by --datasets, no run of it: one line, no rows of "not run"; a partial
    column whose only run was KILLED: "not run" in every row, so not a column of the table. The
    CSV keeps every cell."""
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("benchmark").experiment_id
    log_run(client, experiment, ("hymenoptera", "rgb", "partial", 0), "KILLED", None, 60)
    table, markdown = report_of(store, tmp_path / "out", "--datasets", "caltech256,hymenoptera")
    caltech = table[table.dataset == "caltech256"]
    assert len(caltech) > 0 and set(caltech.state) == {"not run"}
    assert set(caltech.colour) == {"rgb", "gray"}
    assert set(table[table.strategy == "partial"].state) == {"not run"}
    assert "| caltech256" not in markdown and "not run: caltech256 (rgb, gray)." in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| dataset"))
    assert "partial" not in header and "| finetune " in header
    assert "| dogs_vs_cats | gray     | not run" in markdown  # a row of a dataset that ran: kept
    page = (tmp_path / "out" / "report.html").read_text()
    assert "not run: caltech256 (rgb, gray)." in page and "<td>caltech256</td>" not in page


def test_a_moved_store_still_shows_its_confusion_matrices(tmp_path, empty_store):
    from benchmark.report.__main__ import best_confusions
    from benchmark.report.tables import load_runs, summarise
    from benchmark.tracking.store import experiment_id

    first = tmp_path / "work" / "results"  # as `make results` lays its store out
    first.mkdir(parents=True)
    shutil.copy(empty_store, first / "mlflow.db")
    experiment = experiment_id(f"sqlite:///{first / 'mlflow.db'}", "benchmark")
    client = mlflow.MlflowClient()
    for dataset, colour, strategy, seed, status, accuracy, order in RUNS:
        log_run(client, experiment, (dataset, colour, strategy, seed), status, accuracy, order)
    moved = tmp_path / "clone" / "results"  # a clone elsewhere: absolute paths now wrong
    shutil.move(first, moved)
    uri = f"sqlite:///{moved / 'mlflow.db'}"
    runs = load_runs(uri, "benchmark").frame
    finished = runs[runs.status == "FINISHED"]
    matrices = best_confusions(finished, summarise(runs), uri)
    assert len(matrices) == finished.groupby(["dataset", "colour", "strategy"]).ngroups
    assert matrices[0][2] == [[8, 2], [1, 9]]


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_report_tex_compiles(store, tmp_path):
    report_of(store, tmp_path / "out")
    done = subprocess.run(
        ["pdflatex", "-halt-on-error", "-interaction=nonstopmode", "report.tex"],
        cwd=tmp_path / "out", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert (tmp_path / "out" / "report.pdf").stat().st_size > 1000


def test_paired_verdicts_and_ranks_are_reported(store, tmp_path):
    _, markdown = report_of(store, tmp_path / "out")
    # Seeds 0, 1, 2: finetune .90 .92 .94 against freeze .96 .95 .97.
    # Differences -0.06, -0.03, -0.03: mean -0.04, t(2) p = 0.057, not significant at 0.05.
    verdict = "no significant difference (-0.040 [-0.083, +0.003], p=0.057)"
    assert f"hymenoptera / rgb: finetune vs freeze: {verdict}" in markdown
    assert "## Average rank across rows" in markdown


def test_tables_match_the_golden_file(store, tmp_path):
    assert report(["--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert GOLDEN.read_text() in markdown
    assert "the latest FINISHED run counts" in markdown and "Cost per cell" in markdown
    table = pd.read_csv(tmp_path / "out" / "report.csv").set_index(
        ["dataset", "colour", "strategy"]
    )
    assert len(table) == 8  # 2 datasets x 2 colours x 2 strategies, never-run ones included
    finetune = table.loc[("hymenoptera", "rgb", "finetune")]
    assert (finetune.n, finetune.test_acc_mean, finetune.test_acc_sd) == (3, 0.92, 0.02)
    freeze = table.loc[("hymenoptera", "rgb", "freeze")]
    assert (freeze.n, freeze.test_acc_mean, freeze.test_acc_sd) == (3, 0.96, 0.01)
    assert table.loc[("hymenoptera", "gray", "freeze")].state == "failed"
    assert table.loc[("dogs_vs_cats", "rgb", "finetune")].state == "running"
    assert table.loc[("dogs_vs_cats", "gray", "freeze")].state == "not run"
    assert finetune.wall_time_s == 102.0  # mean of 101, 102, 103
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert "\\toprule" in tex and "0.920 $\\pm$ 0.020" in tex


def test_html_page_is_self_contained_with_its_pictures(store, tmp_path):
    assert report(["--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "report.html").read_text()
    # a dot figure per dataset run (2), cost vs accuracy, curves, confusion small multiples
    assert page.count("<svg") == 5
    assert not re.search(r"""(src|href)=["']https?:""", page)  # nothing fetched from elsewhere
    assert "0.920 ± 0.020" in page
    failed = page.split("<summary>Failed runs (3)</summary>")[1].split("</ul>")[0]
    lines = {line.split(":")[0]: line for line in failed.split("<li>")[1:]}
    assert set(lines) == {  # the latest failure of each cell and seed
        "hymenoptera / gray / finetune / seed 0",
        "hymenoptera / gray / freeze / seed 0",
        "hymenoptera / rgb / finetune / seed 2",
    }
    # Seed 2 of rgb finetune FINISHED before its failed retry: the list says which one counts.
    assert RERUN_NOTE in lines["hymenoptera / rgb / finetune / seed 2"]
    assert RERUN_NOTE not in lines["hymenoptera / gray / finetune / seed 0"]


def test_missing_experiment_and_a_misspelt_store_are_clear_errors(store, tmp_path, capsys):
    assert report(["--tracking-uri", store, "--experiment", "other", "--out", str(tmp_path)]) == 1
    assert "no experiment 'other'" in capsys.readouterr().err
    misspelt = tmp_path / "mlfow.db"
    assert report(["--tracking-uri", f"sqlite:///{misspelt}", "--out", str(tmp_path)]) == 1
    assert f"no tracking store at {misspelt}" in capsys.readouterr().err
    assert not misspelt.exists()  # nothing created


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it)",
)
def test_html_renders_in_a_real_browser_without_errors(store, tmp_path):
    assert report(["--tracking-uri", store, "--out", str(tmp_path / "out")]) == 0
    shot = tmp_path / "page.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            (tmp_path / "out" / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Uncaught" not in done.stderr and "CONSOLE" not in done.stderr
    assert shot.stat().st_size > 10_000


def test_the_studys_number_names_its_data_where_ours_differ(tmp_path, empty_store):
    client, uri, experiment = new_store(tmp_path, empty_store)
    subset = {"n_classes": "5", "n_train": "224", "n_val": "56", "n_test": "70"}  # ../shared
    whole = {"n_classes": "2", "n_train": "195", "n_val": "49", "n_test": "153"}
    log_run(client, experiment, ("simpsons", "rgb", "finetune", 0), "FINISHED", 0.9, 1, subset)
    log_run(client, experiment, ("hymenoptera", "rgb", "finetune", 0), "FINISHED", 0.9, 2, whole)
    _, markdown = report_of(uri, tmp_path / "out")
    assert "0.925 (study: 20 classes, 19,548 images; here 5, 350)" in markdown
    hymenoptera = next(line for line in markdown.splitlines() if line.startswith("| hymenoptera"))
    assert re.search(r"0\.954\s+\|", hymenoptera) and "study:" not in hymenoptera  # same data


def svg_texts(page: str) -> list[str]:
    """The text of every <text> element of the page's figures (matplotlib's SVG keeps text)."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", page)


def test_one_short_label_per_setting_everywhere_and_a_legend_in_full(tmp_path, empty_store):
    """As the grid's columns: finetune and lp_ft under tune=fair (8 trials, tuned once on seed
    0) and untuned, linear_probe under tune=fair and untuned (its C grid is its fit: never
    "tuned"). Each column has one short label in the table, the verdicts, the contrasts, the
    diagnoses and the figures; the legend under the table says each in full."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    fair = {"tune.name": "fair", "tune.trials": "8", "tune.reuse_seed": "0"}
    rising = {"final_train_acc": 0.98, "best_val_epoch": 9, "epochs_run": 10, "final_val_acc": 0.9}
    accuracies = {  # seeds 0, 1, 2
        ("finetune", "fair"): [0.90, 0.92, 0.91],
        ("finetune", "none"): [0.70, 0.75, 0.72],
        ("lp_ft", "fair"): [0.80, 0.81, 0.79],
        ("lp_ft", "none"): [0.78, 0.79, 0.76],
        ("linear_probe", "fair"): [0.85, 0.84, 0.86],
        ("linear_probe", "none"): [0.83, 0.84, 0.85],
    }
    order = iter(range(100))
    for (strategy, tuning), values in accuracies.items():
        for seed, accuracy in enumerate(values):
            settings = fair if tuning == "fair" else {}
            run_id = log_run(
                client, experiment, ("hymenoptera", "rgb", strategy, seed), "FINISHED",
                accuracy, next(order), settings,
            )  # fmt: skip
            client.set_tag(run_id, CELL_GROUP_TAG, f"{strategy}-{tuning}")
            if (strategy, tuning) == ("finetune", "fair"):  # still rising: †
                for name, value in rising.items():
                    client.log_metric(run_id, name, value)
    _, markdown = report_of(uri, tmp_path / "out")
    header = next(line for line in markdown.splitlines() if line.startswith("| dataset"))
    columns = [c.strip() for c in header.strip("|").split("|") if not c.strip().startswith("study")]
    assert columns == [
        "dataset",
        "colour",
        "finetune (tuned)",
        "finetune",
        "linear_probe (tune=fair, tune.reuse_seed=0)",  # two linear_probe settings, no trials
        "linear_probe (tune=none)",
        "lp_ft (tuned)",
        "lp_ft",
    ], columns
    legend = markdown.split("Columns, each by the settings it stands for:")[1].split("\n\n")[1]
    assert legend.splitlines()[:3] == [
        "- **finetune (tuned)**: finetune · tune=fair, tune.reuse_seed=0 · tuned (at most 8 "
        "trials)",
        "- **finetune**: finetune · tune=none",
        "- **linear_probe (tune=fair, tune.reuse_seed=0)**: linear_probe · tune=fair, "
        "tune.reuse_seed=0 (its C grid is its fit: no trials)",
    ]
    assert "linear_probe · tune=fair, tune.reuse_seed=0 · tuned" not in markdown
    # The verdict, the contrasts, the exploratory lines and the diagnoses: the short labels.
    verdicts = markdown.split("**Verdicts**")[1].split("\n\n")[1]
    assert "finetune (tuned) vs linear_probe (tune=fair" in verdicts, verdicts
    assert "finetune (tuned): †" in verdicts
    undertrained = next(line for line in markdown.splitlines() if line.startswith("† May be"))
    assert "hymenoptera / rgb / finetune (tuned) (seed 0:" in undertrained
    contrasts = markdown.split("## Primary contrasts")[1].split("## ")[0]
    assert re.search(r"lp_ft \(tuned\) (vs|better than) lp_ft[: ]", contrasts)
    for section in (verdicts, contrasts, undertrained, markdown.split("## Exploratory")[1]):
        assert "tuned (at most 8 trials)" not in section and "tune=none" not in section.replace(
            "linear_probe (tune=none)", ""
        )
    page = (tmp_path / "out" / "report.html").read_text()
    texts = svg_texts(page)
    assert "finetune (tuned)" in texts and "lp_ft" in texts  # the figures' labels
    assert not [t for t in texts if "·" in t or "trials" in t]


def assert_in_order(text: str, order: list[str]) -> None:
    """Every piece of `order` is in `text`, in that order."""
    at = [text.find(piece) for piece in order]
    assert -1 not in at and at == sorted(at), dict(zip(order, at, strict=True))


def test_the_report_opens_with_the_verdicts_then_a_figure_per_dataset_then_the_table(
    store, tmp_path
):
    """report.md and report.html: the verdict table, one dot-and-interval figure per dataset
    run (on one x range, said in the caption), the full table with its legend, then the
    details: in report.html each folded in a <details>."""
    _, markdown = report_of(store, tmp_path / "out")
    order = [
        "**Verdicts**",
        "**Test accuracy per dataset**",
        "![hymenoptera: test accuracy per column](accuracy-1-hymenoptera.svg)",
        "![dogs_vs_cats: test accuracy per column](accuracy-2-dogs_vs_cats.svg)",
        "**Test accuracy per cell**",
        "\n| dataset",
        "Columns, each by the settings it stands for:",
        "## Notes on the table",
        "## Primary contrasts",
        "## Exploratory",
        "## Cost per cell",
    ]
    assert_in_order(markdown, order)
    assert "x axis runs from" in markdown and "to 1.00 in every dataset's figure" in markdown
    for name in ("accuracy-1-hymenoptera.svg", "accuracy-2-dogs_vs_cats.svg"):
        assert (tmp_path / "out" / name).read_text().startswith("<svg")
    page = (tmp_path / "out" / "report.html").read_text()
    body = page.split("<body>")[1]
    order = [
        "<h2>Verdicts</h2>",
        "<h2>Test accuracy per dataset</h2>",
        '<figure aria-label="hymenoptera"><svg',
        '<figure aria-label="dogs_vs_cats"><svg',
        "<h2>Test accuracy per cell</h2>",
        '<ul class="legend">',
        "<h2>Details</h2>",
    ]
    assert_in_order(body, order)
    details = body.split("<h2>Details</h2>")[1]
    assert "<h2>" not in details and "<table" not in re.sub(
        r"<details>.*?</details>", "", details, flags=re.S
    )  # every table and picture below is folded
    summaries = re.findall(r"<summary>([^<]*)</summary>", details)
    assert [s.split(" (")[0] for s in summaries] == [
        "Notes on the table",
        "Primary contrasts",
        "Exploratory: every comparable pair",
        "Average rank across rows",
        "Cost per cell",
        "Failed runs",
        "Learning curves",
        "Confusion matrices",
    ]


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_the_page_reads_at_1280_px_without_scrolling_sideways(tmp_path, empty_store):
    """The grid's seven columns with long settings, every <details> opened: Chromium lays the
    page out 1280 px wide and nothing reaches past the window's right edge."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    fair = {"tune.name": "fair", "tune.trials": "8", "tune.reuse_seed": "0"}
    order = iter(range(1000))
    for dataset in ("hymenoptera", "dogs_vs_cats"):
        for colour in ("rgb", "gray"):
            for strategy in ("finetune", "freeze", "lp_ft", "linear_probe"):
                for tuning in ("fair", "none") if strategy != "linear_probe" else ("none",):
                    for seed in range(3):
                        run_id = log_run(
                            client, experiment, (dataset, colour, strategy, seed), "FINISHED",
                            0.9 + 0.01 * seed, next(order), fair if tuning == "fair" else {},
                        )  # fmt: skip
                        client.set_tag(run_id, CELL_GROUP_TAG, f"{strategy}-{tuning}")
    report_of(uri, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text().replace("<details>", "<details open>")
    probe = (
        "<script>var d = document.documentElement, wide = [];"
        "document.querySelectorAll('body *').forEach(function (e) {"
        " if (e.getBoundingClientRect().right > d.clientWidth + 1) wide.push(e.tagName); });"
        "document.title = 'client=' + d.clientWidth + ' scroll=' + d.scrollWidth"
        " + ' wide=' + wide.length;</script></body>"
    )
    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", probe))
    done = subprocess.run(
        [
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000", "--dump-dom",
            measured.as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    said = re.search(r"<title>client=(\d+) scroll=(\d+) wide=(\d+)</title>", done.stdout)
    assert said, done.stderr[-2000:]
    client_width, scroll_width, wide = map(int, said.groups())
    assert 1200 < client_width <= 1280
    assert scroll_width <= client_width and wide == 0, said.group(0)


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_report_tex_compiles_however_long_its_notes(tmp_path, empty_store):
    """48 cells whose two seeds ran on different commits: the ‡ note lists each (a caption of
    that length is more than LaTeX can measure on one line: the notes are text under the
    table), with the legend and the rules."""
    client, uri, experiment = new_store(tmp_path, empty_store)
    order = iter(range(1000))
    for dataset in ("hymenoptera", "simpsons", "dogs_vs_cats", "caltech256"):
        for colour in ("rgb", "gray"):
            for strategy in ("finetune", "freeze", "lp_ft", "linear_probe", "partial", "two_stage"):
                for seed, commit in enumerate(("a" * 40, "b" * 40)):
                    run_id = log_run(client, experiment, (dataset, colour, strategy, seed),
                                     "FINISHED", 0.9, next(order))  # fmt: skip
                    client.set_tag(run_id, GIT_COMMIT_TAG, commit)
    _, markdown = report_of(uri, tmp_path / "out")
    mixed = next(line for line in markdown.splitlines() if line.startswith("‡ Seeds"))
    assert mixed.count("seed 1: bbbbbbbbbb") == 48
    done = subprocess.run(
        ["pdflatex", "-halt-on-error", "-interaction=nonstopmode", "report.tex"],
        cwd=tmp_path / "out", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    tex = (tmp_path / "out" / "report.tex").read_text()
    assert r"\ddag{} Seeds ran on different code commits" in tex
