"""Can a cell's number be trusted: how its fits went, and which code made it.

Pure pandas on the counted FINISHED runs (`tables.latest_per_seed`), no store involved.

- Diagnoses, one mark each, per seed (a seed may carry several; a cell carries its seeds'):
  diverged (validation peaked early and fell far), below its start (a fit from a fitted head,
  lp_ft's probe, that ended below it), may be undertrained (validation accuracy still rising at
  the end, or a low final training accuracy) and overfit (training fitted while validation fell
  from its best). The rules and their thresholds: `ConvergenceRule`. A run without the metrics a
  rule needs (from before the cell logged them) is "not logged" for that rule, never taken for
  clear of it. linear_probe is exempt: a closed-form/LBFGS fit has no epochs.
- Code: each run's commit (`mlflow.source.git.commit`, "+dirty" when tracked files differed
  from it); a cell whose seeds ran on different code is marked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pandas as pd

from benchmark.tracking.identity import GIT_COMMIT_TAG

MIXED_COMMITS_MARK = "‡"
EXEMPT_STRATEGIES = ("linear_probe",)  # closed-form/LBFGS: no epochs to converge over
# The run metrics the diagnoses read (`metrics.<name>`; NaN for runs of code that did not log
# it). best_val_epoch is 0-based, -1 when selection kept the model before its first step;
# final_val_acc is the last epoch's, start_val_acc the model's before its first step, lp_val_acc
# the probe's that lp_ft starts from (on the same validation split).
CONVERGENCE_METRICS = (
    "final_train_loss",
    "final_train_acc",
    "best_val_epoch",
    "epochs_run",
    "best_val_acc",
    "final_val_acc",
    "start_val_acc",
    "lp_val_acc",
)
FITTED_HEAD_STRATEGIES = ("lp_ft",)  # besides any run with strategy.head_init=probe
NOT_RECORDED = "not recorded"
SHORT = 10  # characters of a commit shown
_EPS = 1e-9  # a fall of exactly a threshold is not more than it


@dataclass(frozen=True)
class Diagnosis:
    """One way a fit can go wrong: its column in the report's CSV (`key`, a bool: any seed), its
    mark after a cell's number, its `name` (a cell's `convergence` says it, its note starts with
    it), its `label` in lists, and what a verdict resting on it says (`rests`)."""

    key: str
    mark: str
    name: str
    label: str
    rests: str


DIVERGED = Diagnosis("diverged", "§", "diverged", "diverged", "diverged")
BELOW_START = Diagnosis(
    "below_start", "¶", "below its start", "below its start", "ended below its start"
)
UNDERTRAINED = Diagnosis(
    "undertrained", "†", "may be undertrained", "undertrained", "may be undertrained"
)
OVERFIT = Diagnosis("overfit", "‖", "overfit", "overfit", "overfit")
DIAGNOSES = (DIVERGED, BELOW_START, UNDERTRAINED, OVERFIT)  # most severe first
UNDERTRAINED_MARK = UNDERTRAINED.mark


class Convergence:
    """A cell's state as the report's CSV says it in `convergence`: these, or the names of its
    diagnoses (`Diagnosis.name`, ", "-separated) when any seed has one."""

    converged = "converged"
    undertrained = UNDERTRAINED.name
    not_logged = "convergence not logged"
    exempt = "exempt (no epochs)"


class Check:
    """A run's state for one diagnosis."""

    marked = "marked"
    clear = "clear"
    not_logged = "not logged"
    not_applicable = "n/a"  # linear_probe; below its start for a run from a random head


