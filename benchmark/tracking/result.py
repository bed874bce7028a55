"""What one cell computed, as plain values: `benchmark.cell.run` fills it,
`benchmark.cell.mlflow_run` logs it in one call, the command line prints its summary.
Nothing here computes or logs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CellResult:
    cell: str  # dataset/colour/strategy/backbone/seed=N
    input: str  # what the head trained on: images, features or features:Kviews
    # test_acc, test_loss (selected checkpoint), best_val_acc; under protocol=study max_val_acc
    # instead of test_acc (the evaluation split's best epoch: not a held-out score)
    scores: dict[str, float]
    classes: list[str]
    confusion: list[list[int]]  # test split; rows: true class, columns: predicted
    device: str  # cpu, or the GPU's name
    precision: str  # Lightning's precision, or "64 (scikit-learn)"
    wall_time_s: float
    peak_rss_mb: float
    peak_gpu_mem_mb: float | None = None
    train_images_per_s: float | None = None  # None: no training loop (linear_probe)
    # Seconds spent building caches in this cell (0: found built).
    build_s: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None  # the checkpoint selected on validation
    # linear_probe: validation accuracy of each C tried, and the C chosen.
    probe_val_acc: dict[float, float] | None = None
    probe_c: float | None = None
    # tune.trials: the values chosen on validation (config key -> value), the best trial's
    # validation accuracy and the seconds the search took.
    tuned: dict[str, float] | None = None
    tune_val_acc: float | None = None
    tune_s: float | None = None
    # ...and one row per trial (number, values, val_acc, state COMPLETE/PRUNED, epochs run).
    tune_trials: list[dict[str, object]] | None = None
    # tune.reuse_seed: the run whose chosen values this cell took instead of tuning itself.
    tune_reused_from: str | None = None
    # The trial-epochs the trials could spend (tune.budget_fraction; tune_epochs_run: spent).
    tune_budget_epochs: int | None = None
    # Each test image (its path relative to the dataset's root, true and predicted class), for
    # the report's bootstrap over test images; None where the test pass ran on several devices.
    test_predictions: dict[str, list[str]] | None = None
    # The same for the `shift` split (dataset.shift_test), scored by the same model: its scores
    # are shift_test_acc and shift_test_loss.
    shift_predictions: dict[str, list[str]] | None = None
    # Optimizer steps the fit took (Lightning's global_step at its end; linear_probe: the chosen
    # model's L-BFGS iterations).
    optimizer_steps: int | None = None
    # How the fit ended (models/convergence.py): final_train_loss, final_train_acc,
    # best_val_epoch, epochs_run. Empty for linear_probe (a closed-form/LBFGS fit, no epochs).
    convergence: dict[str, float] = field(default_factory=dict)

    @property
    def headline(self) -> tuple[str, float]:
        """The cell's one number and its name: test_acc, or max_val_acc (protocol=study)."""
        name = next(n for n in HEADLINES if n in self.scores)
        return name, self.scores[name]


# What a cell's one number is called, in order of preference.
HEADLINES = ("test_acc", "max_val_acc")


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
