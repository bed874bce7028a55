"""Refit on train + validation, or keep the checkpoint chosen on validation? The measurement
behind the protocol's choice (issue 32): `python -m benchmark.tools.refit --tracking-uri URI
--run-id ID [--data-root DIR]` takes a FINISHED run of a strategy trained by epochs from the
pretrained start (finetune, partial, two_stage, freeze on images), its values (tuned or set) and
its chosen epoch, and fits its cell again on the union of its training and validation splits
(VTAB's and Kornblith et al.'s final fit) twice:

- `refit, chosen epochs`: stopped after the epochs of the checkpoint validation chose, under the
  same schedule (the recipe's cosine over trainer.max_epochs);
- `refit, all epochs`: the whole recipe, its last epoch kept (nothing is left to select on).

Both are tested on the run's test split and printed beside the run's own test accuracy, with
one JSON line (`--json FILE` writes it too). It needs the run's data as it was (the same data
digest) and opens no run in the store.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import lightning as L
import mlflow
import yaml
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from benchmark.cell import run as cell
from benchmark.cell import tune
from benchmark.config.spec import CellSpec, from_config
from benchmark.models.backbones import create_backbone
from benchmark.models.classifier import recipe_callbacks
from benchmark.models.trainer import build_trainer
from benchmark.tracking import identity


class StopAfter(Callback):
    """Ends the fit after `epochs` epochs, whatever trainer.max_epochs (the schedule's length)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, _: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def run_spec(run: mlflow.entities.Run, config: dict, data_root: str, work: Path) -> CellSpec:
    """The run's cell at its values (tune.chosen.* for a tuned run), reading `data_root`,
    writing under `work`, untuned."""
    config["paths"] |= {"data_root": data_root, "output_dir": str(work)}
    spec = from_config(OmegaConf.create(config))
    prefix = "tune.chosen."
    values = {
        k[len(prefix) :]: float(v) for k, v in run.data.params.items() if k.startswith(prefix)
    }
    spec = tune.with_values(spec, values)
    return replace(spec, tune=replace(spec.tune, trials=None))


def refit(spec: CellSpec, epochs: int) -> float:
    """The cell fitted on train + validation for `epochs` epochs of its recipe: its test
    accuracy."""
    spec, manifest, _ = cell.plan(spec)
    frame = manifest.frame.assign(split=manifest.frame.split.replace({"val": "train"}))
    L.seed_everything(spec.seed, workers=True, verbose=False)
    backbone = create_backbone(
        spec.backbone.name, spec.backbone.weights_path, model=spec.backbone.model
    )
    channels_last = spec.speed.channels_last
    data, _ = cell.image_data(spec, frame, backbone, channels_last)
    inputs = cell.fit_inputs(spec, data, backbone, None, channels_last, None)
    L.seed_everything(spec.seed, workers=True, verbose=False)
    model = inputs.build(spec)
    trainer = build_trainer(
        spec.trainer,
        [StopAfter(epochs), *recipe_callbacks(spec.strategy, spec.optim)],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=spec.paths.output_dir,
    )
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data, verbose=False)
    return float(trainer.callback_metrics["test_acc"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.tools.refit", description=__doc__)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--json", help="also write the final JSON object to this file")
    args = parser.parse_args(argv)
    client = mlflow.MlflowClient(args.tracking_uri)
    run = client.get_run(args.run_id)
    if run.info.status != "FINISHED" or "best_val_epoch" not in run.data.metrics:
        print(f"run {args.run_id}: not a FINISHED run with a chosen epoch (best_val_epoch).")
        return 2
    with tempfile.TemporaryDirectory() as work:
        config = yaml.safe_load(
            Path(client.download_artifacts(run.info.run_id, "config.yaml", work)).read_text()
        )
        spec = run_spec(run, config, str(Path(args.data_root).resolve()), Path(work) / "fit")
        if spec.probe or spec.probe_head or spec.max_eval:
            print(
                f"{spec.name}: refit measures strategies trained by epochs from the pretrained "
                "start under a held-out protocol (finetune, partial, two_stage, freeze)."
            )
            return 2
        _, manifest, _ = cell.plan(spec)
        if manifest.content_sha256 != run.data.params.get(identity.DATA_PARAM):
            print(
                f"{spec.name}: the data under {args.data_root} is not the run's (data digest "
                "differs): refit it on the data the run used."
            )
            return 2
        chosen = int(run.data.metrics["best_val_epoch"]) + 1  # -1: the start won, 0 epochs
        figures = {
            "cell": spec.name,
            "run_id": run.info.run_id,
            "checkpoint_test_acc": run.data.metrics["test_acc"],
            "chosen_epochs": chosen,
            "max_epochs": spec.max_epochs,
            "refit_chosen_epochs_test_acc": refit(spec, chosen) if chosen else None,
            "refit_all_epochs_test_acc": refit(spec, spec.max_epochs),
            "n_test": int(run.data.params["n_test"]),
        }
    for name in (
        "checkpoint_test_acc",
        "refit_chosen_epochs_test_acc",
        "refit_all_epochs_test_acc",
    ):
        print(f"{name:32} {figures[name]}")
    line = json.dumps(figures)
    print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
