"""What one cell computed, as plain values, and what became of it: `benchmark.cell.run` fits
(`Fitted`) and completes the cell's `CellResult` around that fit, `benchmark.cell.mlflow_run` logs
it in one call, the command line prints its `CellSummary`, and the cell's outcome file and its
sweep's counts say its `Status`. Nothing here computes or logs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Status(StrEnum):
    """What became of a cell, as its outcome file (`status`) and its sweep's counts say it: the
    members are the strings themselves (outcome files written before this type read as ever)."""

    finished = "finished"  # computed and logged by this launch
    skipped = "skipped"  # already FINISHED in the store (an earlier launch): not run again
    failed = "failed"  # raised, was stopped by a signal, or ended without saying


class Tuning(Protocol):
    """What a cell's tuning chose (benchmark.cell.tune.Tuned), as its result logs it."""

    values: dict[str, float]  # the values chosen on validation, by config key
    val_acc: float  # the best trial's validation accuracy
    seconds: float  # what the search took
    # One row per trial (number, values, val_acc, state COMPLETE/PRUNED, epochs run).
    table: list[dict[str, object]]
    # tune.reuse_seed: the run whose chosen values this cell took instead of tuning itself.
    reused_from: str | None
    # The trial-epochs the trials could spend (tune.budget_fraction; tune_epochs_run: spent).
    budget_epochs: int | None


@dataclass
class Fitted:
    """What fitting and testing gave, whichever way the head was fitted (Lightning epochs, or
    the linear probe)."""

    # test_acc, test_loss (selected checkpoint), best_val_acc; under protocol=study max_val_acc
    # instead of test_acc (the evaluation split's best epoch: not a held-out score)
    scores: dict[str, float]
    confusion: list[list[int]]  # test split; rows: true class, columns: predicted
    device: str  # cpu, or the GPU's name
    precision: str  # Lightning's precision, or "64 (scikit-learn)"
    train_images_per_s: float | None = None  # None: no training loop (linear_probe)
    checkpoint: str | None = None  # the checkpoint selected on validation
    # The class predicted for each test image, in the split's order (None where the test pass
    # ran on several devices), and the same for the shift split (dataset.shift_test).
    test_predicted: list[int] | None = None
    shift_predicted: list[int] | None = None
    # linear_probe (and LP-FT's probe): validation accuracy of each C tried, and the C chosen.
    probe_val_acc: dict[float, float] | None = None
    probe_c: float | None = None
    tuned: Tuning | None = None  # tune.trials: what the tuning chose, before the fit
    # Optimizer steps the fit took (Lightning's global_step at its end; linear_probe: the chosen
    # model's L-BFGS iterations).
    optimizer_steps: int | None = None
    # How the fit ended (models/convergence.py): final_train_loss, final_train_acc,
    # best_val_epoch, epochs_run. Empty for linear_probe (a closed-form/LBFGS fit, no epochs).
    convergence: dict[str, float] = field(default_factory=dict)
    # A fit that took over an interrupted attempt (benchmark.cell.resume): the epoch it resumed
    # at (0-based: the epochs its checkpoint held; 0 when only the tuning's choice was taken
    # over), and the cell's seconds in the attempts before, up to what was taken over (the
    # cell's wall time adds them). None and 0 for a fit in one go.
    resumed_at_epoch: int | None = None
    earlier_s: float = 0.0


@dataclass
class CellResult:
    """The cell's fit, and what the cell around it adds: its name and input, its classes, what it
    cost, and each test image's prediction by name."""

    cell: str  # dataset/colour/strategy/backbone/seed=N
    input: str  # what the head trained on: images, features or features:Kviews
    classes: list[str]
    fitted: Fitted
    wall_time_s: float
    peak_rss_mb: float
    peak_gpu_mem_mb: float | None = None
    # Seconds spent building caches in this cell (0: found built).
    build_s: dict[str, float] = field(default_factory=dict)
    # Each test image (its path relative to the dataset's root, true and predicted class), for
    # the report's bootstrap over test images; None where the test pass ran on several devices.
    test_predictions: dict[str, list[str]] | None = None
    # The same for the `shift` split (dataset.shift_test), scored by the same model: its scores
    # are shift_test_acc and shift_test_loss.
    shift_predictions: dict[str, list[str]] | None = None

    @property
    def headline(self) -> tuple[str, float]:
        """The cell's one number and its name: test_acc, or max_val_acc (protocol=study)."""
        return headline(self.fitted.scores)


# What a cell's one number is called, in order of preference.
HEADLINES = ("test_acc", "max_val_acc")


def headline(scores: Mapping[str, float]) -> tuple[str, float]:
    """The one number of a cell's scores (or its run's metrics) and its name."""
    name = next(n for n in HEADLINES if n in scores)
    return name, scores[name]


@dataclass
class CellSummary:
    """What the command line says of a cell: ran (with its result) or skipped."""

    cell: str
    run_id: str
    tracking_uri: str
    score: float  # the headline: test_acc, or max_val_acc under protocol=study
    test_loss: float | None = None
    wall_time_s: float = 0.0
    skipped: bool = False  # already FINISHED in an earlier run: not run again
    score_name: str = "test_acc"

    @classmethod
    def of(
        cls,
        cell: str,
        run_id: str,
        tracking_uri: str,
        scores: Mapping[str, float],
        wall_time_s: float = 0.0,
        skipped: bool = False,
    ) -> CellSummary:
        """The summary of a cell whose run scored `scores` (its result's, or the FINISHED run's
        metrics): its headline and test loss read from them."""
        name, score = headline(scores)
        test_loss = scores.get("test_loss")
        return cls(cell, run_id, tracking_uri, score, test_loss, wall_time_s, skipped, name)

    @property
    def status(self) -> Status:
        return Status.skipped if self.skipped else Status.finished

    @property
    def test_acc(self) -> float | None:
        return self.score if self.score_name == "test_acc" else None

    def line(self) -> str:
        if self.skipped:
            return (
                f"{self.cell}: skipped, FINISHED earlier in MLflow run {self.run_id} "
                f"({self.score_name}={self.score:.4f}); rerun=true runs it again"
            )
        loss = "" if self.test_loss is None else f" test_loss={self.test_loss:.4f}"
        return (
            f"{self.cell}: {self.score_name}={self.score:.4f}{loss} "
            f"wall={self.wall_time_s:.1f}s | MLflow run {self.run_id} in {self.tracking_uri}"
        )
