"""`python -m benchmark.tools.rank [key=value ...] backbone=a,b,c`: which backbone to try first,
scored on its frozen features before any training.

For each backbone (and each value of any other comma-separated key) the cell's data is split
as a cell splits it and the frozen backbone's features are extracted, or read from the feature
cache that the cells share. Two scores, from the training split alone, none reading the test split:

- `logme`: LogME (You et al., 2021), the log marginal evidence per sample of a Bayesian linear
  model from the features to each class's one-hot target, its prior and noise precisions chosen
  by maximising that evidence, averaged over classes; computed with scikit-learn's
  `BayesianRidge`, whose evidence maximisation and log marginal likelihood are the same
  quantities. Higher is better.
- `leep` (Nguyen et al., 2020) and `nce` (Tran et al., 2019), where the backbone's ImageNet
  classifier is a Linear layer on those features: how well the ImageNet label distribution
  (LEEP: the soft predictions; NCE: the hard ones) predicts the target labels through their
  empirical conditional, the log-likelihood per sample (LEEP) or minus the conditional entropy
  H(Y|Z) (NCE). Higher is better.
- `knn_val_acc`: a plain baseline, the accuracy on the validation split of a 5-nearest-neighbour
  classifier on the training split's L2-normalised features.

Each backbone's scores go to MLflow as a run of kind `rank` (params as a cell's, metrics `logme`,
`knn_val_acc`, `rank_s`); the report sets the predicted order beside the measured one (Kendall's
tau between each score and the backbones' test accuracy, per dataset x colour x strategy).
"""

from __future__ import annotations

import logging
import sys
import time
from itertools import product

import mlflow
import numpy as np
import pandas as pd
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import open_dict
from sklearn.linear_model import BayesianRidge
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

from benchmark.cell.run import cell_features, image_data
from benchmark.config.rules import ConfigError, check
from benchmark.config.schema import register_configs
from benchmark.config.spec import CellSpec, from_config
from benchmark.data import DatasetError
from benchmark.models import precision
from benchmark.models.backbones import BackboneError, create_backbone, imagenet_head
from benchmark.tracking import identity, store
from benchmark.tracking.resume import cell_manifest
from benchmark.tracking.server import TrackingUnreachable

log = logging.getLogger("benchmark")
# Not bugs: said in one line naming the fix, as a cell's process says them.
BAD_INPUT = (ConfigError, DatasetError, BackboneError, TrackingUnreachable, store.StoreError)


def logme(features: np.ndarray, targets: np.ndarray) -> float:
    """LogME: the mean over classes of the maximised log evidence per sample of a Bayesian
    linear regression from `features` to the class's one-hot column."""
    features = features.astype(np.float64)
    evidence = []
    for label in np.unique(targets):
        model = BayesianRidge(compute_score=True, fit_intercept=False, max_iter=300)
        model.fit(features, (targets == label).astype(np.float64))
        evidence.append(model.scores_[-1] / len(features))
    return float(np.mean(evidence))


def leep(source_probs: np.ndarray, targets: np.ndarray) -> float:
    """LEEP: mean log of the expected empirical prediction, sum_z P(y_i | z) theta_i(z), where
    P(y | z) comes from the joint P(y, z) = mean_i theta_i(z) [y_i = y]."""
    labels = np.unique(targets, return_inverse=True)[1]
    onehot = np.eye(labels.max() + 1)[labels]
    joint = onehot.T @ source_probs / len(labels)  # (Y, Z)
    conditional = joint / joint.sum(axis=0, keepdims=True).clip(min=1e-12)
    expected = (source_probs @ conditional.T)[np.arange(len(labels)), labels]
    return float(np.mean(np.log(expected.clip(min=1e-12))))


def nce(source_labels: np.ndarray, targets: np.ndarray) -> float:
    """NCE: minus the conditional entropy H(Y | Z) of the target labels given the hard
    ImageNet predictions, from their empirical joint distribution."""
    table = pd.crosstab(source_labels, targets).to_numpy(float)
    joint = table / table.sum()
    marginal = joint.sum(axis=1, keepdims=True)
    inside = joint > 0
    return float(np.sum(joint[inside] * np.log((joint / marginal)[inside])))


def knn_val_acc(
    train: np.ndarray, train_y: np.ndarray, val: np.ndarray, val_y: np.ndarray
) -> float:
    knn = KNeighborsClassifier(n_neighbors=5).fit(normalize(train), train_y)
    return float(knn.score(normalize(val), val_y))


