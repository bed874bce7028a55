"""Runs in MLflow, without torch: what a cell is called and how it is keyed (`identity`), the
store and its stale runs (`store`), a tracking server's reachability (`server`), which cells are
already done (`resume`) and what a cell computed, as plain values (`result`)."""
