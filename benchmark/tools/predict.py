"""`python -m benchmark.tools.predict --model-uri URI --images FOLDER [--out predictions.csv]
[--tracking-uri URI]`: a cell's model applied to a folder of images (make predict).

The model is the one a cell logs (benchmark.models.served; `tracking.log_model=true`, the
default): `runs:/<run id>/model`, `models:/<model id>` (the run's Models column in the UI) or
`models:/<registered name>/<version>`. Every image under FOLDER (recursively; the extensions a
dataset's images may have) gets one row of the CSV: `path`, `class` (the predicted class) and
`probability` (its softmax probability). An image that cannot be read is skipped, named with
the reason; any other problem (no such folder, no store, a run without a model) ends in one line
that names it and the fix, exit status 2.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel, load_model

from benchmark.data.scan import IMAGE_SUFFIXES
from benchmark.models import served
from benchmark.models.backbones import BackboneError
from benchmark.tracking import identity, server, store

COLUMNS = [served.PATH, served.CLASS, served.PROBABILITY]
URI_FORMS = "runs:/<run id>/model, models:/<model id>, models:/<name>/<version>"


class BadInput(Exception):
    """What the command cannot work with: the message names it and the fix."""


def images_under(folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted; `folder` itself if it is one."""
    suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
    if folder.is_file():
        if folder.suffix.lower() not in IMAGE_SUFFIXES:
            raise BadInput(f"--images {folder}: not an image file ({suffixes}) nor a folder.")
        return [folder]
    if not folder.is_dir():
        raise BadInput(f"--images {folder}: no such folder: give the folder of images to classify.")
    files = sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    )
    if not files:
        raise BadInput(f"--images {folder}: no image files in it or below ({suffixes}).")
    return files


def check_run_model(client: mlflow.MlflowClient, model_uri: str, tracking_uri: str) -> None:
    """A `runs:/<run id>/<name>` URI: the run exists and has a logged model of that name; said
    in one line with the fix otherwise (MLflow's own message names an artifact path)."""
    found = re.fullmatch(r"runs:/([^/]+)/(.+)", model_uri)
    if found is None:
        return
    run_id, name = found[1], found[2].strip("/")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise BadInput(
            f"--model-uri {model_uri}: no run {run_id} in the store "
            f"{identity.redact(tracking_uri)}: check the run id, or give the store it is in with "
            "--tracking-uri."
        ) from None
    outputs = run.outputs.model_outputs if run.outputs else []
    names = [client.get_logged_model(output.model_id).name for output in outputs]
    if not names:
        raise BadInput(
            f"--model-uri {model_uri}: run {run_id} has no logged model. A cell logs one when it "
            "finishes with tracking.log_model=true (the default; `make results` turns it off), "
            "except linear_probe (no checkpoint): give the URI of a run with a model (the "
            "MLflow UI's Models column)."
        )
    if name not in names:
        raise BadInput(
            f"--model-uri {model_uri}: run {run_id} has no model named {name!r}; its model: "
            + ", ".join(f"runs:/{run_id}/{n}" for n in names)
        )


def load(model_uri: str, tracking_uri: str) -> PyFuncModel:
    """The model at `model_uri`, or BadInput naming why it cannot be had."""
    server.check_reachable(tracking_uri)
    store.check_sqlite(tracking_uri, write=False)
    mlflow.set_tracking_uri(tracking_uri)
    check_run_model(mlflow.MlflowClient(tracking_uri), model_uri, tracking_uri)
    try:
        return load_model(model_uri)
    except MlflowException as error:
        said = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BadInput(
            f"--model-uri {model_uri}: cannot load it ({said}): give one of {URI_FORMS} of the "
            f"store {identity.redact(tracking_uri)} (--tracking-uri)."
        ) from None


def predict(model: PyFuncModel, files: list[Path]) -> pd.DataFrame:
    """The model's rows for `files` (benchmark.models.served's columns); BadInput if the model
    is not one that a cell logged."""
    foreign = BadInput(
        "the model does not predict class names from image paths (not a model that a cell of "
        "this harness logged): give the --model-uri of a cell's run."
    )
    try:
        rows = model.predict(pd.DataFrame({served.PATH: [str(f) for f in files]}))
    except MlflowException as error:  # its signature refuses a column of paths
        raise foreign from error
    if not isinstance(rows, pd.DataFrame) or not {*COLUMNS, served.ERROR} <= set(rows.columns):
        raise foreign
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmark.tools.predict",
        description="A cell's logged model applied to a folder of images: a CSV of path, "
        "predicted class and its probability.",
    )
    parser.add_argument("--model-uri", required=True, help=URI_FORMS)
    parser.add_argument(
        "--images", required=True, type=Path, help="a folder (searched recursively) or an image"
    )
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"))
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # its lines alone
    given = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    identity.use_credentials(given)
    uri = identity.store_uri(given)
    try:
        files = images_under(args.images)
        model = load(args.model_uri, uri)
        rows = predict(model, files)
    except (BadInput, BackboneError, server.TrackingUnreachable, store.StoreError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = rows[rows[served.ERROR].astype(bool)]
    for path, reason in zip(failed[served.PATH], failed[served.ERROR], strict=True):
        print(f"skipped {path}: {reason}", file=sys.stderr)
    done = rows[~rows[served.ERROR].astype(bool)]
    if done.empty:
        print(
            f"error: none of the {len(rows)} image(s) under {args.images} could be read (listed "
            "above): give images that open (the harness's image formats).",
            file=sys.stderr,
        )
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done[COLUMNS].to_csv(args.out, index=False)
    skipped = f"; {len(failed)} unreadable image(s) skipped (listed above)" if len(failed) else ""
    print(f"{len(done)} prediction(s) written to {args.out}{skipped}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
