"""`python -m benchmark.tools.seeds --tracking-uri URI [--experiment NAME] [--cap 10]
[--alpha 0.05] [--margin 0.02] [--run] [key=value ...]`: more seeds where a verdict is undecided.

A two-look design over the report's declared primary contrasts (report/verdicts.py):

1. The first look, here: the verdicts on the store's initial seeds, at alpha/2 (Holm within each
   row, as the report decides). A contrast that is undecided, and that more seeds alone would
   decide (the report's estimate, `more_seeds`), gets seeds for both its cells: the next seeds
   after the largest seed the two share, as many as the estimate, never more than `--cap`
   seeds in a cell.
2. The second look: the report, once the store holds runs this mode added (tag
   `benchmark.look` = 2), decides every contrast at alpha/2 too.

Bonferroni over the two looks: the family-wise error over both stays at most alpha per row
(dataset x colour x backbone). The plan (a table, then the commands) is printed before anything
runs; without `--run` nothing runs. With it, each cell group is launched as one
`python -m benchmark -m seed=... <the cell's overrides> <the extra overrides>` subprocess with
BENCHMARK_LOOK=2 (its runs' tag), in turn; the harness skips a cell that already FINISHED, so
`--run` again completes an interrupted plan. The first look always reads the initial seeds
alone (runs without the tag): rerunning this tool never makes a third look.

A cell's overrides are read back from its run's params: the config groups' choices, and every
key whose logged value differs from what those choices compose to. They are checked before
anything is planned: the cell they compose (with the extra overrides, seed aside) must have
the run's `cell_group`, and read the data its runs read (`data_problem`), or the contrast is
left out of the plan with the reason.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import open_dict
from omegaconf.errors import OmegaConfBaseException

from benchmark.config.schema import register_configs
from benchmark.config.spec import CellSpec, from_config
from benchmark.data import DatasetError
from benchmark.report.tables import (
    column_names,
    latest_per_seed,
    load_predictions,
    load_runs,
    split_protocols,
)
from benchmark.report.verdicts import LOOK, ROW, UNDECIDED, VerdictRule, verdicts
from benchmark.tracking import identity
from benchmark.tracking.resume import cell_manifest
from benchmark.tracking.server import TrackingUnreachable, check_reachable
from benchmark.tracking.store import StoreError, check_sqlite

LOOKS = 2  # the first look (here) and the report's after the added seeds
ADDED_LOOK = "2"  # the tag benchmark.look of the runs this mode adds
DEFAULT_CAP = 10
CONF = identity.PROJECT_DIR / "conf"
# Config groups chosen on the command line by name; `tune` is logged as tune.name.
GROUPS = identity.NAMED_GROUPS
SHOWN_GROUPS = identity.CELL_PARAMS  # always written out, for a reader of the command
PLAN_COLUMNS = ["dataset", "colour", "contrast", "seeds now", "estimate", "seeds to add", "cells"]


class NotReproducible(Exception):
    """A cell whose overrides cannot be read back from its run, or compose to another cell."""


# ----------------------------------------------------------------- a cell's overrides, read back


def _literal(text: str) -> object:
    """A logged param (str(value)) as the value it was: numbers, booleans, None, lists..."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# A string Hydra reads as that string unquoted (`bf16-mixed`, `/data/x`): not a number, a
# boolean, null, inf or nan; anything else is quoted.
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./:-]*")
_HYDRA_WORDS = {"true", "false", "null", "inf", "nan"}


