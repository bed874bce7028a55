"""First contact and everyday use (issue 36): the `experiment=` presets, where the caches go by
default, and the keys that change what a cell says or where it writes, never its identity."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from benchmark.config.schema import register_configs
from benchmark.config.spec import CellSpec, from_config
from benchmark.tracking import identity
from tests.conftest import CONF, PROJECT

DATA = "0" * 64  # a fixed data digest: the keys compared here are of the config alone


def composed(*overrides: str, hydra: bool = False) -> DictConfig:
    """conf/ composed as the command composes it (paths.cache_dir left to its default)."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def spec_of(*overrides: str, tmp: Path) -> CellSpec:
    return from_config(composed(f"paths.output_dir={tmp / 'out'}", *overrides))


def test_smoke_sets_one_short_epoch_and_nothing_else(tmp_path):
    """experiment=smoke: one epoch of 4 training batches, 2 validation and 2 test batches, on
    the default cell; every other key as without it; a key set after it on the command line
    wins; with -m it sweeps colour x strategy (the 4-cell Hymenoptera grid)."""
    smoke, default = spec_of("experiment=smoke", tmp=tmp_path), spec_of(tmp=tmp_path)
    expected = {
        "max_epochs": 1,
        "limit_train_batches": 4,
        "limit_val_batches": 2,
        "limit_test_batches": 2,
    }
    assert {k: smoke.trainer[k] for k in expected} == expected
    assert smoke.as_dict() == {**default.as_dict(), "trainer": {**default.trainer, **expected}}
    assert smoke.name == "hymenoptera/rgb/finetune/efficientnet_lite0/seed=0"
    assert identity.is_debug(smoke)  # a partial epoch: the report counts it with --include-debug
    later = spec_of("experiment=smoke", "trainer.max_epochs=3", "strategy=freeze", tmp=tmp_path)
    assert later.trainer["max_epochs"] == 3 and later.strategy.name == "freeze"
    sweeper = composed("experiment=smoke", hydra=True).hydra.sweeper.params
    assert dict(sweeper) == {"colour": "rgb,gray", "strategy": "finetune,freeze"}


def makefile_grid() -> tuple[list[str], dict[str, str]]:
    """The results grid as `make results-grid` sweeps it: its fixed cell overrides (of
    RESULTS_TUNED) and its swept keys (seed, dataset and RESULTS_TUNED's lists)."""
    text = (PROJECT / "Makefile").read_text().replace("\\\n", " ")
    tuned = re.search(r"^RESULTS_TUNED := (.*)$", text, re.M)
    seeds = re.search(r"^RESULTS_SEEDS \?= (\S+)", text, re.M)
    datasets = re.search(r"-m seed=\$\(RESULTS_SEEDS\) dataset=(\S+)", text)
    assert tuned and seeds and datasets, "the Makefile's results grid moved: update this test"
    words = tuned.group(1).split()
    fixed = [w for w in words if "," not in w]
    swept = dict(w.split("=", 1) for w in words if "," in w)
    return fixed, {"seed": seeds.group(1), "dataset": datasets.group(1), **swept}


def test_grid_gives_every_cell_the_key_make_results_gives_it(tmp_path):
    """experiment=grid: tune=fair, every class, no logged model nor system metrics; each cell
    of the grid has the key that `make results` computes for it (a relaunch with the preset
    skips the cells the grid finished), and with -m it sweeps the same grid."""
    fixed, swept = makefile_grid()
    grid = composed("experiment=grid", hydra=True).hydra.sweeper.params
    assert {k: set(v.split(",")) for k, v in grid.items()} == {
        k: set(v.split(",")) for k, v in swept.items()
    }
    assert next(iter(grid)) == "seed"  # seeds slowest: every seed 0 cell first
    make = ["tracking.log_model=false", "tracking.system_metrics=false"]
    make += ["trainer.enable_progress_bar=false", *fixed]
    for dataset in swept["dataset"].split(","):
        for strategy in swept["strategy"].split(","):
            cell = [f"dataset={dataset}", f"strategy={strategy}", "colour=gray", "seed=1"]
            preset = spec_of("experiment=grid", *cell, tmp=tmp_path)
            ours = spec_of(*make, *cell, tmp=tmp_path)
            assert preset.tune.name == "fair" and preset.dataset.classes is None
            assert not preset.tracking.log_model and not preset.tracking.system_metrics
            assert identity.cell_key(preset, DATA) == identity.cell_key(ours, DATA), cell


def test_a_presets_sweep_counts_its_cells_in_the_progress_lines():
    """`-m experiment=smoke seed=0,1,2`: 12 cells (the preset's colour x strategy x the command
    line's seeds), as the sweep's `cell k/N` lines and its plan count them; a group given on
    the command line replaces the preset's entry."""
    from omegaconf import open_dict

    from benchmark.orchestration.sweep import cells_in

    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        for task, cells in (
            (["experiment=smoke", "seed=0,1,2"], 12),
            (["experiment=smoke", "strategy=freeze"], 2),
            (["seed=0,1", "colour=rgb,gray"], 4),
        ):
            single = [t for t in task if "," not in t]
            config = compose("config", overrides=single, return_hydra_config=True)
            with open_dict(config):
                config.hydra.overrides.task = task  # as `-m` gives it (compose refuses sweeps)
            assert cells_in(config) == cells, task


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_preset_composes_into_a_cell(preset, tmp_path):
    spec = spec_of(f"experiment={preset}", tmp=tmp_path)
    assert spec.name  # typed through the boundary: every key it sets is in the schema


def test_the_cache_goes_to_the_users_cache_folder_not_beside_the_data(tmp_path, monkeypatch):
    """paths.cache_dir: $BENCHMARK_CACHE_DIR, else $XDG_CACHE_HOME/benchmark, else
    ~/.cache/benchmark; never inside paths.data_root (a data folder is only read). Where the
    cache is never moves a cell's key."""
    monkeypatch.delenv("BENCHMARK_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    data = f"paths.data_root={tmp_path / 'data'}"
    home = spec_of(data, tmp=tmp_path)
    assert home.paths.cache_dir == str(tmp_path / "home" / ".cache" / "benchmark")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    xdg = spec_of(data, tmp=tmp_path)
    assert xdg.paths.cache_dir == str(tmp_path / "xdg" / "benchmark")
    monkeypatch.setenv("BENCHMARK_CACHE_DIR", str(tmp_path / "mine"))
    mine = spec_of(data, tmp=tmp_path)
    assert mine.paths.cache_dir == str(tmp_path / "mine")
    assert not any(
        Path(s.paths.cache_dir).is_relative_to(s.paths.data_root) for s in (home, xdg, mine)
    )
    assert len({identity.cell_key(s, DATA) for s in (home, xdg, mine)}) == 1


def test_verbose_is_said_but_is_no_part_of_a_cells_identity(tmp_path):
    quiet, verbose = spec_of(tmp=tmp_path), spec_of("verbose=true", tmp=tmp_path)
    assert (quiet.verbose, verbose.verbose) == (False, True)
    assert identity.run_params(verbose)["verbose"] is True  # logged as a param
    assert identity.cell_key(quiet, DATA) == identity.cell_key(verbose, DATA)
    assert identity.cell_group(quiet) == identity.cell_group(verbose)
