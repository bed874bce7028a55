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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

import pandas as pd
import yaml

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
# The kind of a tuning trial's run, a child of its cell's run (benchmark.cell.mlflow_run's
# TrialRuns): the harness's, and never a cell.
TRIAL_KIND = "trial"
CELL_KEY_TAG = "cell_key"
CELL_GROUP_TAG = "cell_group"
DEBUG_TAG = "debug"  # "true" for a partial budget (limit_*_batches < 1, fast_dev_run, max_steps)
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GIT_DIRTY_TAG = "benchmark.git.dirty"  # "true": tracked code differed from that commit
# Where a cell's run wrote its files (its output folder; where a relaunch looks for what an
# interrupted attempt kept), and the run of the interrupted attempt a resumed cell took over.
OUTPUT_DIR_TAG = "hydra_output_dir"
RESUMED_FROM_TAG = "benchmark.resumed_from"
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
# A run added by a second look (benchmark.tools.seeds: more seeds where a verdict is undecided)
# carries the tag LOOK_TAG with the look's number, from LOOK_ENV in its process; the report then
# splits its alpha between the looks (report/verdicts.py, `looks`).
LOOK_ENV = "BENCHMARK_LOOK"
LOOK_TAG = "benchmark.look"
# Params a cell logs beside its config's (run_params): what its data and path turned out to be.
# The report reads these names and the config's own keys (tests/test_boundary.py checks that every
# `params.<key>` it reads is one of them, so a renamed key breaks a test, not a report's column).
# The dataset's images by content (path, label, bytes), the same for every seed: the report
# tells a user's datasets apart by it (`content_labels`), not by their folders' names.
DATA_PARAM = "data_sha256"
LOGGED_PARAMS = (
    DATA_PARAM,
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
    "plan",
    "verbose",
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


def _with_userinfo(uri: str | None) -> SplitResult | None:
    """A server URI (http, https) that carries a login (`http://user:secret@host`), split."""
    parts = urlsplit(uri or "")
    return parts if parts.scheme in ("http", "https") and "@" in parts.netloc else None


def store_uri(uri: str | None) -> str:
    """`tracking.uri`, or MLflow's default store when it is null; a server URI without its
    userinfo (`http://user:secret@host` -> `http://host`), so that MLflow, which prints and
    stores the URI it is given, never holds the secret: `use_credentials` hands the login to
    MLflow. Only a reading: the environment is left as it is."""
    uri = uri or default_tracking_uri()
    if (parts := _with_userinfo(uri)) is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def use_credentials(uri: str | None) -> None:
    """A server URI's login (`http://user:secret@host`) into MLflow's own
    MLFLOW_TRACKING_USERNAME / _PASSWORD, unless they are set: MLflow reaches the server at
    `store_uri(uri)` with them, and the processes this one starts (a launcher's cells) inherit
    them. The one place the harness writes them, called by each entry point before it reaches a
    store (the command's cell and sweep, the launchers, the report, the tools)."""
    if (parts := _with_userinfo(uri)) is None:
        return
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    if parts.password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))


def tracking_uri(spec: CellSpec) -> str:
    return store_uri(spec.tracking.uri)


def browse_command(uri: str) -> str:
    """The command that opens the MLflow UI on the store at `uri` (benchmark.tools.ui, `make
    ui`: it prints the address of the runs table), its password masked."""
    return redact(f"python -m benchmark.tools.ui --tracking-uri {uri}")


