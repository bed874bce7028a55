"""`strategy=linear_probe`: Kornblith et al.'s fixed-feature protocol.

L2-regularised multinomial logistic regression, fitted with L-BFGS (scikit-learn) on the frozen
backbone's cached features; the inverse strength C is the one with the best validation accuracy
(ties: the stronger regularisation), and only that model is scored on the test split. Features
are standardised with the training split's statistics, so one C grid suits every backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torchmetrics.functional.classification import multiclass_confusion_matrix

from benchmark.models.features import FeatureSet


@dataclass
class ProbeResult:
    c: float
    val_acc: float
    val_loss: float
    test_acc: float
    test_loss: float
    val_acc_by_c: dict[float, float]
    confusion: torch.Tensor  # rows: true class, columns: predicted
    iterations: int  # the chosen model's L-BFGS iterations
    model: Pipeline  # the chosen model: standardisation, then the logistic regression
    test_predicted: list[int]  # the class predicted for each test image, in the split's order
    # The same model on the second test split (dataset.shift_test): accuracy, loss, predictions.
    shift_acc: float | None = None
    shift_loss: float | None = None
    shift_predicted: list[int] | None = None


def fit_probe(features: FeatureSet, c_grid: list[float], num_classes: int) -> ProbeResult:
    if not c_grid:
        raise ValueError("strategy.probe_c is empty: give the C values to choose from.")
    train_x, train_y = features.train[0].numpy(), features.targets["train"].numpy()
    val_x, val_y = features.val.numpy(), features.targets["val"].numpy()

    def fit(c: float) -> Pipeline:
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
        return model.fit(train_x, train_y)

    models = {c: fit(c) for c in sorted(c_grid)}
    scores = {c: float(np.mean(m.predict(val_x) == val_y)) for c, m in models.items()}
    best = max(scores, key=lambda c: (scores[c], -c))
    val_loss = float(log_loss(val_y, models[best].predict_proba(val_x), labels=range(num_classes)))
    test_acc, test_loss, predicted = _scored(models[best], features, "test", num_classes)
    test_y = features.targets["test"].numpy()
    confusion = multiclass_confusion_matrix(
        torch.from_numpy(np.asarray(predicted)), torch.from_numpy(test_y), num_classes
    )
    result = ProbeResult(
        c=best,
        val_acc=scores[best],
        val_loss=val_loss,
        test_acc=test_acc,
        test_loss=test_loss,
        val_acc_by_c=scores,
        confusion=confusion,
        iterations=int(models[best][-1].n_iter_.max()),
        model=models[best],
        test_predicted=predicted,
    )
    if features.shift is not None:  # the same model on the second test split
        result.shift_acc, result.shift_loss, result.shift_predicted = _scored(
            models[best], features, "shift", num_classes
        )
    return result


def _scored(
    model: Pipeline, features: FeatureSet, split: str, num_classes: int
) -> tuple[float, float, list[int]]:
    """Accuracy, log-loss and the predicted class of each image of a split."""
    x, y = getattr(features, split).numpy(), features.targets[split].numpy()
    probabilities = model.predict_proba(x)
    predicted = probabilities.argmax(1)
    loss = float(log_loss(y, probabilities, labels=range(num_classes)))
    return float(np.mean(predicted == y)), loss, predicted.tolist()


def linear_head(model: Pipeline, num_classes: int) -> dict[str, torch.Tensor]:
    """The fitted probe as the state dict of one `nn.Linear` on the raw features, giving the
    same probabilities: its standardisation folded in ((x - mean) / scale), and with two
    classes scikit-learn's one logit z as the pair (-z/2, z/2), whose softmax is its sigmoid."""
    scaler, regression = model[0], model[-1]
    weight = regression.coef_ / scaler.scale_
    bias = regression.intercept_ - weight @ scaler.mean_
    if weight.shape[0] == 1 and num_classes == 2:
        weight, bias = np.concatenate([-weight, weight]) / 2, np.concatenate([-bias, bias]) / 2
    return {
        "weight": torch.from_numpy(weight).float(),
        "bias": torch.from_numpy(bias).float(),
    }
