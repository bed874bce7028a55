"""The cell key must not move: a relaunch finds a finished cell by it, so a refactor that changes
it silently reruns hours of grid. Pinned two ways: the keys of a handful of composed configs
(with a fixed data digest), and the keys the committed grid (results/grid) holds, recomputed
from the Makefile's cell overrides on the real data."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from benchmark.config.spec import CellSpec
from benchmark.tracking import identity

PROJECT = Path(__file__).resolve().parents[1]
GRID = PROJECT / "results" / "grid" / "mlflow.db"
DATA = "0" * 64  # a fixed data digest: these keys pin the config part alone

# lp_ft, whose BatchNorm policy protocol v2 changed (bn=eval -> bn=frozen): its keys before it
# are those of `strategy.bn=eval` now (the same config, the same computation). For the others
# the override is their default (the keys pinned before protocol v2 are unchanged).
BN_BEFORE_V2 = "strategy.bn=eval"

# tune=fair before its 5-epoch trials and backbone factors in [0.1, 1] (its keys moved: the
# search changed; measured against a hand-set recipe, README "Tuned cells")...
FAIR_SHORT_TRIALS = (
    "tune.epochs_fraction=0.3",
    "tune.budget_fraction=1.8",
    "tune.min_epochs=1",
    "tune.backbone_lr_factor_range=[0.01,1.0]",
)
# ...and before its recipe-first, Sobol-started search.
FAIR_BEFORE_SEARCH = ("tune.startup=null", "tune.recipe_first=null", *FAIR_SHORT_TRIALS)

# Config overrides -> the key `identity.cell_key(cfg, DATA)` gives (the older ones: as it gave
# before the redesign of issue 22).
PINNED = {
    # protocol v2 (lp_ft's bn=frozen, tune=fair's budget in trial-epochs)
    ("strategy=lp_ft", "tune=fair", *FAIR_BEFORE_SEARCH): (
        "c2077a70ac4d818885ff5befc922806e8c102631af27cd79a8123006656c37e0"
    ),
    # ...and its search: the recipe first, then 4 Sobol points
    ("strategy=lp_ft", "tune=fair", *FAIR_SHORT_TRIALS): (
        "4006d7c292a56702f3f432477459d53ed79d66c51e0fffeca875eadc3fef11de"
    ),
    # ...and its 5-epoch trials, backbone factors in [0.1, 1] (the grid of protocol v2's)
    ("strategy=lp_ft", "tune=fair"): (
        "86bf0f56fb76122eae720720663b701b67162710135a6cbeea991b11a91ac584"
    ),
    (BN_BEFORE_V2,): ("2df4ed1895924209859cd2a4690dd6e6317ab598094677f73ecbfb44717aa56d"),
    ("strategy=freeze", "colour=gray", "seed=2"): (
        "86d29cac5125102726ed3b91ed78a190999b86ba5affbe7069e354a619e8b8b9"
    ),
    ("strategy=linear_probe", "dataset=dogs_vs_cats"): (
        "23e937dffefb2d0171d2e7573b9e0cad9a30e5083c2ab4519b6146da6414a0e2"
    ),
    ("protocol=study", "strategy=freeze"): (
        "577034a90542c03bb8222861e32b88f80f0890b0683ee9b3af146c16325e08ef"
    ),
    ("strategy=two_stage", "tune.trials=4", "head=mlp", BN_BEFORE_V2): (
        "5c16045792b77e5165247778836678d2f5cfa670c11b42108eb88c69346aba63"
    ),
    (
        "strategy=partial",
        "optim=adamw_cosine",
        "augment=strong",
        "dataset=simpsons",
        "dataset.classes=null",
        "dataset.official_test=null",  # before protocol v2's native test split (false)
        "dataset.shift_test=null",  # before the shift split (simpsons.yaml: true)
        BN_BEFORE_V2,
    ): ("39f2180199e9f9f633c6a9562f96d81fc5474dd4be0407297dda9bf8299c2a03"),
}


@pytest.mark.parametrize("overrides", list(PINNED), ids=lambda o: " ".join(o) or "defaults")
def test_cell_key_of_a_config_is_pinned(
    make_cfg: Callable[..., CellSpec], overrides: tuple[str, ...]
) -> None:
    cfg = make_cfg("trainer.precision=bf16-mixed", *overrides)
    assert identity.cell_key(cfg, DATA) == PINNED[overrides]


def grid_runs(dataset: str, seed: int) -> list[tuple[str, str, str, str, str, str, str]]:
    """(colour, strategy, protocol, precision, cell_key, tune.reuse_seed, manifest_sha256) of
    the grid's FINISHED runs (tune.reuse_seed None when it is unset or logged as "None")."""
    with closing(sqlite3.connect(f"file:{GRID}?mode=ro", uri=True)) as db:
        return db.execute(
            """
            SELECT (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid AND key = 'colour'),
                   (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid AND key = 'strategy'),
                   (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid AND key = 'protocol'),
                   (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid
                     AND key = 'trainer.precision'),
                   (SELECT value FROM tags t WHERE t.run_uuid = r.run_uuid AND key = 'cell_key'),
                   NULLIF((SELECT value FROM params p WHERE p.run_uuid = r.run_uuid
                     AND key = 'tune.reuse_seed'), 'None'),
                   (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid
                     AND key = 'manifest_sha256')
            FROM runs r
            WHERE r.status = 'FINISHED'
              AND (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid
                    AND key = 'dataset') = ?
              AND (SELECT value FROM params p WHERE p.run_uuid = r.run_uuid AND key = 'seed') = ?
            """,
            (dataset, str(seed)),
        ).fetchall()


@pytest.mark.skipif(not GRID.is_file(), reason="results/grid/mlflow.db is not in this checkout")
def test_the_committed_grid_keys_are_what_a_relaunch_computes(
    make_cfg: Callable[..., CellSpec],
) -> None:
    """Hymenoptera seed 0 of the grid of protocol v2 (`make results-grid`): every FINISHED cell,
    composed as the Makefile composes it (`tune=fair dataset.classes=null`, or `protocol=study`),
    gives the key its run carries with the data digest it logged, so a relaunch finds it and
    skips it. Run one of its cells' code differently, and this fails before hours are rerun."""
    runs = grid_runs("hymenoptera", 0)
    if not runs:  # the grid restarted (its first cells come in its first hour)
        pytest.skip("results/grid holds no FINISHED Hymenoptera seed-0 cell yet")
    for colour, strategy, protocol, precision, key, reuse, data in runs:
        assert reuse is None  # protocol v2: every seed tunes on its own split
        ours = ["protocol=study"] if protocol == "study" else ["tune=fair", "dataset.classes=null"]
        cfg = make_cfg(
            f"colour={colour}",
            f"strategy={strategy}",
            f"trainer.precision={precision}",
            "trainer.enable_progress_bar=false",
            "tracking.log_model=false",
            *ours,
        )
        assert identity.cell_key(cfg, data) == key, (colour, strategy, protocol)