def hydra_value(value: object) -> str:
    """`value` in Hydra's override grammar: null, true, 1e-06, [a,b], {k:v}, a quoted string."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    plain = _PLAIN.fullmatch(text) and text.lower() not in _HYDRA_WORDS
    return text if plain else "'" + text.replace("'", "\\'") + "'"


def _typed(logged: str, like: object) -> object:
    """The logged text as the config holds it: a string where the composed value is one."""
    if logged == "None":
        return None
    return logged if isinstance(like, str) else _literal(logged)


def _is_config_key(key: str) -> bool:
    """A key of the config that is part of what the cell computes, but the seed and the groups'
    choices (not where it writes or how it shows progress). What a cell logs beside its config
    (its data's counts, what tuning chose) is never a key of the composed config."""
    return key != "seed" and key not in GROUPS and not identity.is_volatile(key)


def override_key(override: str) -> str:
    """`+a.b=1` -> `a.b`; `hydra/launcher=gpus` -> `hydra/launcher`."""
    return override.split("=", 1)[0].lstrip("+~")


def compose_cell(overrides: Sequence[str]) -> CellSpec:
    """The cell these overrides compose to (seed 0, no Hydra run folder; Hydra's own keys left
    out), its errors as NotReproducible."""
    cell = [o for o in overrides if not override_key(o).startswith(("hydra.", "hydra/"))]
    register_configs()
    try:
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=[*cell, "seed=0"])
        with open_dict(cfg):
            cfg.paths.output_dir = "outputs/seeds"
        return from_config(cfg)
    except (HydraException, OmegaConfBaseException, ValueError, TypeError) as error:
        said = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise NotReproducible(f"its overrides do not compose ({said})") from None


def _params(overrides: Sequence[str]) -> dict[str, object]:
    return identity.run_params(compose_cell(overrides))


def cell_overrides(params: Mapping[str, str], group: str) -> list[str]:
    """The Hydra overrides that make the cell of a run with these logged `params` and tag
    `cell_group` = `group` again, with any seed: the config groups' choices (dataset, colour,
    strategy and backbone always; the others, and tune, where not the default), then every key
    whose logged value differs from what those choices compose to (`+key` for a trainer key the
    config lacks), and `key=null` for a key the run did not log (it predates the key: null keeps
    its identity). Raises NotReproducible unless they compose to `group`."""
    defaults = _params([])
    choices = [
        f"{g}={params[g]}"
        for g in GROUPS
        if g in params and (g in SHOWN_GROUPS or str(defaults.get(g)) != params[g])
    ]
    if (tune := params.get("tune.name")) not in (None, "None", "none"):
        choices.append(f"tune={tune}")
    composed = _params(choices)
    keys: list[str] = []
    for key, logged in params.items():
        if not _is_config_key(key):
            continue
        if key in composed:
            if str(composed[key]) != logged:
                keys.append(f"{key}={hydra_value(_typed(logged, composed[key]))}")
        elif logged != "None" and key.startswith("trainer."):  # a Lightning argument added
            keys.append(f"+{key}={hydra_value(_literal(logged))}")
    for key, value in composed.items():
        if key not in params and value is not None and _is_config_key(key):
            keys.append(f"{key}=null")
    overrides = [*choices, *sorted(keys, key=override_key)]
    if (made := identity.cell_group(compose_cell(overrides))) != group:
        raise NotReproducible(
            f"its overrides compose to another cell (cell_group {made[:8]}, the run's "
            f"{group[:8]}): the config changed in a way its params cannot say"
        )
    return overrides


def data_problem(spec: CellSpec, params: Mapping[str, str]) -> str:
    """Empty when the data this cell reads here is the data its run read, else why not: its
    `data_sha256` (the images' content, the same for every seed), or for a run from before it,
    its classes and images (train + val + test). A cell group leaves its data out (a relaunch on
    changed data is the same group), so added seeds on other data would be pooled with the
    first ones: refused. A run that logged neither is not checked (no data read)."""
    logged = params.get(identity.DATA_PARAM)
    counts = [params.get(f"n_{k}") for k in ("classes", "train", "val", "test")]
    if not logged and any(c in (None, "None") for c in counts):
        return ""
    try:
        manifest = cell_manifest(spec)
    except (DatasetError, OSError, ValueError) as error:
        return f"its data cannot be read here ({error}): pass paths.data_root=..."
    if logged:
        if (now := manifest.content_sha256) == logged:
            return ""
        return f"its data changed (data_sha256 {logged[:8]}, now {now[:8]})"
    images = int(manifest.frame.split.isin(["train", "val", "test"]).sum())
    classes = len(manifest.classes)
    then = (int(float(str(counts[0]))), sum(int(float(str(c))) for c in counts[1:]))
    if then == (classes, images):
        return ""
    return (
        f"its data changed ({then[0]} classes, {then[1]} images then; {classes} and {images} "
        "now): added seeds would be pooled with runs on other data"
    )


