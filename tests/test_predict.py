"""A cell's model, usable without the harness's configuration (issue 36, item 3): the run logs
it as an MLflow pyfunc model that `mlflow.pyfunc.load_model` loads and that predicts class names
from image paths, as the cell's own model predicted them on its test split
(test_predictions.json); the checkpoint kept once, in the store; `python -m
benchmark.tools.predict` writes a folder's predictions as a CSV, and says bad input in one
line. Whole cells on `backbone=stub dataset=synthetic` (seconds each)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.cell.run import run_cell
from benchmark.tools import predict
from tests.conftest import TINY, cell_spec
from tests.test_stub_cells import STUB_CELL

# A frozen backbone runs in eval mode on purpose (as `python -m benchmark` says, nothing).
pytestmark = pytest.mark.filterwarnings(r"ignore:Found \d+ module\(s\) in eval mode")

# Long enough, at a rate high enough, for the stub to tell the classes apart.
LEARNS = ["trainer.max_epochs=4", "strategy.lr=0.05"]


@dataclass
class Cell:
    run_id: str
    uri: str
    output: Path
    images: Path  # the synthetic dataset's root: test_predictions.json's paths are under it

    def test_predictions(self, work: Path) -> pd.DataFrame:
        client = mlflow.MlflowClient(self.uri)
        file = client.download_artifacts(self.run_id, "test_predictions.json", str(work))
        table = json.loads(Path(file).read_text())
        return pd.DataFrame(table["data"], columns=table["columns"])


def stub_cell(folder: Path, empty_store: Path, shared_cache: Path, *overrides: str) -> Cell:
    """A whole cell on the stub and the synthetic data (its model logged, as by default), with
    its own store."""
    shutil.copy(empty_store, folder / "mlflow.db")
    spec = cell_spec(
        *STUB_CELL,
        f"paths.data_root={folder / 'data'}",
        f"paths.output_dir={folder / 'out'}",
        f"paths.cache_dir={shared_cache}",
        f"tracking.uri=sqlite:///{folder / 'mlflow.db'}",
        *overrides,
    )
    summary = run_cell(spec)
    return Cell(
        summary.run_id, spec.tracking.uri or "", folder / "out", folder / "data" / "synthetic"
    )


@pytest.fixture(scope="module")
def finetuned(
    tmp_path_factory: pytest.TempPathFactory, empty_store: Path, shared_cache: Path
) -> Cell:
    folder = tmp_path_factory.mktemp("finetuned")
    return stub_cell(folder, empty_store, shared_cache, "strategy=finetune", *LEARNS)


@pytest.fixture(scope="module")
def frozen_gray(
    tmp_path_factory: pytest.TempPathFactory, empty_store: Path, shared_cache: Path
) -> Cell:
    """An MLP head trained on the frozen backbone's cached features (its checkpoint holds the
    head alone), on grayscale images."""
    folder = tmp_path_factory.mktemp("frozen-gray")
    settings = ["strategy=freeze", "colour=gray", "head=mlp", "trainer.max_epochs=8"]
    return stub_cell(folder, empty_store, shared_cache, *settings, "strategy.lr=0.05")


def five(predictions: pd.DataFrame) -> pd.DataFrame:
    """5 test images spread over the predicted classes (sorted by them, evenly spaced)."""
    ordered = predictions.sort_values(["predicted", "path"]).reset_index(drop=True)
    return ordered.iloc[np.linspace(0, len(ordered) - 1, 5).round().astype(int)]


@pytest.mark.parametrize("which", ["finetuned", "frozen_gray"])
def test_the_run_logs_a_pyfunc_model_that_predicts_as_the_cell_did(
    request: pytest.FixtureRequest, tmp_path: Path, which: str
) -> None:
    cell: Cell = request.getfixturevalue(which)
    mlflow.set_tracking_uri(cell.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{cell.run_id}/model")
    tested = five(cell.test_predictions(tmp_path))
    assert tested.predicted.nunique() > 1  # a model that tells classes apart
    paths = [str(cell.images / p) for p in tested.path]

    rows = model.predict(pd.DataFrame({"path": paths}))
    assert list(rows["path"]) == paths
    assert list(rows["class"]) == list(tested.predicted)  # the cell's own model's predictions
    assert (rows["error"] == "").all()
    config = model.metadata.flavors["python_function"]["config"]  # what prediction needs
    assert config["classes"] == ["blue", "green", "red"]  # the head's order
    assert config["backbone"] == "stub" and config["grayscale"] == (which == "frozen_gray")
    assert config["preprocess"]["input_size"] == 16
    spread = rows[[f"p_{c}" for c in config["classes"]]].to_numpy()
    assert np.allclose(spread.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(rows["probability"], spread.max(axis=1))
    assert list(model.predict(paths)["class"]) == list(tested.predicted)  # a list of paths too

    # One copy of the checkpoint: the model's; the cell's own is removed once it is logged.
    checkpoint = model.metadata.flavors["python_function"]["artifacts"]["checkpoint"]
    assert Path(checkpoint["uri"]).parent == cell.output / "checkpoints"
    assert not Path(checkpoint["uri"]).exists()
    model_id = model.metadata.model_id
    location = mlflow.MlflowClient(cell.uri).get_logged_model(model_id).artifact_location
    logged = Path(location.removeprefix("file://")) / checkpoint["path"]
    state = torch.load(logged, weights_only=True)["state_dict"]
    # freeze on cached features: the head alone, on the pretrained backbone when loaded
    assert {key.split(".")[0] for key in state} == (
        {"head"} if which == "frozen_gray" else {"backbone", "head"}
    )


def test_the_predict_command_writes_a_folders_predictions(
    finetuned: Cell, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tested = five(finetuned.test_predictions(tmp_path))
    folder = tmp_path / "new images"
    expected = {}
    for index, relative in enumerate(tested.path):  # nested folders, read recursively
        copy = folder / ("deep/er" if index % 2 else "") / f"{index}-{Path(relative).name}"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(finetuned.images / relative, copy)
        expected[str(copy)] = tested.predicted.iloc[index]
    (folder / "broken.jpg").write_text("not an image")
    (folder / "notes.txt").write_text("not an image file either: not read")
    out = tmp_path / "out" / "predictions.csv"

    code = predict.main(
        [
            "--model-uri", f"runs:/{finetuned.run_id}/model",
            "--images", str(folder),
            "--out", str(out),
            "--tracking-uri", finetuned.uri,
        ]
    )  # fmt: skip

    said = capsys.readouterr()
    assert code == 0, said.err
    written = pd.read_csv(out)
    assert list(written.columns) == ["path", "class", "probability"]
    assert dict(zip(written["path"], written["class"], strict=True)) == expected
    assert written["probability"].between(0, 1).all()
    assert f"skipped {folder / 'broken.jpg'}: UnidentifiedImageError" in said.err
    assert "notes.txt" not in said.err + said.out
    assert "5 prediction(s) written" in said.out and "1 unreadable image(s) skipped" in said.out


@pytest.mark.parametrize("case", ["no folder", "no model", "no run"])
def test_bad_input_to_the_predict_command_is_one_line_with_the_fix(
    finetuned: Cell, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    run_id, images = finetuned.run_id, str(finetuned.images)
    if case == "no folder":
        images = str(tmp_path / "missing")
    elif case == "no model":  # a run of the store without a logged model
        client = mlflow.MlflowClient(finetuned.uri)
        experiment = client.get_run(finetuned.run_id).info.experiment_id
        run_id = client.create_run(experiment, tags={"benchmark.harness": "benchmark"}).info.run_id
        client.set_terminated(run_id)
    elif case == "no run":
        run_id = "0" * 32
    out = tmp_path / "predictions.csv"
    arguments = ["--model-uri", f"runs:/{run_id}/model", "--images", images, "--out", str(out)]

    code = predict.main([*arguments, "--tracking-uri", finetuned.uri])

    said = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(said) == 1 and said[0].startswith("error: "), said
    assert {
        "no folder": f"--images {images}: no such folder: give the folder of images",
        "no model": f"run {run_id} has no logged model. A cell logs one when it finishes",
        "no run": f"no run {run_id} in the store",
    }[case] in said[0]


@pytest.mark.e2e
def test_a_default_cells_model_predicts_class_names_for_hymenoptera_images(
    tmp_path: Path, shared_data: Path, shared_cache: Path, empty_store: Path
) -> None:
    """The default cell (EfficientNet-Lite0, Hymenoptera, fine-tuned; one short epoch): its
    logged model, loaded with mlflow.pyfunc alone, names 5 of its test images' classes as the
    cell's own model did."""
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    spec = cell_spec(
        *TINY,
        "trainer.limit_test_batches=1.0",  # the whole test split: its predictions are logged
        f"paths.data_root={shared_data}",
        f"paths.output_dir={tmp_path / 'out'}",
        f"paths.cache_dir={shared_cache}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    )
    summary = run_cell(spec)
    root = shared_data / "hymenoptera_data"  # test_predictions.json's paths are under it
    cell = Cell(summary.run_id, spec.tracking.uri or "", tmp_path / "out", root)
    mlflow.set_tracking_uri(cell.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{cell.run_id}/model")
    tested = five(cell.test_predictions(tmp_path))
    assert tested.predicted.nunique() == 2, tested  # a model that tells ants from bees
    paths = [str(cell.images / p) for p in tested.path]
    assert all(Path(p).is_file() for p in paths), paths
    rows = model.predict(paths)
    assert set(rows["class"]) <= {"ants", "bees"} and (rows["error"] == "").all()
    assert list(rows["class"]) == list(tested.predicted)  # the cell's own model's predictions
    config = model.metadata.flavors["python_function"]["config"]
    assert config["backbone"] == "efficientnet_lite0" and config["classes"] == ["ants", "bees"]