@dataclass(frozen=True)
class ConvergenceRule:
    """The diagnoses' thresholds (`python -m benchmark.report --min-train-acc --rising-epochs
    --diverged-drop --overfit-train-acc --overfit-drop`).

    - min_train_acc 0.9, rising_epochs 1 (may be undertrained): a pretrained backbone fits these
      datasets' training images to well above 0.9 when it has trained enough; a best validation
      epoch at the very last one says more epochs could still have helped.
    - diverged_drop 0.10 with early_fraction 0.5 (diverged): the smallest validation split
      (Hymenoptera's, 20 % of 244 images: ~49, one image 0.02) wobbles by an image or two from
      epoch to epoch once a fit has settled, and the best is the maximum over the epochs, so the
      last epoch falls short of it by that much with nothing wrong; 0.10 is five images, a fall
      beyond that from a peak in the first half of the run is a fit that came apart (the tuned
      Hymenoptera finetune: 0.98 after its first epoch, 0.51 at its tenth).
    - below its start: no threshold: a fit from a fitted head (lp_ft's probe) that ended below
      that head's validation accuracy, by any amount, with no trained epoch above it (one that
      only ties it, as at 1.0, is not marked: nothing was lost).
    - overfit_train_acc 0.99, overfit_drop 0.05 (overfit): the training images fitted all but
      perfectly (0.99, with augmentation on) while the last epoch's validation accuracy ended
      more than the maximum-over-epochs' wobble (0.05: over two images of ~49) below its best:
      training on made held-out accuracy worse. A train-validation gap alone is not taken: on
      a hard dataset (Caltech-256) it is large for every well-trained model.
    """

    min_train_acc: float = 0.9
    rising_epochs: int = 1  # best validation epoch among the last this many: still rising
    diverged_drop: float = 0.10
    early_fraction: float = 0.5  # a peak in the first this share of the epochs (the start counts)
    overfit_train_acc: float = 0.99
    overfit_drop: float = 0.05

    def __post_init__(self) -> None:
        for name in ("min_train_acc", "diverged_drop", "overfit_train_acc", "overfit_drop"):
            if not 0 <= (value := getattr(self, name)) <= 1:
                raise ValueError(f"{name}={value}: use a value in [0, 1]")
        if self.rising_epochs < 1:
            raise ValueError(f"rising_epochs={self.rising_epochs}: use 1 or more")
        if not 0 < self.early_fraction <= 1:
            raise ValueError(f"early_fraction={self.early_fraction}: use a value in (0, 1]")

    def text(self, diagnosis: Diagnosis = UNDERTRAINED) -> str:
        """The rule of `diagnosis`, with its thresholds and options."""
        if diagnosis == DIVERGED:
            early = (
                "first half" if self.early_fraction == 0.5 else f"first {self.early_fraction:.0%}"
            )
            return (
                f"a seed's validation accuracy best in the {early} of its epochs (the start "
                f"counts) and its last epoch's more than {self.diverged_drop:g} below that best; "
                "--diverged-drop"
            )
        if diagnosis == BELOW_START:
            return (
                "a seed that fine-tunes from a fitted head (lp_ft's probe, head_init=probe) and "
                "whose fit ended below that head's validation accuracy: selection kept the start "
                "and the last epoch is below it, or its best epoch is below the probe's (a fit "
                "that ties its start is not marked)"
            )
        if diagnosis == OVERFIT:
            return (
                f"a seed's final training accuracy at least {self.overfit_train_acc:g} while its "
                f"last epoch's validation accuracy is more than {self.overfit_drop:g} below its "
                "best; --overfit-train-acc, --overfit-drop"
            )
        last = "its last epoch" if self.rising_epochs == 1 else f"its last {self.rising_epochs}"
        return (
            f"a seed's validation accuracy best at {last} run, i.e. still rising, or its final "
            f"training accuracy below {self.min_train_acc:g}; --rising-epochs, --min-train-acc"
        )


DEFAULT_RULE = ConvergenceRule()


def _at(epoch: float) -> str:
    """A 0-based epoch (-1: the start) as the report says it, 1-based."""
    return "at the start" if epoch < 0 else f"at epoch {int(epoch) + 1}"


@dataclass(frozen=True)
class RunSeries:
    """The per-run numbers the diagnoses read (aligned with the runs): the convergence metrics
    `m` (numeric, NaN where not logged), the best and last epochs, the start a fitted head's fit
    is held to (and what it was), and the rule's tests that more than one diagnosis reads."""

    m: pd.DataFrame
    epoch: pd.Series  # best_val_epoch: -1 when selection kept the start
    end: pd.Series  # epochs_run
    fitted: pd.Series  # the fit started from a fitted head
    start: pd.Series  # the start's own val acc, else the probe's
    start_name: pd.Series  # "start" or "probe"
    rising: pd.Series  # validation still rising at the end
    low: pd.Series  # a low final training accuracy
    fall: pd.Series  # best val acc - final val acc
    early: pd.Series  # the best epoch in the early part of the fit

    @classmethod
    def of(cls, runs: pd.DataFrame, rule: ConvergenceRule) -> RunSeries:
        """The series of `runs` under `rule`."""
        m = runs.reindex(columns=list(CONVERGENCE_METRICS)).apply(pd.to_numeric, errors="coerce")
        epoch, end = m.best_val_epoch, m.epochs_run
        head = runs.reindex(columns=["head_init"]).head_init.astype(str).str.endswith("probe")
        fitted = runs.strategy.isin(FITTED_HEAD_STRATEGIES) | head | m.lp_val_acc.notna()
        start = m.start_val_acc.fillna(m.lp_val_acc)  # the start's own pass, else the probe's
        start_name = m.start_val_acc.notna().map({True: "start", False: "probe"})
        return cls(
            m=m,
            epoch=epoch,
            end=end,
            fitted=fitted,
            start=start,
            start_name=start_name,
            rising=(end - 1 - epoch) < rule.rising_epochs,
            low=m.final_train_acc < rule.min_train_acc,
            fall=m.best_val_acc - m.final_val_acc,
            early=(epoch + 1) <= rule.early_fraction * end,
        )

    def fell(self, i: object) -> str:
        """Run `i`'s validation accuracy from its best epoch to its last."""
        m, epoch, end = self.m, self.epoch, self.end
        return (
            f"val {m.best_val_acc[i]:.3f} {_at(epoch[i])} → {m.final_val_acc[i]:.3f} "
            f"at epoch {int(end[i])}"
        )