def with_extra(overrides: Sequence[str], extra: Sequence[str], group: str) -> list[str]:
    """The cell's overrides with the user's `extra` ones (theirs win a key both set), checked:
    still the cell `group` (extra overrides may say where and how a cell runs, never what it
    computes)."""
    theirs = {override_key(o) for o in extra}
    combined = [o for o in overrides if override_key(o) not in theirs] + list(extra)
    if (made := identity.cell_group(compose_cell(combined))) != group:
        raise NotReproducible(
            f"the extra overrides {' '.join(extra)} change what the cell computes (cell_group "
            f"{made[:8]}, the run's {group[:8]}): pass only where and how it runs (paths.*, "
            "tracking.*, data.num_workers, trainer.enable_progress_bar, hydra...)"
        )
    return combined


# ----------------------------------------------------------------------- the first look, a plan


@dataclass(frozen=True)
class FirstLook:
    """The verdicts of the first look and the counted FINISHED runs they rest on (column
    `column`, as the report names them); `added`: runs of the second look in the store already
    (left out here)."""

    contrasts: pd.DataFrame
    counted: pd.DataFrame
    added: int
    uri: str


def first_look(uri: str, experiment: str, rule: VerdictRule) -> FirstLook:
    """The report's own verdicts on the initial seeds: its runs (protocol=study's apart), of
    each cell and seed the latest FINISHED, without the runs a second look added."""
    loaded = load_runs(uri, experiment)
    runs, _ = split_protocols(loaded.frame)
    added = runs[LOOK].notna() if LOOK in runs else pd.Series(False, index=runs.index)
    counted = latest_per_seed(runs[~added])
    counted = counted[counted.status == "FINISHED"]
    counted = counted.assign(column=column_names(counted))
    contrasts = verdicts(counted, load_predictions(counted, uri), rule)
    return FirstLook(contrasts, counted, int(added.sum()), uri)


@dataclass
class Cell:
    """One cell of a planned contrast: its row and report column, its FINISHED seeds, the seeds
    to add, and the overrides that relaunch it (`problem`: why it cannot be)."""

    row: tuple
    column: str
    seeds: tuple[int, ...]
    add: set[int] = field(default_factory=set)
    group: str = ""
    overrides: list[str] = field(default_factory=list)
    problem: str = ""

    @property
    def after(self) -> int:
        return len(set(self.seeds) | self.add)


@dataclass
class Plan:
    """The planned contrasts (`table`, PLAN_COLUMNS), the cells to launch, and the undecided
    contrasts left out, each with why."""

    table: pd.DataFrame
    cells: list[Cell]
    left_out: list[str]


def _why(text: str) -> str:
    """Why an undecided contrast gets no estimate, from its verdict's text ("a vs b: undecided
    (+0.010 [-0.020, +0.040]; more seeds alone would not: ...)")."""
    inner = text.split(": undecided (", 1)[-1].removesuffix(")")
    return inner.split("; ", 1)[1] if "; " in inner else inner


def _seeds(runs: pd.DataFrame) -> tuple[int, ...]:
    return tuple(sorted({int(s) for s in pd.to_numeric(runs.seed, errors="coerce").dropna()}))


def _said(seeds: Iterable[int]) -> str:
    return ", ".join(str(s) for s in sorted(seeds))


class Wanted(NamedTuple):
    """An undecided contrast that more seeds would decide: its name, its verdict (a row of the
    first look's contrasts), the seeds it asks for, and its two cells."""

    name: str
    contrast: Any
    new: list[int]
    pair: list[Cell]