def rank_one(spec: CellSpec) -> dict[str, float]:
    """The scores of the backbone of `spec` on its data (features extracted or read back)."""
    check(spec)
    spec = precision.resolve(spec)
    start = time.perf_counter()
    manifest = cell_manifest(spec)
    made = spec.backbone
    backbone = create_backbone(made.name, made.weights_path, model=made.model)
    channels_last = spec.speed.channels_last
    data, _ = image_data(spec, manifest.frame, backbone, channels_last)
    features = cell_features(spec, data, backbone, 0, channels_last)  # as the images are
    train, train_y = features.train[0].numpy(), features.targets["train"].numpy()
    val, val_y = features.val.numpy(), features.targets["val"].numpy()
    scores = {
        "logme": logme(train, train_y),
        "knn_val_acc": knn_val_acc(train, train_y, val, val_y),
    }
    head = imagenet_head(made.name, made.weights_path, model=made.model)
    if head is not None:
        with torch.inference_mode():
            probs = head(features.train[0].float()).softmax(dim=1).double().numpy()
        scores |= {"leep": leep(probs, train_y), "nce": nce(probs.argmax(axis=1), train_y)}
    return {
        **scores,
        "rank_s": time.perf_counter() - start,
        "feature_build_s": features.build_s,
    }


def log_scores(spec: CellSpec, scores: dict[str, float]) -> str:
    """One MLflow run of kind `rank` for a backbone's scores."""
    uri = identity.tracking_uri(spec)
    experiment = store.experiment_id(uri, spec.tracking.experiment)
    tags = {
        identity.HARNESS_TAG: "benchmark",
        identity.SCHEMA_TAG: identity.SCHEMA_VERSION,
        identity.KIND_TAG: "rank",
        **identity.git_tags(),
    }
    with mlflow.start_run(experiment_id=experiment, tags=tags, log_system_metrics=False) as run:
        mlflow.log_params(identity.redact_all(identity.run_params(spec)))
        mlflow.log_metrics(scores)
    return run.info.run_id


def configs(overrides: list[str]) -> list[CellSpec]:
    """One cell per combination of the comma-separated values in `overrides` (the boundary)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
        if o.is_sweep_override()
        else [line]  # as given (Hydra's input_line)
        for o, line in zip(parsed, overrides, strict=True)
    ]
    register_configs()
    with initialize_config_dir(str(identity.PROJECT_DIR / "conf"), version_base="1.3"):
        made = [compose("config", overrides=list(c)) for c in product(*choices)]
    for cfg in made:
        with open_dict(cfg):
            cfg.paths.output_dir = "outputs/rank"  # no Hydra run folder: nothing is trained
    return [from_config(cfg) for cfg in made]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = list(sys.argv[1:] if argv is None else argv)
    if any(o in ("-h", "--help") for o in overrides):
        print(__doc__)
        return 0
    try:
        specs = configs(overrides)
        for spec in specs:
            identity.use_credentials(spec.tracking.uri)
        rows = [score_and_log(spec) for spec in specs]
    except BAD_INPUT as error:
        print(f"error: {error}", file=sys.stderr)  # bad input: one line, as a cell says it
        return 1
    except HydraException as error:  # a misspelt group option or key, a bad override
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows).sort_values("logme", ascending=False)
    print(table.round(4).to_string(index=False))
    return 0


def one_line(error: HydraException) -> str:
    """Hydra's message (several lines, with the config search path) as one line: a missing
    option names the ones there are."""
    first = str(error).strip().splitlines()[0]
    if isinstance(error, MissingConfigException) and error.options:
        return f"{first}; choose one of: {', '.join(sorted(error.options))}."
    return first


def score_and_log(spec: CellSpec) -> dict[str, object]:
    """The backbone's scores, logged as a run of kind `rank` and said in one log line."""
    backbone = spec.backbone.model or spec.backbone.name
    name = f"{spec.dataset.name}/{spec.colour.name}/{backbone}"
    scores = rank_one(spec)
    run_id = log_scores(spec, scores)
    log.info(
        "%s: LogME %.4f, LEEP %s, NCE %s, 5-NN val acc %.3f (%.1f s) | MLflow run %s",
        name, scores["logme"], f"{scores.get('leep', float('nan')):.4f}",
        f"{scores.get('nce', float('nan')):.4f}", scores["knn_val_acc"], scores["rank_s"],
        run_id,
    )  # fmt: skip
    return {"cell": name, "backbone": spec.backbone.name, **scores}


if __name__ == "__main__":
    sys.exit(main())
