"""Can a cell's number be trusted: had its fits converged, and which code made it.

Pure pandas on the counted FINISHED runs (`tables.latest_per_seed`), no store involved.

- Convergence: a run may be undertrained when its validation accuracy was still rising at its
  end (its best epoch among its last `rising_epochs`, i.e. the last one by default) or its final
  training accuracy is below `min_train_acc`. A run without the metrics (from before the cell
  logged them) is "not logged", never taken for converged. linear_probe is exempt: a
  closed-form/LBFGS fit has no epochs.
- Code: each run's commit (`mlflow.source.git.commit`, "+dirty" when tracked files differed
  from it); a cell whose seeds ran on different code is marked.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from benchmark.tracking.identity import GIT_COMMIT_TAG

UNDERTRAINED_MARK = "†"
MIXED_COMMITS_MARK = "‡"
EXEMPT_STRATEGIES = ("linear_probe",)  # closed-form/LBFGS: no epochs to converge over
CONVERGENCE_METRICS = ("final_train_loss", "final_train_acc", "best_val_epoch", "epochs_run")
NOT_RECORDED = "not recorded"
SHORT = 10  # characters of a commit shown


class Convergence:
    """A run's or a cell's convergence state, as the report's CSV says it."""

    converged = "converged"
    undertrained = "may be undertrained"
    not_logged = "convergence not logged"
    exempt = "exempt (no epochs)"


@dataclass(frozen=True)
class ConvergenceRule:
    """When a run may be undertrained (`python -m benchmark.report --min-train-acc
    --rising-epochs`)."""

    min_train_acc: float = 0.9
    rising_epochs: int = 1  # best validation epoch among the last this many: still rising

    def __post_init__(self) -> None:
        if not 0 <= self.min_train_acc <= 1:
            raise ValueError(f"min_train_acc={self.min_train_acc}: use a value in [0, 1]")
        if self.rising_epochs < 1:
            raise ValueError(f"rising_epochs={self.rising_epochs}: use 1 or more")

    def text(self) -> str:
        last = "its last epoch" if self.rising_epochs == 1 else f"its last {self.rising_epochs}"
        return (
            f"a seed's validation accuracy best at {last} run, i.e. still rising, or its final "
            f"training accuracy below {self.min_train_acc:g}; --rising-epochs, --min-train-acc"
        )


DEFAULT_RULE = ConvergenceRule()


def run_convergence(runs: pd.DataFrame, rule: ConvergenceRule) -> pd.DataFrame:
    """Per run (aligned with `runs`): `convergence` (a Convergence state) and `why` (for a run
    that may be undertrained, what says so)."""
    metrics = runs.reindex(columns=list(CONVERGENCE_METRICS)).apply(pd.to_numeric, errors="coerce")
    last = metrics.epochs_run - 1
    rising = (last - metrics.best_val_epoch) < rule.rising_epochs
    low = metrics.final_train_acc < rule.min_train_acc
    logged = metrics[["final_train_acc", "best_val_epoch", "epochs_run"]].notna().all(axis=1)
    exempt = runs.strategy.isin(EXEMPT_STRATEGIES)
    state = pd.Series(Convergence.converged, index=runs.index, dtype=object)
    state[~logged] = Convergence.not_logged
    state[logged & (rising | low)] = Convergence.undertrained
    state[exempt] = Convergence.exempt
    why = pd.Series("", index=runs.index, dtype=object)
    for i in runs.index[state.eq(Convergence.undertrained)]:
        reasons = []
        if rising[i]:
            best, run = int(metrics.best_val_epoch[i]) + 1, int(metrics.epochs_run[i])
            reasons.append(f"val acc best at epoch {best} of {run}")
        if low[i]:
            reasons.append(f"train acc {metrics.final_train_acc[i]:.3f}")
        why[i] = f"seed {runs.seed[i]}: " + ", ".join(reasons)
    return pd.DataFrame({"convergence": state, "why": why})


def code_labels(runs: pd.DataFrame) -> pd.Series:
    """Each run's code: its commit (shortened), "+dirty" when tracked files differed from it,
    or "not recorded"."""
    commit = runs.reindex(columns=["git_commit"]).git_commit
    dirty = runs.reindex(columns=["git_dirty"]).git_dirty.astype(str).str.lower().eq("true")
    recorded = commit.notna() & ~commit.astype(str).isin(["", "unknown"])
    label = commit.astype(str).str[:SHORT] + dirty.map({True: "+dirty", False: ""})
    return label.where(recorded, NOT_RECORDED)


def cell_checks(finished: pd.DataFrame, by: list[str], rule: ConvergenceRule) -> pd.DataFrame:
    """Per cell (`by`) of the counted FINISHED runs: `convergence` (undertrained if any seed
    is; not logged if any seed did not log it; exempt; else converged), `undertrained`,
    `convergence_why`, `commits` (its runs' code, "; "-separated) and `mixed_commits` (seeds on
    different code, said per seed in `commits`)."""
    columns = [*by, "convergence", "undertrained", "convergence_why", "commits", "mixed_commits"]
    if finished.empty:
        return pd.DataFrame(columns=columns)
    runs = finished.join(run_convergence(finished, rule)).assign(code=code_labels(finished))
    rows = []
    for key, cell in runs.groupby(by, sort=False, dropna=False):
        states = set(cell.convergence)
        state = next(
            s
            for s in (Convergence.undertrained, Convergence.not_logged, Convergence.converged)
            if s in states
        ) if states != {Convergence.exempt} else Convergence.exempt  # fmt: skip
        mixed = cell.code.nunique() > 1
        codes = cell.sort_values("seed", key=lambda s: pd.to_numeric(s, errors="coerce"))
        commits = (
            "; ".join(f"seed {r.seed}: {r.code}" for r in codes.itertuples())
            if mixed
            else cell.code.iloc[0]
        )
        why = "; ".join(w for w in cell.why if w)
        rows.append((*key, state, state == Convergence.undertrained, why, commits, mixed))
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