class DiagnosisRule(NamedTuple):
    """A diagnosis's rule over the runs: the metrics it needs logged, the runs it applies to,
    those it marks, and why a marked run is (its numbers)."""

    needed: list[pd.Series]
    applies: pd.Series
    marked: pd.Series
    why: Callable[[object], str]


def diverged_rule(s: RunSeries, rule: ConvergenceRule) -> DiagnosisRule:
    """Validation peaked early and fell by more than `rule.diverged_drop`."""
    m = s.m
    return DiagnosisRule(
        [s.epoch, s.end, m.best_val_acc, m.final_val_acc],
        pd.Series(True, index=m.index),
        s.early & (s.fall > rule.diverged_drop + _EPS),
        s.fell,
    )


def below_start_rule(s: RunSeries) -> DiagnosisRule:
    """A fit from a fitted head that ended below its start."""
    m, epoch, end, start = s.m, s.epoch, s.end, s.start

    def below_why(i: object) -> str:
        if epoch[i] < 0:
            last = m.final_val_acc[i]
            then = f"; last val {last:.3f} at epoch {int(end[i])}" if pd.notna(last) else ""
            return (
                f"selection kept the {s.start_name[i]} (val {start[i]:.3f}): no trained epoch "
                f"beat it and the fit ended below it{then}"
            )
        return (
            f"best trained val {m.best_val_acc[i]:.3f} {_at(epoch[i])} < "
            f"{s.start_name[i]}'s {start[i]:.3f}"
        )

    return DiagnosisRule(
        [start, m.best_val_acc, epoch],
        s.fitted,
        # Selection kept the start and the fit ended below it (a fit that only tied it, as
        # at a validation accuracy of 1.0, added nothing but lost nothing), or (code from
        # before the start was a candidate) its best epoch is below the probe's.
        ((epoch < 0) & ~(m.final_val_acc >= start - _EPS))
        | ((epoch >= 0) & (m.best_val_acc < start - _EPS)),
        below_why,
    )


def undertrained_rule(s: RunSeries) -> DiagnosisRule:
    """Validation accuracy still rising at the end, or a low final training accuracy."""
    m, epoch, end = s.m, s.epoch, s.end

    def undertrained_why(i: object) -> str:
        reasons = []
        if s.rising[i]:
            reasons.append(f"val acc best at epoch {int(epoch[i]) + 1} of {int(end[i])}")
        if s.low[i]:
            reasons.append(f"train acc {m.final_train_acc[i]:.3f}")
        return ", ".join(reasons)

    return DiagnosisRule(
        [m.final_train_acc, epoch, end],
        pd.Series(True, index=m.index),
        s.rising | s.low,
        undertrained_why,
    )


def overfit_rule(s: RunSeries, rule: ConvergenceRule) -> DiagnosisRule:
    """Training fitted while validation fell from its best by more than `rule.overfit_drop`."""
    m = s.m
    return DiagnosisRule(
        [m.final_train_acc, s.epoch, s.end, m.best_val_acc, m.final_val_acc],
        pd.Series(True, index=m.index),
        (m.final_train_acc >= rule.overfit_train_acc - _EPS) & (s.fall > rule.overfit_drop + _EPS),
        lambda i: f"train acc {m.final_train_acc[i]:.3f}, {s.fell(i)}",
    )


def diagnosis_columns(
    runs: pd.DataFrame, exempt: pd.Series, rule: DiagnosisRule
) -> tuple[pd.Series, pd.Series]:
    """One diagnosis's two columns over `runs`: each run's Check state, and for a marked run
    why ("seed 1: ...")."""
    logged = pd.concat(rule.needed, axis=1).notna().all(axis=1)
    state = pd.Series(Check.clear, index=runs.index, dtype=object)
    state[~logged] = Check.not_logged
    state[logged & rule.marked] = Check.marked
    state[exempt | ~rule.applies] = Check.not_applicable
    said = pd.Series("", index=runs.index, dtype=object)
    for i in runs.index[state.eq(Check.marked)]:
        said[i] = f"seed {runs.seed[i]}: {rule.why(i)}"
    return state, said


