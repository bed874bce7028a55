"""Commands beside the grid: `python -m benchmark.tools.bench` (make bench), `.rank` (backbones
ranked before training) and `.data` (dataset stats and a preview of what a backbone sees)."""
