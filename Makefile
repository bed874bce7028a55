# Entry points. `make install` then `make test` set up and check a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The store: $MLFLOW_TRACKING_URI, else ./mlflow.db (what `python -m benchmark` uses too).
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)
# pytest workers: one more than the cores (the end-to-end tests wait on their commands), at most
# 8 (each holds torch and a model); one torch/OpenMP thread each, not one per core per worker.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 8 ? n + 1 : 8 )))

.PHONY: install test test-slow run grid plan ui ui-check report report-check more-seeds data-stats bench \
	predict results results-grid backbones \
	gpu-pack gpu-check slurm-up slurm-down clean

install:  ## virtual environment with the package, torch and the dev tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'

test:  ## the default suite (no slow, no gpu); real images from ../shared/data; parallel
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

test-slow:  ## full-length trainings on the real data (minutes each)
	$(BIN)/pytest -m slow

run:  ## one cell with the defaults
	$(BIN)/python -m benchmark

grid:  ## the 4-cell Hymenoptera grid of the README
	$(BIN)/python -m benchmark -m colour=rgb,gray strategy=finetune,freeze

# The plan of a sweep before it runs (plan=true; nothing trains, no run opens): each cell, done
# or to run in the store, its images and estimated time, timed from the FINISHED runs of
# PLAN_HISTORY (default: the committed grid's store, where it is; empty: the sweep's own store).
# Any sweep, with its cell settings (tracking.uri: the store it would skip the done cells of):
# make plan PLAN_SWEEP='seed=0,1,2 dataset=simpsons,hymenoptera tune=fair paths.data_root=../shared/data'
PLAN_SWEEP ?= colour=rgb,gray strategy=finetune,freeze
PLAN_HISTORY ?= $(if $(wildcard results/grid/mlflow.db),sqlite:///$(CURDIR)/results/grid/mlflow.db)
plan:  ## the plan of a sweep, nothing run: make plan PLAN_SWEEP='seed=0,1,2 strategy=finetune,freeze'
	$(BIN)/python -m benchmark -m $(PLAN_SWEEP) plan=true \
	  $(if $(PLAN_HISTORY),tracking.history=$(PLAN_HISTORY))

# One server process, no job consumers; it prints the address of the runs table (the cells by
# test accuracy, accuracy columns shown) before it serves. UI_PORT=5001 for another port.
UI_PORT ?= 5000
ui:  ## MLflow's UI on the project's store: prints the address of its runs table, then serves it
	$(BIN)/python -m benchmark.tools.ui --tracking-uri $(TRACKING_URI) --port $(UI_PORT)

# Into a git-ignored folder: only `make results` writes the committed results/report.*.
REPORT_DIR ?= reports
report:  ## $(REPORT_DIR)/report.{md,csv,tex,html} (default reports/, git-ignored) from the runs in MLflow
	$(BIN)/python -m benchmark.report --tracking-uri $(TRACKING_URI) --out $(REPORT_DIR)

# More seeds where a verdict is undecided (README, Report): the plan alone, then with
# SEEDS_ARGS="--run paths.data_root=..." its cells, tagged as the second look of two.
SEEDS_ARGS ?=
more-seeds:  ## plan (SEEDS_ARGS=--run: launch) seeds for the contrasts still undecided, at most --cap
	$(BIN)/python -m benchmark.tools.seeds --tracking-uri $(TRACKING_URI) $(SEEDS_ARGS)

# A run's model on a folder of images (README, What each MLflow run holds): the model of a cell's
# run (MODEL=runs:/<run id>/model, or models:/<model id>), every image under IMAGES.
MODEL ?=
IMAGES ?=
PREDICTIONS ?= predictions.csv
predict:  ## a run's model on a folder: make predict MODEL=runs:/<run id>/model IMAGES=dir -> $(PREDICTIONS)
	@test -n '$(MODEL)' -a -n '$(IMAGES)' || \
	  { echo "make predict MODEL=runs:/<run id>/model IMAGES=<folder> [PREDICTIONS=out.csv]"; exit 2; }
	$(BIN)/python -m benchmark.tools.predict --tracking-uri $(TRACKING_URI) --model-uri '$(MODEL)' \
	  --images '$(IMAGES)' --out '$(PREDICTIONS)'

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
# The grid (issue 34, protocol v2): every strategy that trains tuned per seed on its own
# validation split (tune=fair: the same space and trial-epoch budget for each), linear_probe (its
# C grid is its tuning), 5 seeds of each dataset x colour, seeds slowest (every seed 0 cell first:
# the earliest complete comparison), Hymenoptera first (the cheapest), then Simpsons (its native
# test, and Kaggle's x0.357 set as the shift test of the same models), then Dogs vs. Cats; then
# protocol=study on Hymenoptera (the study's recipe and its maximum over epochs, a column of its
# own). No untuned columns: no declared contrast needs them. Before anything runs, the plan.
RESULTS_SEEDS ?= 0,1,2,3,4
RESULTS_TUNED := tune=fair strategy=linear_probe,freeze,lp_ft,finetune dataset.classes=null \
	colour=rgb,gray
results-grid:  ## the grid's cells (Caltech-256 is not in ../shared: its rows say "not run")
	$(BIN)/python -m benchmark -m seed=$(RESULTS_SEEDS) dataset=hymenoptera,simpsons,dogs_vs_cats \
	  $(RESULTS_TUNED) $(RESULTS_CELL) plan=true
	-for dataset in hymenoptera simpsons dogs_vs_cats; do \
	  $(BIN)/python -m benchmark -m seed=$(RESULTS_SEEDS) dataset=$$dataset $(RESULTS_TUNED) \
	    $(RESULTS_CELL) hydra.sweep.dir=multirun/results/$$dataset; done
	-$(BIN)/python -m benchmark -m seed=$(RESULTS_SEEDS) protocol=study dataset=hymenoptera \
	  colour=rgb,gray strategy=finetune,freeze $(RESULTS_CELL) hydra.sweep.dir=multirun/results/study

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

# A real one-node SLURM cluster on 127.0.0.1 (root: it installs Debian's slurm-wlm, slurmdbd,
# munge and mariadb-server if missing and writes /etc/slurm): hydra/launcher=slurm runs on it, and
# tests/test_slurm.py runs its jobs there. About 30 s the first time, seconds after that; a second
# `make slurm-up` checks and changes nothing (scripts/slurm.sh; status: scripts/slurm.sh status).
slurm-up:  ## start a one-node SLURM cluster with accounting on this machine (root; installs it)
	scripts/slurm.sh up

slurm-down:  ## stop the cluster of `make slurm-up` (packages, configs and accounting kept)
	scripts/slurm.sh down

clean:
	rm -rf outputs multirun .pytest_cache
