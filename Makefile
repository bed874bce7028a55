# Entry points. `make install` then `make test` set up and check a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The store: $MLFLOW_TRACKING_URI, else ./mlflow.db (what `python -m benchmark` uses too).
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///$(CURDIR)/mlflow.db)

.PHONY: install test test-slow lint run grid ui report clean

install:  ## virtual environment with the package, torch and the dev tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'

test:  ## the default suite (no slow, no gpu); real images from ../shared/data
	$(BIN)/ruff check .
	$(BIN)/pytest

test-slow:  ## full-length trainings on the real data (minutes each)
	$(BIN)/pytest -m slow

run:  ## one cell with the defaults
	$(BIN)/python -m benchmark

grid:  ## the 4-cell Hymenoptera grid of the README
	$(BIN)/python -m benchmark -m colour=rgb,gray strategy=finetune,freeze

ui:  ## MLflow's UI on the project's store
	$(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI)

report:  ## results/report.md and results/report.csv from the runs in MLflow
	$(BIN)/python -m benchmark.report --tracking-uri $(TRACKING_URI) --out results

clean:
	rm -rf outputs multirun .pytest_cache
