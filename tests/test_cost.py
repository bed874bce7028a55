"""A cell's cost is its own: in a sweep under Hydra's basic launcher many cells share one process,
and a cell must not report the peak memory of the cell before it."""

from __future__ import annotations

import numpy as np

from benchmark.cell.cost import CellCost, peak_rss_mb


def test_a_cells_peak_memory_does_not_include_an_earlier_cells_peak():
    earlier = np.ones(600 * 2**20 // 8)  # an earlier cell's 600 MB, touched
    del earlier  # freed: a large block goes back to the system
    process_peak = peak_rss_mb()
    cost = CellCost()  # a new cell starts
    assert cost.peak_rss_mb() < process_peak - 400
    mine = np.ones(200 * 2**20 // 8)  # this cell's own 200 MB
    assert cost.peak_rss_mb() >= cost.rss_at_start_mb + 190
    del mine


def test_a_cells_wall_time_starts_with_it():
    cost = CellCost()
    assert 0 <= cost.seconds() < 5