def run_diagnoses(runs: pd.DataFrame, rule: ConvergenceRule) -> pd.DataFrame:
    """Per run (aligned with `runs`), for each diagnosis: `<key>` (a Check state) and
    `<key>_why` (for a marked run: its seed and the numbers that say so, "seed 1: ...")."""
    series = RunSeries.of(runs, rule)
    exempt = runs.strategy.isin(EXEMPT_STRATEGIES)
    rules = {
        DIVERGED: diverged_rule(series, rule),
        BELOW_START: below_start_rule(series),
        UNDERTRAINED: undertrained_rule(series),
        OVERFIT: overfit_rule(series, rule),
    }
    out = {}
    for diagnosis, diagnosis_rule in rules.items():
        out[diagnosis.key], out[f"{diagnosis.key}_why"] = diagnosis_columns(
            runs, exempt, diagnosis_rule
        )
    return pd.DataFrame(out, index=runs.index)


def code_labels(runs: pd.DataFrame) -> pd.Series:
    """Each run's code: its commit (shortened), "+dirty" when tracked files differed from it,
    or "not recorded"."""
    commit = runs.reindex(columns=["git_commit"]).git_commit
    dirty = runs.reindex(columns=["git_dirty"]).git_dirty.astype(str).str.lower().eq("true")
    recorded = commit.notna() & ~commit.astype(str).isin(["", "unknown"])
    label = commit.astype(str).str[:SHORT] + dirty.map({True: "+dirty", False: ""})
    return label.where(recorded, NOT_RECORDED)


WHY_COLUMNS = [f"{d.key}_why" for d in DIAGNOSES]
CHECK_COLUMNS = [
    "convergence",
    "marks",
    *[d.key for d in DIAGNOSES],
    "convergence_why",
    *WHY_COLUMNS,
    "checked",
    "not_logged",
]


def cell_checks(finished: pd.DataFrame, by: list[str], rule: ConvergenceRule) -> pd.DataFrame:
    """Per cell (`by`) of the counted FINISHED runs:

    - `convergence`: exempt (every seed linear_probe); else the names of the diagnoses any seed
      has (", "-separated, e.g. "diverged, may be undertrained"); else "convergence not logged"
      when a seed did not log what a diagnosis needs; else converged;
    - `marks`: those diagnoses' marks (" "-separated); `<key>` of each diagnosis: whether any
      seed has it; `<key>_why`: each such seed and its numbers ("; "-separated);
      `convergence_why`: those, each after its diagnosis's name;
    - `checked` / `not_logged`: the diagnoses (labels, ", "-separated) that some seed could be
      checked for / did not log what they need;
    - `commits` (its runs' code, "; "-separated) and `mixed_commits` (seeds on different code,
      said per seed in `commits`)."""
    columns = [*by, *CHECK_COLUMNS, "commits", "mixed_commits"]
    if finished.empty:
        return pd.DataFrame(columns=columns)
    runs = finished.join(run_diagnoses(finished, rule)).assign(code=code_labels(finished))
    rows = []
    for key, cell in runs.groupby(by, sort=False, dropna=False):
        cell = cell.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))
        marked = [d for d in DIAGNOSES if cell[d.key].eq(Check.marked).any()]
        whys = {d: "; ".join(w for w in cell[f"{d.key}_why"] if w) for d in DIAGNOSES}
        checked = [
            d.label for d in DIAGNOSES if cell[d.key].isin([Check.marked, Check.clear]).any()
        ]
        unlogged = [d.label for d in DIAGNOSES if cell[d.key].eq(Check.not_logged).any()]
        if cell.strategy.isin(EXEMPT_STRATEGIES).all():
            state = Convergence.exempt
        elif marked:
            state = ", ".join(d.name for d in marked)
        else:
            state = Convergence.not_logged if unlogged else Convergence.converged
        mixed = cell.code.nunique() > 1
        commits = (
            "; ".join(f"seed {r.seed}: {r.code}" for r in cell.itertuples())
            if mixed
            else cell.code.iloc[0]
        )
        rows.append((
            *key,
            state,
            " ".join(d.mark for d in marked),
            *[d in marked for d in DIAGNOSES],
            "; ".join(f"{d.name}: {whys[d]}" for d in marked),
            *[whys[d] for d in DIAGNOSES],
            ", ".join(checked),
            ", ".join(unlogged),
            commits,
            mixed,
        ))  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def code_summary(finished: pd.DataFrame) -> str:
    """The commits the counted runs came from, with how many runs each."""
    if finished.empty:
        return ""
    counts = code_labels(finished).value_counts()
    parts = [
        f"{label.replace('+dirty', ' with uncommitted changes')} ({n} run{'s' * (n != 1)})"
        for label, n in counts.items()
    ]
    return f"Code of the counted runs (tag {GIT_COMMIT_TAG}): " + ", ".join(parts) + "."
