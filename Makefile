# Entry points. `make install` then `make test` set up and check a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The store: $MLFLOW_TRACKING_URI, else ./mlflow.db (what `python -m benchmark` uses too).
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# pytest workers: one more than the cores (the end-to-end tests wait on their commands), at most
# 8 (each holds torch and a model); one torch/OpenMP thread each, not one per core per worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n + 1 : 8 )))

.PHONY: install test test-slow run grid ui ui-check report report-check data-stats bench \
	results results-grid backbones \
	gpu-pack gpu-check clean

install:  ## virtual environment with the package, torch and the dev tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'

test:  ## the default suite (no slow, no gpu); real images from ../shared/data; parallel
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-slow:  ## full-length trainings on the real data (minutes each)
	$(BIN)/pytest -m slow

run:  ## one cell with the defaults
	$(BIN)/python -m benchmark

grid:  ## the 4-cell Hymenoptera grid of the README
	$(BIN)/python -m benchmark -m colour=rgb,gray strategy=finetune,freeze

ui:  ## MLflow's UI on the project's store
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI)

# Into a git-ignored folder: only `make results` writes the committed results/report.*.
REPORT_DIR ?= reports
report:  ## $(REPORT_DIR)/report.{md,csv,tex,html} (default reports/, git-ignored) from the runs in MLflow
	$(BIN)/python -m benchmark.report --tracking-uri $(TRACKING_URI) --out $(REPORT_DIR)

CHROMIUM ?= chromium
# Renders the report `make report` wrote (REPORT_DIR=results: the one `make results` wrote): it
# must not rewrite a report from another store first.
report-check:  ## render $(REPORT_DIR)/report.html in headless Chromium -> $(REPORT_DIR)/report.png
	$(CHROMIUM) --headless --no-sandbox --disable-gpu --no-first-run \
	  --disable-background-networking --disable-component-update --disable-sync \
	  --user-data-dir=$$(mktemp -d) --window-size=1280,3000 \
	  --screenshot=$(CURDIR)/$(REPORT_DIR)/report.png file://$(CURDIR)/$(REPORT_DIR)/report.html

UI_STORE ?= $(TRACKING_URI)
ui-check:  ## the MLflow UI in headless Chromium (needs chromium, chromium-driver, selenium)
	$(BIN)/python scripts/mlflow_ui_check.py --tracking-uri $(UI_STORE) --out results/ui

DATASET ?= hymenoptera
data-stats:  ## per-split class counts and skipped files: make data-stats DATASET=simpsons
	$(BIN)/python -m benchmark.tools.data stats dataset=$(DATASET)

BENCH_ARGS ?=
bench:  ## cell cost vs the study's loop and the compute-only limit (long: see README)
	$(BIN)/python -m benchmark.tools.bench $(BENCH_ARGS)

# The lent GPU machines run Python 3.12: the compiled wheels for it alone (GPU_PYTHONS=3.11,3.12
# for more, about 7 MiB each).
GPU_PYTHONS ?= 3.12
GPU_PACK_ARGS ?=
gpu-pack:  ## .gpu-pack/: the wheels and images a lent GPU machine lacks (fails over 64 MiB)
	$(BIN)/python scripts/gpu_pack.py --pythons $(GPU_PYTHONS) $(GPU_PACK_ARGS)

# On the GPU machine there is no .venv: its python3 holds torch.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:  ## on a GPU: install the pack, CUDA, pytest -m gpu, a short bench -> gpu-check.json
	$(GPU_PYTHON) scripts/gpu_check.py

# The results grid: its MLflow store of record is results/grid/ (committed with the results), so
# an interrupted grid resumes where it stopped: `make results` again skips every FINISHED cell,
# reruns the cell that was cut off, and rebuilds the report. Hours on a 2-core CPU. The committed
# stores stay small (they travel with the tree to a GPU machine: scripts/gpu_pack.py): the cells
# log no system metrics, and benchmark.tools.slim keeps only what the report reads.
RESULTS_STORE := sqlite:///$(CURDIR)/results/grid/mlflow.db
RESULTS_DATA ?= $(or $(BENCHMARK_DATA_ROOT),$(abspath $(CURDIR)/../shared/data))
RESULTS_CELL := tracking.uri=$(RESULTS_STORE) tracking.log_model=false tracking.system_metrics=false \
	paths.data_root=$(RESULTS_DATA) paths.cache_dir=$(CURDIR)/.cache/benchmark \
	trainer.enable_progress_bar=false
