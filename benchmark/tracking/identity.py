"""What a cell is and what its run is called: names, params, the hashes that identify a cell, and
where runs are stored. No torch, Lightning or MLflow here: the report, the launchers and the
command line read it without paying for them.

- `cell_key`: what the cell computes, on which data (its resolved config less the volatile keys,
  plus the data's fingerprint): a relaunch skips a cell whose key FINISHED; changed data is a new
  key, so it runs again.
- `cell_group`: the same config less the seed (and without the data's fingerprint): the runs
  that the report may average over seeds. Runs that differ in anything else (epochs, lr,
  classes, a user dataset's folder...) are different groups, never pooled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import pandas as pd

from benchmark.config.spec import CellSpec

# The names users filter and group by: params.dataset, params.colour, ...
CELL_PARAMS = ("dataset", "colour", "strategy", "backbone")
# Config groups whose choice is logged under the group's own name (`head`, not `head.name`).
NAMED_GROUPS = (*CELL_PARAMS, "head", "augment", "optim", "protocol")
PROJECT_DIR = Path(__file__).resolve().parents[2]
log = logging.getLogger(__name__)

# Tags every run of the harness carries; anything else in an experiment is not a result of ours.
HARNESS_TAG = "benchmark.harness"
SCHEMA_TAG = "benchmark.schema"
SCHEMA_VERSION = "2"
KIND_TAG = "benchmark.kind"  # "cell", or "sweep" for a sweep's parent run
CELL_KEY_TAG = "cell_key"
CELL_GROUP_TAG = "cell_group"
DEBUG_TAG = "debug"  # "true" for a partial budget (limit_*_batches < 1, fast_dev_run, max_steps)
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "benchmark.git.dirty"  # "true": tracked code differed from that commit
# Tracked outputs, not code: `make results` writes its committed store there while its cells
# run, which must not make every cell of the grid read as run on uncommitted code.
OUTPUT_DIRS = ("results",)
# The metrics of a run of kind "rank" (benchmark.tools.rank), in the report's order.
RANK_SCORES = ("logme", "leep", "nce", "knn_val_acc")

# In a cell's output folder once its run has started: which run to end FAILED if the process is
# killed before the cell can (launchers, and the stale-run rule of `benchmark.tracking.store`).
RUN_FILE = "mlflow_run.json"
# In a cell's output folder when it ends, whichever launcher ran it: what happened (sweep.py).
OUTCOME_FILE = "outcome.json"
# Rank 0's run id, inherited by the ranks that Lightning's DDP launcher starts as subprocesses.
RUN_ID_ENV = "BENCHMARK_RUN_ID"
# The sweep folder and its parent run, for cells that run in processes of their own.
SWEEP_ENV = "BENCHMARK_SWEEP"
PARENT_RUN_ENV = "BENCHMARK_PARENT_RUN_ID"
# Params a cell logs beside its config's (run_params): what its data and path turned out to be.
# The report reads these names and the config's own keys (tests/test_boundary.py checks that every
# `params.<key>` it reads is one of them, so a renamed key breaks a test, not a report's column).
LOGGED_PARAMS = (
    "n_train",
    "n_val",
    "n_test",
    "n_classes",
    "n_skipped",
    "manifest_sha256",
    "input",
    "test_split",
    "n_merged_groups",
    "n_removed_near_duplicates",
)

# Where a cell writes and how it shows progress or logs, not what it computes: left out of its
# identity.
VOLATILE_KEYS = (
    "paths",
    "tracking",
    "rerun",
    "logger",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "data.num_workers",
)


def read_outcome(folder: Path) -> dict[str, object] | None:
    """What the cell in `folder` said in its OUTCOME_FILE: {} if it said nothing, None (and a
    warning naming the file) if the file is empty or damaged: one cell's broken file must never
    stop the report or the other cells."""
    file = folder / OUTCOME_FILE
    if not folder.name or not file.is_file():
        return {}
    try:
        said = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        said = error
    if isinstance(said, dict) and "status" in said:
        return said
    log.warning("Ignoring the damaged outcome file %s (%s): its cell counts as failed.", file, said)
    return None


def default_tracking_uri() -> str:
    """MLflow's own default store, with the path made absolute so every process agrees."""
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def store_uri(uri: str | None) -> str:
    """`tracking.uri`, or MLflow's default store when it is null. A server URI's userinfo
    (`http://user:secret@host`) moves to MLflow's own MLFLOW_TRACKING_USERNAME / _PASSWORD
    (unless they are set), so that MLflow, which prints and stores the URI it is given, never
    holds the secret; the cells a launcher starts inherit them."""
    uri = uri or default_tracking_uri()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def tracking_uri(spec: CellSpec) -> str:
    return store_uri(spec.tracking.uri)


