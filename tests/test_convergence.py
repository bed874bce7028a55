"""The cell logs how its fit ended (final training loss and accuracy, the best validation epoch,
the epochs run) and which code it ran (commit, dirty flag): one tiny real cell."""

from __future__ import annotations

import subprocess

import mlflow

from benchmark.cell.run import run_cell
from benchmark.tracking.identity import GIT_COMMIT_TAG, GIT_DIRTY_TAG, PROJECT_DIR
from tests.conftest import TINY


def history(client: mlflow.MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_a_cell_logs_how_its_fit_ended_and_its_commit(make_cfg):
    spec = make_cfg("strategy=freeze", *TINY, "trainer.max_epochs=3")
    summary = run_cell(spec)
    client = mlflow.MlflowClient(summary.tracking_uri)
    run = client.get_run(summary.run_id)
    metrics = run.data.metrics
    val = history(client, summary.run_id, "val_acc")
    assert len(val) == 3 and metrics["epochs_run"] == 3
    # The first epoch with the highest validation accuracy: the checkpoint's choice.
    assert metrics["best_val_epoch"] == val.index(max(val))
    assert metrics["best_val_acc"] == max(val)
    # The last epoch's training aggregates, as the curve logged them.
    assert metrics["final_train_loss"] == history(client, summary.run_id, "train_loss")[-1]
    assert metrics["final_train_acc"] == history(client, summary.run_id, "train_acc")[-1]
    # The code: the commit checked out, and whether tracked code differed from it.
    assert run.data.tags[GIT_COMMIT_TAG] == git("rev-parse", "HEAD")
    changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
    dirty = any(not line[3:].startswith("results/") for line in changed)
    assert run.data.tags[GIT_DIRTY_TAG] == str(dirty).lower()


def test_a_changed_store_in_results_is_not_changed_code(tmp_path, monkeypatch):
    """`make results` writes its committed store while its cells run: that is not dirty code;
    a changed module is."""
    from benchmark.tracking import identity

    repo = tmp_path / "repo"
    (repo / "results" / "grid").mkdir(parents=True)
    (repo / "benchmark").mkdir()
    (repo / "results" / "grid" / "mlflow.db").write_text("store")
    (repo / "benchmark" / "cell.py").write_text("x = 1")
    for command in (["init", "-q"], ["add", "."], ["commit", "-qm", "one"]):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *command], cwd=repo, check=True
        )
    monkeypatch.setattr(identity, "PROJECT_DIR", repo.resolve())
    assert identity.git_tags()[GIT_DIRTY_TAG] == "false"
    (repo / "results" / "grid" / "mlflow.db").write_text("more runs")
    assert identity.git_tags()[GIT_DIRTY_TAG] == "false"  # the store grew: same code
    (repo / "benchmark" / "cell.py").write_text("x = 2")
    assert identity.git_tags()[GIT_DIRTY_TAG] == "true"


def test_the_best_epoch_is_the_first_with_the_highest_val_acc_as_the_checkpoint_chooses():
    from types import SimpleNamespace

    from benchmark.models.convergence import Convergence

    callback = Convergence()
    sanity = SimpleNamespace(sanity_checking=True, current_epoch=0, callback_metrics={"val_acc": 1})
    callback.on_validation_end(sanity, None)  # the sanity check is not an epoch
    for epoch, value in enumerate([0.5, 0.75, 0.75, 0.6]):  # a tie at epochs 1 and 2
        trainer = SimpleNamespace(
            sanity_checking=False, current_epoch=epoch, callback_metrics={"val_acc": value}
        )
        callback.on_validation_end(trainer, None)
        callback.on_train_epoch_end(trainer, None)
    trainer.callback_metrics |= {"train_loss": 0.3, "train_acc": 0.875}
    assert callback.metrics(trainer) == {
        "best_val_epoch": 1.0,
        "epochs_run": 4.0,
        "final_train_loss": 0.3,
        "final_train_acc": 0.875,
        "final_val_acc": 0.6,
    }
    # The start (validated before the first step) scored at least the best epoch: it is chosen.
    assert callback.metrics(trainer, start_won=True)["best_val_epoch"] == -1.0
