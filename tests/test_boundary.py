"""The typed boundary (benchmark/config/spec.py): only the entry points touch Hydra's DictConfig;
below them functions take the typed spec or its groups, and every rule is checked before a run
opens."""

from __future__ import annotations

import ast
import re
import sqlite3
import subprocess
import sys
from contextlib import closing

from tests.conftest import PROJECT

PACKAGE = PROJECT / "benchmark"
# The entry points: the command, Hydra's launcher and sweep callbacks (their APIs hand over a
# DictConfig), and the boundary itself.
ENTRY_POINTS = {
    "benchmark/__main__.py",
    "benchmark/orchestration/launcher.py",
    "benchmark/orchestration/sweep.py",
    "benchmark/config/spec.py",
}
# The tools compose conf/ themselves (Hydra's compose API) and convert at once, as the command.
TOOLS = "benchmark/tools/"


def dictconfig_parameters(source: str) -> list[str]:
    """`function(param)` for every parameter annotated with DictConfig (or named cfg/config
    without an annotation, the old habit) in a module's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        arguments = node.args
        every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
        every += [a for a in (arguments.vararg, arguments.kwarg) if a]
        name = getattr(node, "name", "lambda")
        for argument in every:
            annotation = ast.unparse(argument.annotation) if argument.annotation else ""
            if "DictConfig" in annotation or (not annotation and argument.arg in {"cfg", "config"}):
                found.append(f"{name}({argument.arg})")
    return found


def test_the_check_finds_a_dictconfig_parameter():
    """The rule itself can fail: a function taking a DictConfig, annotated or as a bare `cfg`."""
    source = "def f(cfg: 'DictConfig'): ...\ndef g(x, cfg): ...\ndef h(spec: CellSpec): ...\n"
    assert dictconfig_parameters(source) == ["f(cfg)", "g(cfg)"]


def test_no_module_below_the_entry_points_takes_a_dictconfig():
    offenders = {}
    for module in sorted(PACKAGE.rglob("*.py")):
        relative = module.relative_to(PROJECT).as_posix()
        if relative in ENTRY_POINTS or relative.startswith(TOOLS):
            continue
        if found := dictconfig_parameters(module.read_text()):
            offenders[relative] = found
    assert not offenders, f"take the typed CellSpec (config/spec.py) instead: {offenders}"


def test_below_the_boundary_nothing_imports_omegaconf_but_the_config_layer():
    """Only the entry points and config/ (the schema registers with Hydra) import omegaconf."""
    importers = []
    for module in sorted(PACKAGE.rglob("*.py")):
        relative = module.relative_to(PROJECT).as_posix()
        if relative in ENTRY_POINTS or relative.startswith(("benchmark/config/", TOOLS)):
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "omegaconf" for n in names):
                importers.append(relative)
    assert not importers, importers


def test_lbfgs_on_an_unfrozen_backbone_is_refused_before_a_run_opens(tmp_path):
    """A cross-group rule (fit=lbfgs needs a frozen backbone), through the command as a user
    runs it: one line, exit 1, and no run in the store (the data is never read either)."""
    store = tmp_path / "mlflow.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmark",
            "strategy=linear_probe",
            "strategy.trainable_stages=1",
            f"tracking.uri=sqlite:///{store}",
            f"paths.data_root={tmp_path / 'no-data-here'}",
            f"hydra.run.dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stdout + done.stderr  # Hydra's job logging writes to stdout
    assert "strategy.fit=lbfgs fits on one device's features of a frozen backbone" in said
    assert "Traceback" not in said
    if store.exists():  # nothing was opened in it
        with closing(sqlite3.connect(store)) as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 0
    outcome = (tmp_path / "out" / "outcome.json").read_text()
    assert "ConfigError" in outcome


HAND_OVERS = ("RUN_ID_ENV", "SWEEP_ENV", "PARENT_RUN_ENV")
READERS = ["benchmark/report", "benchmark/tools/bench.py"]


def report_param_keys() -> set[str]:
    """Every `params.<key>` the report (and make bench) reads from MLflow's run frame."""
    keys = set()
    for where in READERS:
        path = PROJECT / where
        for module in [path] if path.is_file() else sorted(path.rglob("*.py")):
            keys |= set(re.findall(r"params\.([A-Za-z_][A-Za-z0-9_.]*)", module.read_text()))
    return keys


def test_every_param_the_report_reads_is_a_logged_name(make_cfg):
    """A renamed config key (or a misspelt one in the report) would silently empty a column: the
    keys the report reads must be run params of composed cells or the cell's LOGGED_PARAMS."""
    from benchmark.tracking import identity

    logged = set(identity.LOGGED_PARAMS)
    for overrides in [(), ("dataset=imagefolder",), ("dataset=csv",), ("backbone=timm",)]:
        logged |= set(identity.run_params(make_cfg(*overrides)))
    keys = report_param_keys()
    assert {"tune.trials", "protocol.selection", "backbone.model", "n_classes"} <= keys
    unknown = {
        k for k in keys if k not in logged and not any(n.startswith(k) for n in logged)
    }  # `n_` of f"params.n_{split}" is a prefix
    assert not unknown, f"the report reads params no cell logs: {sorted(unknown)}"


def test_the_hand_over_variables_are_named_once():
    """Processes hand over run ids and the sweep through environment variables: their names live
    in tracking/identity.py and every reader and writer uses the constant."""
    from benchmark.tracking import identity

    values = [getattr(identity, name) for name in HAND_OVERS]
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name == "identity.py":
            continue
        text = module.read_text()
        assert not [v for v in values if f'"{v}"' in text], module