# The userinfo of any URI in a text (`http://user:secret@host` -> `http://***@host`).
_USERINFO = re.compile(r"(?<=://)[^/?#\s'\"]*@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URI in it masked: what is logged or stored of a
    tracking URI (params, config artifacts, log lines) never carries its password or token.
    Credentials belong in MLFLOW_TRACKING_USERNAME / _PASSWORD or MLFLOW_TRACKING_TOKEN."""
    return _USERINFO.sub("***@", text)


def cell_name(spec: CellSpec) -> str:
    return spec.name


def run_params(spec: CellSpec) -> dict[str, object]:
    """Every key of the resolved config once: a group's choice under the group's name
    (`dataset`, `head`), everything else flattened (`strategy.lr`, `optim.momentum`...)."""
    flat = pd.json_normalize(spec.as_dict(), sep=".").iloc[0].to_dict()
    named = {group: flat.pop(f"{group}.name") for group in NAMED_GROUPS if f"{group}.name" in flat}
    return {**named, **flat}


def is_volatile(key: str, also: tuple[str, ...] = ()) -> bool:
    """Whether a flattened config key (`paths.output_dir`) is one of VOLATILE_KEYS (or `also`)
    or lies under one: where a cell writes or how it shows progress, not what it computes."""
    dropped = (*VOLATILE_KEYS, *also)
    return key in dropped or key.startswith(tuple(f"{k}." for k in dropped))


def _kept(params: dict[str, object], also: tuple[str, ...] = ()) -> dict[str, object]:
    """What identifies a cell: every key but the volatile ones, and no null key (null means
    "the default", as an absent key does: an option added later with a null default leaves the
    keys of the cells already run, and a relaunch still finds them)."""
    return {k: v for k, v in params.items() if v is not None and not is_volatile(k, also)}


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def cell_key(spec: CellSpec, data_sha256: str | None = None) -> str:
    """A stable hash of what the cell computes and on which data: the same command relaunched
    on the same files finds the cells it already finished."""
    return _digest([_kept(run_params(spec)), data_sha256])


def cell_group(spec: CellSpec) -> str:
    """The hash of the config less the seed: runs with one group differ only in their seed."""
    return _digest(_kept(run_params(spec), also=("seed",)))


def is_debug(spec: CellSpec) -> bool:
    """A partial budget: fewer batches than the data holds, a fast dev run or a step limit."""
    trainer = spec.trainer
    limits = [trainer.get(f"limit_{split}_batches", 1.0) for split in ("train", "val", "test")]
    partial = any(
        limit is not None and (isinstance(limit, int) or float(limit) < 1.0) for limit in limits
    )
    steps = trainer.get("max_steps", -1)
    return partial or bool(trainer.get("fast_dev_run", False)) or (steps not in (None, -1))


def _git(*args: str) -> str | None:
    """`git args` in the project's folder, its output; None when git or the checkout is not
    there."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def git_tags() -> dict[str, str]:
    """Which code a run comes from: the commit checked out (`mlflow.source.git.commit`) and
    whether tracked files outside OUTPUT_DIRS differ from it (`benchmark.git.dirty`,
    "true"/"false"). Nothing when the code is not a git checkout of this project (an installed
    copy), rather than the commit of whatever repository happens to enclose it."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != PROJECT_DIR:
        return {}
    commit, changed = (
        _git("rev-parse", "HEAD"),
        _git(
            "--no-optional-locks",
            "status",
            "--porcelain",
            "-uno",
            "--",
            ".",
            *(f":(exclude){folder}" for folder in OUTPUT_DIRS),
        ),
    )
    if commit is None:
        return {}
    return {GIT_COMMIT_TAG: commit, GIT_DIRTY_TAG: str(bool(changed)).lower()}