def _wanted(
    look: FirstLook, cap: int, cells: dict[tuple, Cell], left_out: list[str]
) -> list[Wanted]:
    """The seeds each undecided contrast asks for: the first `more` seeds after the largest seed
    both cells FINISHED, fewer where a cell would pass `cap` seeds. Its cells are taken from (or
    added to) `cells`; a contrast without an estimate, or at the cap, is said in `left_out`."""
    counted = look.counted
    wanted = []
    for c in look.contrasts[look.contrasts.verdict == UNDECIDED].itertuples(index=False):
        row = tuple(getattr(c, k) for k in ROW)
        name = f"{row[0]}/{row[1]} {c.kind}: {c.a} vs {c.b}"
        if pd.isna(c.more_seeds):
            left_out.append(f"{name}: {_why(str(c.text))}")
            continue
        where = counted[_in_row(counted, row)]
        pair = [
            cells.setdefault((row, col), Cell(row, col, _seeds(where[where.column == col])))
            for col in (c.a, c.b)
        ]
        shared = set(pair[0].seeds) & set(pair[1].seeds)
        top = max(shared) if shared else -1
        new = [top + 1 + i for i in range(min(int(c.more_seeds), max(cap - len(shared), 0)))]
        while new and any(len(set(x.seeds) | set(new)) > cap for x in pair):
            new.pop()  # a cell with seeds of its own beyond the shared ones
        if not new:
            left_out.append(f"{name}: at the cap ({len(shared)} paired seeds, --cap {cap})")
            continue
        wanted.append(Wanted(name, c, new, pair))
    return wanted


def _relaunchable(
    wanted: list[Wanted],
    look: FirstLook,
    reproduce: bool,
    extra: Sequence[str],
    left_out: list[str],
) -> list[Wanted]:
    """The contrasts whose cells can be relaunched; `reproduce`: each cell that gets seeds first
    has its overrides read back (with `extra`). The others are said in `left_out`."""
    if reproduce:
        needed = {id(x): x for _, _, new, pair in wanted for x in pair if set(new) - set(x.seeds)}
        for x in needed.values():
            _reproduce(x, look.counted, look.uri, extra)
    kept = []
    for name, c, new, pair in wanted:
        if problems := [f"{x.column}: {x.problem}" for x in pair if x.problem]:
            left_out.append(f"{name}: cannot relaunch {'; '.join(problems)}")
        else:
            kept.append(Wanted(name, c, new, pair))
    return kept


def _add_seeds(kept: list[Wanted], cells: Iterable[Cell], cap: int) -> None:
    """Each cell's seeds to add: the union over its contrasts, trimmed to `cap` seeds."""
    for _, _, new, pair in kept:  # a cell in several contrasts: the union...
        for x in pair:
            x.add |= set(new) - set(x.seeds)
    for x in cells:  # ...within the cap
        while x.after > cap:
            x.add.discard(max(x.add))


def _plan_rows(kept: list[Wanted], cap: int, left_out: list[str]) -> list[dict[str, Any]]:
    """The plan's table (PLAN_COLUMNS), a row per contrast that still gets seeds; one whose
    seeds the cap took away is said in `left_out`."""
    table = []
    for name, c, new, pair in kept:
        adds = [x for x in pair if x.add & set(new)]
        if not adds:
            left_out.append(f"{name}: past the cap (--cap {cap})")
            continue
        table.append(
            {
                "dataset": c.dataset,
                "colour": c.colour,
                "contrast": f"{c.kind}: {c.a} vs {c.b}",
                "seeds now": int(c.seeds),
                "estimate": f"~{c.more_seeds:.0f} more",
                "seeds to add": _said(set(new) & set().union(*(x.add for x in pair))),
                "cells": "; ".join(f"{x.column} +{_said(x.add & set(new))}" for x in adds),
            }
        )
    return table


