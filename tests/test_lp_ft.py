"""strategy=lp_ft (Kumar et al. 2022): the linear probe first, then every layer fine-tunes from
the fitted head at a lower learning rate."""

from __future__ import annotations

import lightning as L
import mlflow
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from benchmark.cell.probe import linear_head
from benchmark.cell.run import run_cell
from benchmark.config.rules import problems
from tests.conftest import TINY


@pytest.mark.parametrize("classes", [2, 3])
def test_the_fitted_probe_as_a_linear_head_gives_its_probabilities(classes):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, [0.5, 4.0, 20.0, 1.0], size=(60, 4))  # far from standardised
    y = np.arange(60) % classes
    x[:, 0] += y  # learnable
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0)).fit(x, y)
    head = torch.nn.Linear(4, classes)
    head.load_state_dict(linear_head(probe, classes))
    with torch.no_grad():
        probabilities = head(torch.from_numpy(x).float()).softmax(1).numpy()
    np.testing.assert_allclose(probabilities, probe.predict_proba(x), atol=1e-5)


class BeforeTheFirstStep(Callback):
    """Lightning's validation of the whole val split before the first training step (the sanity
    check, num_sanity_val_steps=-1), and the learning rates the fit starts with."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.lrs: list[float] = []
        self.steps_then = -1

    def on_sanity_check_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
        self.steps_then = trainer.global_step


def small(ants_and_bees) -> list[str]:
    return ["dataset=imagefolder", f"dataset.root={ants_and_bees}", "strategy=lp_ft"]


def test_lp_ft_fine_tuning_starts_from_the_fitted_head(make_cfg, ants_and_bees):
    cfg = make_cfg(
        *small(ants_and_bees),
        *TINY,
        "trainer.limit_val_batches=1.0",  # the whole validation split, as the probe saw it
        "trainer.num_sanity_val_steps=-1",
        "strategy.probe_c=[10.0]",  # weak regularisation: a head far from zero, a sharp check
    )
    seen = BeforeTheFirstStep()
    result = run_cell(cfg, callbacks=[seen])
    metrics = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    assert seen.steps_then == 0
    # The images' forward pass with the fitted head scores the validation split as the probe
    # did on its cached features: the same accuracy, the same loss up to float rounding.
    assert seen.metrics["val_acc"] == pytest.approx(metrics["lp_val_acc"], abs=1e-6)
    assert seen.metrics["val_loss"] == pytest.approx(metrics["lp_val_loss"], rel=1e-4)
    # Every layer fine-tunes, at lr x ft_lr_factor: 0.003 x 0.1.
    assert seen.lrs == pytest.approx([0.0003, 0.0003])


def test_lp_ft_runs_end_to_end_and_logs_its_steps(make_cfg, ants_and_bees):
    cfg = make_cfg(*small(ants_and_bees), *TINY, "trainer.max_epochs=2")
    assert not cfg.frozen and not cfg.head_only  # it trains the backbone (tune: lr alone)
    result = run_cell(cfg)
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run(result.run_id)
    assert run.data.metrics["optimizer_steps"] == 2  # 1 batch x 2 epochs
    assert 0 <= run.data.metrics["test_acc"] <= 1 and "lp_val_acc" in run.data.metrics
    assert run.data.params["strategy"] == "lp_ft" and "probe_c_chosen" in run.data.params
    assert run.data.params["input"] == "images"


def test_lp_ft_needs_a_linear_head_and_a_validation_split(make_cfg):
    assert any("head=linear" in p for p in problems(make_cfg("strategy=lp_ft", "head=mlp")))
    study = problems(make_cfg("strategy=lp_ft", "protocol=study"))
    assert any("strategy=lp_ft's probe" in p for p in study)
    assert not problems(make_cfg("strategy=lp_ft"))