RESULTS_DATASETS := hymenoptera,simpsons,dogs_vs_cats,caltech256
# The fair fight (issue 21): every strategy that trains tuned with the same budget (tune=fair),
# once per cell on seed 0's validation split, its values reused by seeds 1 and 2
# (tune.reuse_seed=0: a sweep runs every seed 0 cell first). Order: the tuned Simpsons and
# Hymenoptera cells, then the untuned default recipes (their own columns: what tuning changed)
# and linear_probe (its C grid is its tuning), then the tuned Dogs vs. Cats cells (the most
# expensive, every strategy near 0.99 there), then protocol=study.
RESULTS_FAIR := tune=fair tune.reuse_seed=0 strategy=freeze,finetune,lp_ft
results-grid:  ## the grid's cells (Caltech-256 is not in ../shared: its rows say "not run")
	-$(BIN)/python -m benchmark -m seed=0,1,2 dataset=simpsons,hymenoptera dataset.classes=null \
	  colour=rgb,gray $(RESULTS_FAIR) $(RESULTS_CELL) hydra.sweep.dir=multirun/results/fair
	-$(BIN)/python -m benchmark -m seed=0,1,2 dataset=simpsons,hymenoptera,dogs_vs_cats \
	  dataset.classes=null colour=rgb,gray strategy=finetune,freeze,linear_probe,lp_ft $(RESULTS_CELL) \
	  hydra.sweep.dir=multirun/results/ours
	-$(BIN)/python -m benchmark -m seed=0,1,2 dataset=dogs_vs_cats dataset.classes=null \
	  colour=rgb,gray $(RESULTS_FAIR) $(RESULTS_CELL) hydra.sweep.dir=multirun/results/fair-dogs
	-$(BIN)/python -m benchmark -m seed=0,1,2 protocol=study dataset=hymenoptera colour=rgb,gray \
	  strategy=finetune,freeze $(RESULTS_CELL) hydra.sweep.dir=multirun/results/study

results: results-grid  ## the grid, then results/report.* from its store (slimmed first)
	$(BIN)/python -m benchmark.tools.slim --tracking-uri $(RESULTS_STORE)
	$(BIN)/python -m benchmark.report --tracking-uri $(RESULTS_STORE) --out results \
	  --datasets $(RESULTS_DATASETS)

# Which backbone (issue: any model, tuned cells, a ranking before training): the offline
# backbones ranked on frozen features, then freeze tuned on validation and linear_probe, every
# dataset and colour, 3 seeds; store results/backbones/, report results/backbones/report.*.
BACKBONES_STORE := sqlite:///$(CURDIR)/results/backbones/mlflow.db
BACKBONES := efficientnet_lite0,efficientnet_lite1,efficientnet_lite2
BACKBONES_CELL := tracking.uri=$(BACKBONES_STORE) tracking.log_model=false tracking.system_metrics=false \
	paths.data_root=$(RESULTS_DATA) paths.cache_dir=$(CURDIR)/.cache/benchmark \
	trainer.enable_progress_bar=false dataset=hymenoptera,simpsons,dogs_vs_cats \
	dataset.classes=null colour=rgb,gray backbone=$(BACKBONES)
backbones:  ## ranking, tuned freeze and linear_probe for each offline backbone (about an hour)
	$(BIN)/python -m benchmark.tools.rank $(BACKBONES_CELL)
	-$(BIN)/python -m benchmark -m seed=0,1,2 strategy=freeze tune.trials=10 $(BACKBONES_CELL) \
	  hydra.sweep.dir=multirun/backbones/freeze
	-$(BIN)/python -m benchmark -m seed=0,1,2 strategy=linear_probe $(BACKBONES_CELL) \
	  hydra.sweep.dir=multirun/backbones/linear_probe
	$(BIN)/python -m benchmark.tools.slim --tracking-uri $(BACKBONES_STORE)
	$(BIN)/python -m benchmark.report --tracking-uri $(BACKBONES_STORE) --out results/backbones

clean:
	rm -rf outputs multirun .pytest_cache