def plan(look: FirstLook, cap: int, reproduce: bool = True, extra: Sequence[str] = ()) -> Plan:
    """Which seeds each cell of an undecided contrast gets: the first `more` seeds after the
    largest seed both cells FINISHED (`more`: the report's estimate of how many more seeds
    would decide it), fewer where a cell would pass `cap` seeds. A cell in several contrasts
    gets the union, trimmed to `cap`. `reproduce`: read each cell's overrides back from its
    latest run (the store's params) and leave out a contrast whose cells cannot be relaunched."""
    cells: dict[tuple, Cell] = {}
    left_out: list[str] = []
    wanted = _wanted(look, cap, cells, left_out)
    kept = _relaunchable(wanted, look, reproduce, extra, left_out)
    _add_seeds(kept, cells.values(), cap)
    table = _plan_rows(kept, cap, left_out)
    launch = list({id(x): x for _, _, _, pair in kept for x in pair if x.add}.values())
    return Plan(pd.DataFrame(table, columns=PLAN_COLUMNS), launch, left_out)


def _in_row(runs: pd.DataFrame, row: tuple) -> pd.Series:
    return runs[ROW].astype(str).eq([str(v) for v in row]).all(axis=1)


def _reproduce(cell: Cell, counted: pd.DataFrame, uri: str, extra: Sequence[str]) -> None:
    """`cell.overrides` (with `extra`) from its latest counted run's params, or `cell.problem`."""
    runs = counted[_in_row(counted, cell.row) & counted.column.eq(cell.column)]
    client = mlflow.MlflowClient(uri)
    found = [client.get_run(str(r)) for r in runs.sort_values("start_time").run_id]
    groups = {run.data.tags.get(identity.CELL_GROUP_TAG) for run in found}
    run = found[-1]
    cell.group = run.data.tags.get(identity.CELL_GROUP_TAG, "")
    try:
        if len(groups) > 1:
            raise NotReproducible("its seeds ran as different cell groups")
        overrides = cell_overrides(run.data.params, cell.group)
        cell.overrides = with_extra(overrides, extra, cell.group)
    except NotReproducible as error:
        cell.problem = str(error)
        return
    cell.problem = data_problem(compose_cell(cell.overrides), run.data.params)


def command(cell: Cell, uri: str, experiment: str, sweep_dir: Path) -> list[str]:
    """`python -m benchmark -m seed=... <overrides>`: the store and experiment of the first
    look and a sweep folder of its own, unless the extra overrides say otherwise."""
    said = {override_key(o) for o in cell.overrides}
    own = [f"tracking.uri={uri}", f"tracking.experiment={experiment}"]
    own.append(f"hydra.sweep.dir={sweep_dir}")
    own = [o for o in own if override_key(o) not in said]
    seeds = ",".join(str(s) for s in sorted(cell.add))
    return [sys.executable, "-m", "benchmark", "-m", f"seed={seeds}", *cell.overrides, *own]


