"""Commands beside the grid: `python -m benchmark.tools.bench` (make bench), `.rank` (backbones
ranked before training), `.data` (dataset stats and a preview of what a backbone sees),
`.seeds` (more seeds where a verdict is undecided: make more-seeds) and `.predict` (a run's model
on a folder of images: make predict)."""