# The userinfo of any URI in a text (`http://user:secret@host` -> `http://***@host`).
_USERINFO = re.compile(r"(?<=://)[^/?#\s'\"]*@")
MASK = "***"
# Variables that hold secrets: those the harness's stores, clouds and downloads read, and any
# environment-style name (upper case) that says it holds one: PASSWORD, PASSWD, SECRET, TOKEN,
# CREDENTIAL(S), APIKEY / API_KEY anywhere in it, or ending in _KEY (AWS_SECRET_ACCESS_KEY,
# AZURE_STORAGE_ACCESS_KEY, KAGGLE_KEY...).
SECRET_VARIABLES = frozenset(
    {
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AZURE_STORAGE_ACCESS_KEY",
        "AZURE_STORAGE_CONNECTION_STRING",
        "DATABRICKS_TOKEN",
        "KAGGLE_KEY",
        "HF_TOKEN",
    }
)
_SECRET_NAME = (
    r"[A-Z0-9_]*(?:PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIALS?|APIKEY|API_KEY)[A-Z0-9_]*"
    r"|[A-Z0-9_]*_KEY|" + "|".join(sorted(SECRET_VARIABLES))
)
# `NAME=value`, `NAME: value`, `"NAME": "value"`, `'NAME': 'value'` with a secret's name: the
# value, quoted or not (after `=`: up to a blank; after `:`, as YAML writes it: the line's rest).
_SECRET_SETTING = re.compile(
    rf"(?<![A-Za-z0-9_])(?P<name>{_SECRET_NAME})(?![A-Za-z0-9_])"
    r"(?P<sep>[\"']?[ \t]*(?P<op>[:=])[ \t]*)"
    r"(?:\"(?P<dq>[^\"\n]*)\"|'(?P<sq>[^'\n]*)'|(?P<bare>[^\s'\"][^\n]*))"
)
# A secret variable's value is masked wherever it appears, once it is this long (a shorter one
# would mask common words).
MIN_SECRET_CHARS = 8


def is_secret_name(name: str) -> bool:
    """Whether a variable (or a config key's last part) named so holds a secret."""
    return re.fullmatch(_SECRET_NAME, name.rsplit(".", 1)[-1]) is not None


def _masked_setting(match: re.Match[str]) -> str:
    head = match["name"] + match["sep"]
    if match["dq"] is not None:
        return f'{head}"{MASK}"'
    if match["sq"] is not None:
        return f"{head}'{MASK}'"
    if match["op"] == "=":  # an override or a shell-style setting: the value ends at a blank
        rest = match["bare"]
        end = len(rest.split(maxsplit=1)[0])
        return f"{head}{MASK}{rest[end:]}"
    return f"{head}'{MASK}'"  # YAML: `***` unquoted would be an alias