def error_rate(rule: VerdictRule) -> str:
    """The procedure's error rate, in words."""
    return (
        f"Two looks, alpha={rule.alpha:g} split between them (Bonferroni, {rule.look_alpha:g} "
        f"each): this first look decides on the initial seeds at {rule.look_alpha:g} (Holm "
        "within each dataset x colour row) and picks the undecided contrasts to add seeds to; "
        f"the report, once the store holds the added runs (tag {identity.LOOK_TAG}="
        f"{ADDED_LOOK}), decides every contrast at {rule.look_alpha:g} again. The family-wise "
        f"error over both looks is at most {rule.alpha:g} per row."
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.tools.seeds",
        description="More seeds where a verdict is undecided: a plan, then with --run the cells.",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    parser.add_argument("--experiment", default="benchmark")
    parser.add_argument(
        "--cap", type=int, default=DEFAULT_CAP, help="never more seeds than this in a cell"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=VerdictRule.alpha,
        help="family-wise error per row over both looks (each look decides at alpha/2)",
    )
    parser.add_argument("--margin", type=float, default=VerdictRule.margin, help="δ, as the report")
    parser.add_argument("--run", action="store_true", help="launch the plan (else: print it)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every cell")
    return parser


def verdict_rule(margin: float, alpha: float, cap: int) -> VerdictRule:
    """The two looks' rule for this margin and alpha; ValueError for a bad one or a cap under 2."""
    rule = VerdictRule(margin=margin, alpha=alpha, looks=LOOKS)
    if cap < 2:
        raise ValueError(f"cap={cap}: use 2 or more")
    return rule


def say_procedure(rule: VerdictRule, alpha: float, look: FirstLook) -> None:
    """The error rate, and notes on an alpha other than the report's and on runs of the second
    look already in the store."""
    print(error_rate(rule))
    if alpha != VerdictRule.alpha:
        print(
            f"note: the report decides at its alpha={VerdictRule.alpha:g} (halved once the "
            "added runs are in): the rate above holds when both use the same alpha."
        )
    if look.added:
        print(
            f"{look.added} run(s) of the second look are in the store already: this plan is "
            "the first look's, on the initial seeds alone; --run completes it (FINISHED cells "
            "are skipped), never a third look."
        )


def say_plan(look: FirstLook, made: Plan, rule: VerdictRule, cap: int) -> None:
    """The first look in one line, the plan's table and the undecided contrasts left out."""
    undecided = int((look.contrasts.verdict == UNDECIDED).sum())
    print(
        f"\nFirst look: {len(look.contrasts)} primary contrast(s), {undecided} undecided at "
        f"alpha={rule.look_alpha:g}; {len(made.table)} get more seeds (at most {cap} a cell)."
    )
    if len(made.table):
        print("\n" + made.table.to_markdown(index=False))
    if made.left_out:
        print("\nUndecided, no seeds added:\n" + "\n".join(f"- {s}" for s in made.left_out))


def plan_commands(cells: list[Cell], uri: str, experiment: str) -> list[list[str]]:
    """The command of each cell group to launch, each in a sweep folder of its own, said."""
    stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
    commands = [
        command(cell, uri, experiment, Path("multirun", "more-seeds", stamp, str(i)))
        for i, cell in enumerate(cells)
    ]
    runs = sum(len(cell.add) for cell in cells)
    print(f"\n{runs} run(s) in {len(commands)} cell group(s):")
    for line in commands:
        print(f"  {identity.LOOK_ENV}={ADDED_LOOK} {identity.redact(shlex.join(line))}")
    return commands


def launch(commands: list[list[str]], uri: str, rule: VerdictRule) -> int:
    """Each command in turn, its runs tagged as the second look; 1 if any failed, else 0."""
    sys.stdout.flush()
    env = {**os.environ, identity.LOOK_ENV: ADDED_LOOK}
    failed = 0
    for i, line in enumerate(commands, 1):
        print(f"\n[{i}/{len(commands)}] {identity.redact(shlex.join(line[2:]))}", flush=True)
        if (code := subprocess.run(line, env=env, check=False).returncode) != 0:
            failed += 1
            print(f"exit status {code}", file=sys.stderr, flush=True)
    print(
        f"\n{len(commands) - failed} of {len(commands)} cell group(s) ran; then the report "
        f"(python -m benchmark.report --tracking-uri {identity.redact(uri)}) decides at "
        f"alpha={rule.look_alpha:g}."
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmark.tools.seeds`: the first look's plan, then with --run its cells."""
    args = build_parser().parse_args(argv)
    try:
        rule = verdict_rule(args.margin, args.alpha, args.cap)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    identity.use_credentials(given)
    uri = identity.store_uri(given)
    try:
        check_reachable(uri)
        check_sqlite(uri, write=False)
        look = first_look(uri, args.experiment, rule)
    except (LookupError, TrackingUnreachable, StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    say_procedure(rule, args.alpha, look)
    made = plan(look, args.cap, extra=args.overrides)
    say_plan(look, made, rule, args.cap)
    if not made.cells:
        print("\nNothing to add.")
        return 0
    commands = plan_commands(made.cells, uri, args.experiment)
    if not args.run:
        print("\nPlan only: --run launches it.")
        return 0
    return launch(commands, uri, rule)


if __name__ == "__main__":
    sys.exit(main())
