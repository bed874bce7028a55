"""A cell cut off mid-fit (SIGTERM, Ctrl-C, SIGKILL, a preemption, an error) resumes where it
stopped when it is relaunched, instead of fitting again from its start.

While it fits, a cell keeps in its output folder:

- STATE_FILE: the cell's key, the commit of its code, what its tuning chose (tune.trials) and the
  cell's seconds when its fit began; written once the tuning has ended, before the fit.
- `checkpoints/`LAST_FILE: the fit's whole state at the end of its latest epoch (weights,
  optimizer, schedule, loops, every callback's state, the random state:
  benchmark.models.resume), the cell's key in it too; beside it, the selection's candidates (the
  start and the best epoch so far).

A relaunch (`interrupted`) looks at the attempts of the cell that were cut off since it last
FINISHED (its FAILED or KILLED runs, newest first, each with its output folder: a relaunch of the
same command writes to a new one) and takes over the newest whose folder holds a last checkpoint
of this very cell (its key in the state file and in the checkpoint, the same commit): the fit
resumes from it, its candidates copied into this launch's folder. Failing that, the newest whose
state file says what its tuning chose: the fit runs from its start at those values, the tuning is
not run again. A state file or checkpoint of another cell or commit, or a damaged one, is passed
over with a warning; nothing of it is used. Once the cell FINISHED (`forget`), its last checkpoint
and state file are removed, and so are those the attempts it took over left: the selected model
is in its run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmark.cell.tune import Tuned
from benchmark.config.spec import CellSpec
from benchmark.models.resume import LAST_FILE, entry
from benchmark.runtime import ranks
from benchmark.tracking import identity
from benchmark.tracking.resume import interrupted_earlier

log = logging.getLogger("benchmark")

CHECKPOINTS = "checkpoints"  # in the cell's output folder: LAST_FILE and the candidates
STATE_FILE = "resume.json"  # in the cell's output folder (in CHECKPOINTS, Lightning would warn
# that a fresh fit's checkpoint folder is not empty)


@dataclass
class Attempt:
    """An interrupted attempt of the cell that this launch takes over."""

    run_id: str  # its run (FAILED or KILLED)
    output: Path  # its output folder
    tuned: Tuned | None  # what its tuning chose (None: an untuned cell)
    seconds: float  # the cell's seconds when what is taken over was kept
    checkpoint: Path | None = None  # its last checkpoint; None: cut off before an epoch ended
    epochs: int = 0  # the epochs its checkpoint holds: the resumed fit's first (0-based)
    steps: int = 0  # the optimizer steps its checkpoint holds
    # Its last epoch's curve points as the checkpoint kept them, and when it was written.
    curves: dict[str, float] = dataclasses.field(default_factory=dict)
    time_ms: int = 0


@dataclass
class Interrupted:
    """This cell's attempts cut off since it last FINISHED, as a relaunch finds them."""

    outputs: list[Path] = dataclasses.field(default_factory=list)  # their folders, newest first
    attempt: Attempt | None = None  # the one this launch takes over


def folder(spec: CellSpec) -> Path:
    """Where the cell keeps its checkpoints (the selection's candidates, and LAST_FILE)."""
    return spec.output_dir / CHECKPOINTS


def code() -> str | None:
    """The commit of the code that runs (None outside a git checkout of the project)."""
    return identity.git_tags().get(identity.GIT_COMMIT_TAG)


def another_cells(file: Path, kept: dict[str, Any], key: str) -> bool:
    """Whether what `file` kept is another cell's than the one of key `key` (said)."""
    if kept.get("cell_key") == key:
        return False
    log.warning(
        "Not resuming from %s: it is another cell's (%s, key %s), not this one's.",
        file,
        kept.get("cell", "?"),
        kept.get("cell_key"),
    )
    return True


def read_state(output: Path, key: str) -> dict[str, Any] | None:
    """The state file in the output folder `output`, if it is this cell's (its key) and kept by
    this code (its commit); else None, said (none there is said by nothing)."""
    file = output / STATE_FILE
    if not file.is_file():
        return None
    try:
        said = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        said = error
    if not isinstance(said, dict):
        log.warning("Not resuming from %s: damaged (%s).", file, said)
        return None
    if another_cells(file, said, key):
        return None
    if said.get("commit") != (now := code()):
        log.warning(
            "Not resuming from %s: kept by the code at commit %s, this is %s.",
            file,
            said.get("commit"),
            now,
        )
        return None
    return said


def kept_in(checkpoint: Path, key: str, cut_off: set[str]) -> dict[str, Any] | None:
    """What the cell added to its last checkpoint (benchmark.models.resume.ResumeState), if the
    file is whole, this cell's and written by one of its runs that were cut off (`cut_off`: not
    one that FINISHED, nor one still running); else None, said."""
    try:
        kept = entry(checkpoint)
    except Exception as error:  # torch.load's errors on a truncated or foreign file
        log.warning("Not resuming from %s: it cannot be read (%s).", checkpoint, error)
        return None
    if another_cells(checkpoint, kept, key):
        return None
    if kept.get("run_id") not in cut_off:
        log.warning(
            "Not resuming from %s: its run %s is not one of this cell's that were cut off "
            "since it last FINISHED.",
            checkpoint,
            kept.get("run_id"),
        )
        return None
    return kept