def _secret_values() -> list[str]:
    """The values of the secret variables set in this process, longest first."""
    # By name, each read with get: MLflow's telemetry thread may drop a variable meanwhile
    # (os.environ.items() then raised KeyError '_MLFLOW_TELEMETRY_SESSION_ID' in a cell).
    values = set()
    for name in list(os.environ):
        value = os.environ.get(name)
        if value is not None and len(value) >= MIN_SECRET_CHARS and is_secret_name(name):
            values.add(value)
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret in it masked: the userinfo of every URI (what is logged or
    stored of a tracking URI never carries its password or token), the value set for any
    secret variable (`+hydra.job.env_set.MLFLOW_TRACKING_PASSWORD=...` in Hydra's hydra.yaml,
    `KAGGLE_KEY: ...`; see SECRET_VARIABLES) and the value of each such variable set in the
    environment, wherever it appears. Credentials belong in MLFLOW_TRACKING_USERNAME /
    _PASSWORD or MLFLOW_TRACKING_TOKEN."""
    text = _SECRET_SETTING.sub(_masked_setting, _USERINFO.sub(f"{MASK}@", text))
    for value in _secret_values():
        text = text.replace(value, MASK)
    return text


@overload
def redact_all(value: Mapping[str, Any], key: str = "") -> dict[str, Any]: ...
@overload
def redact_all(value: object, key: str = "") -> object: ...
def redact_all(value: object, key: str = "") -> object:
    """`value` (a dict of params, a config) with every string in it through `redact`, and the
    value of every key named as a secret (is_secret_name) masked whole."""
    if isinstance(value, Mapping):
        return {k: redact_all(item, str(k)) for k, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_all(item, key) for item in value]
    if key and value is not None and is_secret_name(key):
        return MASK
    return redact(value) if isinstance(value, str) else value


class Redacting(logging.Filter):
    """On a logger: each record's message (and traceback) through `redact`, before any handler
    (the terminal, a cell's `__main__.log`) writes it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it itself
            return True
        if (masked := redact(message)) != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            trace = logging.Formatter().formatException(record.exc_info)
            if (masked := redact(trace)) != trace:
                record.exc_text = masked
        return True


# The loggers whose lines the harness writes: its own, and Hydra's launchers', which log each
# cell's overrides (a tracking URI with a password, an env_set secret). A filter on a logger
# sees only its own records, not its children's: each is named.
REDACTED_LOGGERS = (
    "benchmark",
    __name__,
    "benchmark.data.sources",
    "hydra._internal.core_plugins.basic_launcher",
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
)


def redact_logs() -> None:
    """Install the `Redacting` filter on REDACTED_LOGGERS, once (idempotent)."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Redacting) for f in logger.filters):
            logger.addFilter(Redacting())


redact_logs()  # every process of the harness imports this module before it logs


def content_labels(labels: pd.Series, runs: pd.DataFrame) -> pd.Series:
    """The report's dataset `labels` of `runs` (params.* columns), with a user's datasets (a
    label other than params.dataset: imagefolder:photos) told apart by content. Where runs with
    one label ran on different data (DATA_PARAM; a run from before it was logged: its folder or
    file), each gets `@` and its data's first 8 hex digits (or `@<folder>`): two folders named
    alike (projA/photos, projB/photos), or one whose images changed, are never pooled."""
    labels = labels.astype(object).copy()
    own = labels.ne(runs["params.dataset"]) & labels.notna()
    content = pd.Series(None, index=runs.index, dtype=object)
    if f"params.{DATA_PARAM}" in runs:
        digests = runs[f"params.{DATA_PARAM}"]
        content = digests.map(lambda d: d[:8] if isinstance(d, str) else None).astype(object)
    for key in ("params.dataset.root", "params.dataset.file"):
        if key in runs:
            content = content.where(content.notna(), runs[key].astype(object))
    for label, rows in content[own].groupby(labels[own], dropna=False):
        if rows.nunique(dropna=False) > 1:
            labels[rows.index] = str(label) + "@" + rows.astype(str)
    return labels


def cell_name(spec: CellSpec) -> str:
    return spec.name


# The longest run name (`run_name`): a list column in the UI shows about 40 characters anyway.
RUN_NAME_CHARS = 100
# The keys `spec.name` already says: their overrides are left out of `run_name`.
NAMED_KEYS = (*CELL_PARAMS, "seed")


def _says_more(override: str) -> bool:
    """Whether a Hydra override (`trainer.max_epochs=2`, `+key=1`, `++key=1`, `~key`) changes
    what the cell computes beyond what its name says."""
    key = override.lstrip("~+").partition("=")[0].strip()
    return key.split(".")[0] != "hydra" and key not in NAMED_KEYS and not is_volatile(key)


def run_name(spec: CellSpec, overrides: Sequence[str] = ()) -> str:
    """The name of the cell's MLflow run: the cell's name (dataset-colour-strategy-backbone-
    seed=N), then the command's overrides that change what it computes beyond that name, as
    typed (`trainer.max_epochs=2`, `experiment=smoke`, `tune=fair`): two runs of one cell
    with different settings are told apart in the runs table. Where a cell writes and how it
    shows progress (VOLATILE_KEYS: paths, tracking, progress bars...) and what the name says
    already are left out; the whole is cut to RUN_NAME_CHARS. Only a label: `spec.name` (the
    output folder's, the Optuna study's) and the cell key do not depend on it."""
    said = [override for override in overrides if _says_more(override)]
    name = redact(" ".join([spec.name.replace("/", "-"), *said]))  # a URI's password, a token
    return name if len(name) <= RUN_NAME_CHARS else name[: RUN_NAME_CHARS - 3].rstrip() + "..."


def task_overrides(folder: Path) -> list[str]:
    """The command-line overrides of the Hydra job whose output folder is `folder` (its
    .hydra/overrides.yaml, which Hydra writes before the job starts); [] when there is none or
    it cannot be read (a cell composed without Hydra's runtime, a test's)."""
    try:
        said = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    return [str(o) for o in said] if isinstance(said, list) else []


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
