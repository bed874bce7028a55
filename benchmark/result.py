"""What one cell computed, as plain values: `benchmark.cell` fills it, `benchmark.tracking` logs it
in one call, the command line prints its summary. Nothing here computes or logs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CellResult:
    cell: str  # dataset/colour/strategy/backbone/seed=N
    input: str  # what the head trained on: images, features or features:Kviews
    scores: dict[str, float]  # test_acc, test_loss (selected checkpoint), val_acc
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

    @property
    def test_acc(self) -> float:
        return self.scores["test_acc"]


@dataclass
class CellSummary:
    """What the command line says of a cell: ran (with its result) or skipped."""

    cell: str
    run_id: str
    tracking_uri: str
    test_acc: float
    test_loss: float | None = None
    wall_time_s: float = 0.0
    skipped: bool = False  # already FINISHED in an earlier run: not run again

    def line(self) -> str:
        if self.skipped:
            return (
                f"{self.cell}: skipped, FINISHED earlier in MLflow run {self.run_id} "
                f"(test_acc={self.test_acc:.4f}); rerun=true runs it again"
            )
        return (
            f"{self.cell}: test_acc={self.test_acc:.4f} test_loss={self.test_loss:.4f} "
            f"wall={self.wall_time_s:.1f}s | MLflow run {self.run_id} in {self.tracking_uri}"
        )
