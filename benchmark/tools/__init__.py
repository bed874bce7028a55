"""Commands beside the grid: `python -m benchmark.tools.bench` (make bench), `.rank` (backbones
ranked before training), `.data` (dataset stats and a preview of what a backbone sees) and
`.seeds` (more seeds where a verdict is undecided: make more-seeds)."""