def tuned_of(said: dict[str, Any]) -> Tuned | None:
    """What the state file says the tuning chose (None: an untuned cell)."""
    tuned = said.get("tuned")
    if not isinstance(tuned, dict):
        return None
    names = {field.name for field in dataclasses.fields(Tuned)}
    return Tuned(**{name: value for name, value in tuned.items() if name in names})


def interrupted(spec: CellSpec, key: str) -> Interrupted:
    """The attempts of this cell cut off since it last FINISHED, and the one this launch takes
    over: the newest with a last checkpoint of this cell, else the newest whose tuning ended
    (a tuned cell), else none."""
    found = Interrupted()
    tuned_only = None
    earlier = interrupted_earlier(spec, key)
    cut_off = {run_id for run_id, _ in earlier}
    for _, output in earlier:
        if output in found.outputs:  # attempts relaunched into one folder
            continue
        found.outputs.append(output)
        if found.attempt is not None or (said := read_state(output, key)) is None:
            continue
        tuned, last = tuned_of(said), output / CHECKPOINTS / LAST_FILE
        kept = kept_in(last, key, cut_off) if last.is_file() else None
        if kept is not None:
            found.attempt = Attempt(
                str(kept["run_id"]),
                output,
                tuned,
                float(kept["seconds"]),
                last,
                int(kept["epochs"]),
                int(kept["steps"]),
                {name: float(value) for name, value in kept.get("curves", {}).items()},
                int(kept.get("time_ms", 0)),
            )
        elif tuned is not None and tuned_only is None and said.get("run_id") in cut_off:
            seconds = float(said.get("seconds", 0.0))
            tuned_only = Attempt(str(said["run_id"]), output, tuned, seconds)
    found.attempt = found.attempt or tuned_only
    if (attempt := found.attempt) is not None:
        where = (
            f"its fit resumes from {attempt.checkpoint}, {attempt.epochs} epoch(s) done"
            if attempt.checkpoint is not None
            else "its tuning's choice is taken over (the fit runs from its start)"
        )
        log.info("%s was cut off in run %s: %s.", spec.name, attempt.run_id, where)
    return found


def _same(one: Path, other: Path) -> bool:
    return one.resolve() == other.resolve()


def keep(
    spec: CellSpec,
    key: str,
    run_id: str,
    tuned: Tuned | None,
    attempt: Attempt | None,
    seconds: float,
) -> None:
    """Before the fit (rank 0 alone): this launch's output folder holds the cell's state file
    (its key, its run `run_id`, the commit, what its tuning chose, `seconds`: the cell's so
    far); a resumed fit's
    selection candidates are copied into its checkpoint folder from the attempt's; a last
    checkpoint of anything else there is removed first (a fit that does not resume writes its
    own at the end of its first epoch)."""
    if not ranks.is_rank_zero():
        return
    here = folder(spec)
    here.mkdir(parents=True, exist_ok=True)
    there = None if attempt is None or attempt.checkpoint is None else attempt.output / CHECKPOINTS
    if there is not None and not _same(there, here):
        for file in there.glob("*.ckpt"):
            if file.name != LAST_FILE:  # read where it is
                shutil.copy2(file, here / file.name)
    if there is None or not _same(there, here):
        (here / LAST_FILE).unlink(missing_ok=True)
    state = {
        "cell": spec.name,
        "cell_key": key,
        "run_id": run_id,
        "commit": code(),
        "tuned": None if tuned is None else dataclasses.asdict(tuned),
        "seconds": seconds,
    }
    partial = spec.output_dir / f"{STATE_FILE}.partial"
    partial.write_text(json.dumps(state, indent=1))
    os.replace(partial, spec.output_dir / STATE_FILE)


def forget(spec: CellSpec, key: str, earlier: Interrupted) -> None:
    """Once the cell FINISHED (rank 0 alone): its last checkpoint and state file are removed,
    and in the output folders of the attempts it was relaunched after, where their state file is
    this cell's, what they kept (their last checkpoints, candidates and state files). A file
    that cannot be removed is said, never fatal: the cell is done."""
    if not ranks.is_rank_zero():
        return
    for output in [spec.output_dir, *earlier.outputs]:
        ours = _same(output, spec.output_dir)
        if not ours and not _is_ours(output, key):
            continue
        here = output / CHECKPOINTS
        files = [here / LAST_FILE] if ours else sorted(here.glob("*.ckpt"))
        for file in [*files, output / STATE_FILE]:
            try:
                file.unlink(missing_ok=True)
            except OSError as error:
                log.warning("Could not remove %s (the cell FINISHED): %s", file, error)
        with suppress(OSError):  # a candidate of the selection may still be there
            here.rmdir()


def _is_ours(output: Path, key: str) -> bool:
    """Whether the output folder `output` holds this cell's state file (any commit)."""
    with suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        said = json.loads((output / STATE_FILE).read_text())
        return isinstance(said, dict) and said.get("cell_key") == key
    return False
