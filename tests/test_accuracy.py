"""The acceptance bar of the defaults: full Hymenoptera, default settings, held-out test split.
Minutes per cell on a 2-core CPU, so `slow` (run with `make test-slow`)."""

from __future__ import annotations

import pytest

from benchmark.cell.run import run_cell


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["finetune", "freeze"])
def test_defaults_reach_093_test_accuracy_on_hymenoptera_rgb(make_cfg, strategy):
    result = run_cell(make_cfg(f"strategy={strategy}", "trainer.enable_progress_bar=false"))
    assert result.test_acc >= 0.93, result.line()
