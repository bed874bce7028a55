"""`make bench`: what a cell costs, against what the hardware must spend and against the study.

For each dataset and strategy it measures:
- our cell, run as users run it (`python -m benchmark`), with the caches' first build timed
  apart: freeze runs first and builds them (decoded images, features), and a freeze cell of
  another seed is measured on them; finetune then finds the image cache built;
- the study's loop, written plainly below: a folder dataset that opens and decodes every JPEG
  with PIL and transforms it every epoch, the same backbone, epochs, batch size and workers;
- the compute-only limit: the same model on ready tensors (forward, and forward + backward +
  step), times the images each cell must push through it.
On a GPU (`--device cuda`, the default when there is one) our cells run with `trainer=gpu` (bf16,
channels-last), the compute limit in the same bf16 autocast and memory format, and the study's
loop as the study ran it (float32, the model and each batch moved to the GPU).
It prints a table and ends with one JSON line holding every figure (`--json FILE` writes it too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import mlflow
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from benchmark.cell.cost import peak_rss_mb
from benchmark.config.schema import DatasetConfig
from benchmark.data import build_manifest
from benchmark.data.images import Preprocess
from benchmark.models.backbones import create_backbone
from benchmark.models.precision import native_bf16

DEFAULT_DATA = os.environ.get("BENCHMARK_DATA_ROOT", "data")


# ---------------------------------------------------------------- the options


@dataclass(frozen=True)
class BenchOptions:
    """The bench's options, parsed and completed once: lists split, the device resolved, the
    work folder, cache folder and store chosen."""

    datasets: tuple[str, ...]
    strategies: tuple[str, ...]
    paths: tuple[str, ...]
    backbone: str
    epochs: int
    reference_epochs: int | None
    batch_size: int
    workers: int
    compute_steps: int
    device: str
    device_name: str
    tune_epochs: int
    tune_strategies: tuple[str, ...]
    tune_train_batches: float
    tune_only: bool
    json_file: str | None
    data_root: str
    cache_dir: str
    work: str
    tracking_uri: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str) -> BenchOptions:
        """The options of these parsed arguments on `device` (cuda or cpu); without --work, a
        fresh temporary folder (the cache in it without --cache-dir)."""
        device_name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
        work = args.work or tempfile.mkdtemp(prefix="bench-")
        return cls(
            datasets=tuple(args.datasets.split(",")),
            strategies=tuple(args.strategies.split(",")),
            paths=tuple(args.paths.split(",")),
            backbone=args.backbone,
            epochs=args.epochs,
            reference_epochs=args.reference_epochs,
            batch_size=args.batch_size,
            workers=args.workers,
            compute_steps=args.compute_steps,
            device=device,
            device_name=device_name,
            tune_epochs=args.tune_epochs,
            tune_strategies=tuple(args.tune_strategies.split(",")),
            tune_train_batches=args.tune_train_batches,
            tune_only=args.tune_only,
            json_file=args.json,
            data_root=args.data_root,
            cache_dir=args.cache_dir or str(Path(work) / "cache"),
            work=work,
            tracking_uri=f"sqlite:///{Path(work).resolve() / 'mlflow.db'}",
        )

    @property
    def study_epochs(self) -> int:
        """The epochs the study's loop is timed over (then scaled to `epochs`)."""
        return self.reference_epochs or self.epochs


@dataclass(frozen=True)
class StudyLoopOptions:
    """What the study's loop runs (`--study-loop`, in its own process): one dataset and
    strategy, the model, the epochs, and where and how the data is read."""

    dataset: str
    strategy: str
    epochs: int
    backbone: str
    batch_size: int
    workers: int
    data_root: str
    cache_dir: str
    device: str

    @classmethod
    def from_args(cls, args: argparse.Namespace, device: str) -> StudyLoopOptions:
        """The study loop's options of these parsed arguments, on `device`."""
        return cls(
            dataset=args.dataset,
            strategy=args.strategy,
            epochs=args.epochs,
            backbone=args.backbone,
            batch_size=args.batch_size,
            workers=args.workers,
            data_root=args.data_root,
            cache_dir=args.cache_dir,
            device=device,
        )


# ---------------------------------------------------------------- the compute-only limit


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(
    model: nn.Module,
    batch: int,
    size: int,
    train: bool,
    steps: int,
    device: torch.device | None = None,
    fast: bool = True,
) -> float:
    """The model alone on ready tensors: no data loading, no logging. `fast`: as our cells run
    by default (channels-last, bf16 autocast where the device has native bf16); else float32
    in the default memory format, as the study's loop runs."""
    device = device or torch.device("cpu")
    bf16 = fast and native_bf16(device.type)
    memory_format = torch.channels_last if fast else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    images = torch.randn(batch, 3, size, size, device=device)
    images = images.contiguous(memory_format=memory_format)
    targets = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train(train)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if train:
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(images).float(), targets).backward()
                optimizer.step()
            else:
                with torch.inference_mode():
                    model(images)

    step()  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - start)


def compute_limit(
    backbone: str,
    classes: int,
    batch: int,
    steps: int,
    device: torch.device | None = None,
    fast: bool = True,
) -> dict[str, float]:
    made = create_backbone(backbone)
    model = nn.Sequential(made.model, nn.Linear(made.num_features, classes))
    size = made.preprocess.input_size
    return {
        "forward_img_s": images_per_second(model, batch, size, False, steps, device, fast),
        "train_step_img_s": images_per_second(model, batch, size, True, steps, device, fast),
    }


# ---------------------------------------------------------------- the study's loop


class StudyFolder(Dataset):
    """What ImageFolder does: open, decode and transform the file, every time it is read."""

    def __init__(self, paths: list[str], targets: list[int], transform: T.Compose) -> None:
        self.paths, self.targets, self.transform = paths, targets, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[index]) as image:
            return self.transform(image.convert("RGB")), self.targets[index]


def study_transforms(preprocess: Preprocess) -> tuple[T.Compose, T.Compose]:
    """The study's transforms for this backbone's preprocessing: training (Resize, random-resized
    crop, flip) and evaluation (Resize, centre crop), each normalized."""
    normalize = T.Normalize(preprocess.mean, preprocess.std)
    resize = int(preprocess.input_size / preprocess.crop_pct)
    train_tf = T.Compose(
        [
            T.Resize(resize),
            T.RandomResizedCrop(preprocess.input_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    val_tf = T.Compose(
        [T.Resize(resize), T.CenterCrop(preprocess.input_size), T.ToTensor(), normalize]
    )
    return train_tf, val_tf


def study_loop(options: StudyLoopOptions) -> dict[str, float]:
    """The study's training loop (Resize 256, random-resized crop, flip; SGD lr 0.001 momentum
    0.9, StepLR 10/0.1; BatchNorm left in training mode under freeze), timed per epoch."""
    manifest = build_manifest(
        DatasetConfig(name=options.dataset), Path(options.data_root), 0, Path(options.cache_dir)
    ).frame
    made = create_backbone(options.backbone)
    train_tf, val_tf = study_transforms(made.preprocess)
    classes = sorted(manifest.label.unique())

    def loader(split: str, transform: T.Compose, shuffle: bool) -> DataLoader:
        rows = manifest[manifest.split == split]
        targets = [classes.index(label) for label in rows.label]
        dataset = StudyFolder(rows.path.tolist(), targets, transform)
        return DataLoader(dataset, options.batch_size, shuffle=shuffle, num_workers=options.workers)

    train, val = loader("train", train_tf, True), loader("val", val_tf, False)
    device = torch.device(options.device)
    model = nn.Sequential(made.model, nn.Linear(made.num_features, len(classes))).to(device)
    if options.strategy == "freeze":
        for parameter in made.model.parameters():
            parameter.requires_grad = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.001, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    best, seconds = 0.0, []
    for _ in range(options.epochs):
        start = time.perf_counter()
        model.train()
        for images, targets in train:
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), targets).backward()
            optimizer.step()
        schedule.step()
        model.eval()
        hits = 0
        with torch.no_grad():
            for images, targets in val:
                images, targets = images.to(device), targets.to(device)
                hits += int((model(images).argmax(1) == targets).sum())
        best = max(best, hits / len(cast(StudyFolder, val.dataset)))
        seconds.append(time.perf_counter() - start)
    return {
        "epoch_s": sum(seconds) / len(seconds),
        "max_val_acc": best,
        "peak_rss_mb": peak_rss_mb(),
    }


# ---------------------------------------------------------------- our cell


# The two paths compared: the default (channels-last, `trainer.precision=auto`: bf16 autocast
# where native) and plain float32 in the default memory format (the path before the fast one).
PATHS = {"fast": [], "fp32": ["trainer.precision=32-true", "speed.channels_last=false"]}


def our_cell(
    dataset: str,
    strategy: str,
    seed: int,
    options: BenchOptions,
    path: str = "fast",
    extra: tuple[str, ...] = (),
    label: str = "",
) -> dict:
    """One cell through the command line (`extra`: more overrides; `label` names its run
    folder apart); its figures read back from its MLflow run."""
    command = [
        sys.executable,
        "-m",
        "benchmark",
        f"dataset={dataset}",
        f"strategy={strategy}",
        f"backbone={options.backbone}",
        f"seed={seed}",
        f"trainer.max_epochs={options.epochs}",
        "trainer.enable_progress_bar=false",
        f"data.batch_size={options.batch_size}",
        f"data.num_workers={options.workers}",
        f"paths.data_root={options.data_root}",
        f"paths.cache_dir={options.cache_dir}",
        f"tracking.uri={options.tracking_uri}",
        f"hydra.run.dir={options.work}/runs/{dataset}-{strategy}-{seed}-{path}{label}",
        "rerun=true",
        # bf16 and channels-last on a GPU, as users run a GPU cell; the CPU otherwise.
        "trainer=gpu" if options.device == "cuda" else "trainer.accelerator=cpu",
        *PATHS[path],
        *extra,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    process_s = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(
            f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
    mlflow.set_tracking_uri(options.tracking_uri)
    run = mlflow.search_runs(
        experiment_names=["benchmark"],
        filter_string=f"params.dataset = '{dataset}' and params.strategy = '{strategy}' "
        f"and params.seed = '{seed}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    ).iloc[0]
    metrics = {k.removeprefix("metrics."): v for k, v in run.items() if k.startswith("metrics.")}
    return {
        **metrics,
        "process_s": process_s,
        "input": run["params.input"],
        "precision": run["params.trainer.precision"],
        "channels_last": run["params.speed.channels_last"],
    }


def split_sizes(dataset: str, options: BenchOptions) -> dict[str, int]:
    """The number of images in each split of `dataset`, as its cells read it."""
    manifest = build_manifest(
        DatasetConfig(name=dataset), Path(options.data_root), 0, Path(options.cache_dir)
    ).frame
    return manifest.split.value_counts().to_dict()


# ---------------------------------------------------------------- the bench


def study(dataset: str, strategy: str, options: BenchOptions) -> dict[str, float]:
    """The study's loop in a fresh process (its own peak memory), for `reference_epochs`."""
    out = Path(options.work) / f"study-{dataset}-{strategy}.json"
    command = [
        sys.executable,
        "-m",
        "benchmark.tools.bench",
        "--study-loop",
        f"--dataset={dataset}",
        f"--strategy={strategy}",
        f"--epochs={options.study_epochs}",
        f"--backbone={options.backbone}",
        f"--batch-size={options.batch_size}",
        f"--workers={options.workers}",
        f"--data-root={options.data_root}",
        f"--cache-dir={options.cache_dir}",
        f"--device={options.device}",
        f"--out={out}",
    ]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


@dataclass(frozen=True)
class Limit:
    """The compute-only limit of one path on one dataset: the model's forward and training-step
    throughputs (images per second), one forward pass over every image, and each strategy's
    floor (the seconds the hardware must spend on its cell)."""

    forward_img_s: float
    train_step_img_s: float
    one_pass_s: float
    floors: dict[str, float]


def path_limit(
    dataset: str, path: str, sizes: tuple[int, int, int], options: BenchOptions
) -> Limit:
    """The compute-only limit of `path` for a dataset of `sizes` (train, val, test images),
    said in one line."""
    n_train, n_val, n_test = sizes
    limit = compute_limit(
        options.backbone,
        2,
        options.batch_size,
        options.compute_steps,
        torch.device(options.device),
        path == "fast",
    )
    forward, train_step = limit["forward_img_s"], limit["train_step_img_s"]
    one_pass_s = (n_train + n_val + n_test) / forward
    floors = {
        # Every epoch trains on the training split and evaluates the validation split.
        "finetune": options.epochs * (n_train / train_step + n_val / forward) + n_test / forward,
        # The frozen backbone's features: one forward pass over every image.
        "freeze": one_pass_s,
    }
    print(
        f"{dataset} ({path}): {n_train}/{n_val}/{n_test} images; forward {forward:.1f} "
        f"img/s, train step {train_step:.1f} img/s; one forward pass {one_pass_s:.1f}s",
        flush=True,
    )
    return Limit(forward, train_step, one_pass_s, floors)


def measured_cells(
    dataset: str, strategy: str, path: str, options: BenchOptions
) -> tuple[dict, dict]:
    """The first cell of `strategy` (seed 0) and the one measured: a cell that built a cache is
    measured again (seed 1) on the warm cache; a long one that found them warm already is
    measured once (the first is the measured one)."""
    first = our_cell(dataset, strategy, 0, options, path)
    built_s = first.get("image_cache_build_s", 0.0) + first.get("feature_build_s", 0.0)
    cell = our_cell(dataset, strategy, 1, options, path) if built_s > 0 else first
    return first, cell


def cell_row(
    dataset: str,
    strategy: str,
    path: str,
    cells: tuple[dict, dict],
    reference: dict[str, float],
    limit: Limit,
    options: BenchOptions,
) -> dict:
    """The bench's row of one cell (`cells`: the first and the measured one) against the
    study's loop (`reference`) and the compute-only limit."""
    first, cell = cells
    study_s = reference["epoch_s"] * options.epochs
    cell_s = cell["wall_time_s"]
    return {
        "dataset": dataset,
        "strategy": strategy,
        "path": path,
        "precision": cell["precision"],
        "channels_last": cell["channels_last"],
        "input": cell["input"],
        "epochs": options.epochs,
        "cell_s": cell_s,
        "process_s": cell["process_s"],
        "first_cell_s": first["wall_time_s"],
        "image_cache_build_s": first.get("image_cache_build_s", 0.0),
        "feature_build_s": first.get("feature_build_s", 0.0),
        "train_img_s": cell["train_images_per_s"],
        "peak_rss_mb": cell["peak_rss_mb"],
        "peak_gpu_mem_mb": cell.get("peak_gpu_mem_mb"),
        "device": options.device_name,
        "test_acc": cell["test_acc"],
        "first_cell_test_acc": first["test_acc"],
        "study_s": study_s,
        "study_epochs_timed": options.study_epochs,
        "study_max_val_acc": reference["max_val_acc"],
        "study_peak_rss_mb": reference["peak_rss_mb"],
        "forward_img_s": limit.forward_img_s,
        "train_step_img_s": limit.train_step_img_s,
        "compute_floor_s": limit.floors[strategy],
        "one_forward_pass_s": limit.one_pass_s,
        "speedup_vs_study": study_s / cell_s,
        "ratio_to_floor": cell_s / limit.floors[strategy],
    }


def add_freeze_vs_finetune(rows: list[dict], paths: Sequence[str]) -> None:
    """On each path with both strategies, how much longer finetune takes than freeze, ours and
    the study's, added to both rows."""
    for path in paths:
        freeze, finetune = (
            next((r for r in rows if r["strategy"] == s and r["path"] == path), None)
            for s in ("freeze", "finetune")
        )
        if freeze and finetune:
            for row in (freeze, finetune):
                row["freeze_vs_finetune"] = finetune["cell_s"] / freeze["cell_s"]
                row["study_freeze_vs_finetune"] = finetune["study_s"] / freeze["study_s"]


def bench_dataset(dataset: str, options: BenchOptions) -> list[dict]:
    """Every path and strategy of the bench on `dataset`: a row each, said as it is measured."""
    split = split_sizes(dataset, options)
    sizes = (split["train"], split["val"], split["test"])
    rows = []
    references: dict[str, dict[str, float]] = {}
    for path in options.paths:
        limit = path_limit(dataset, path, sizes, options)
        # freeze first: its first cell builds the image cache and the features (timed apart).
        for strategy in [s for s in ("freeze", "finetune") if s in options.strategies]:
            cells = measured_cells(dataset, strategy, path, options)
            if strategy not in references:  # the study's loop does not change with our path
                references[strategy] = study(dataset, strategy, options)
            row = cell_row(dataset, strategy, path, cells, references[strategy], limit, options)
            rows.append(row)
            print(json.dumps(row), flush=True)
    add_freeze_vs_finetune(rows, options.paths)
    return rows


def tuned_vs_untuned(options: BenchOptions) -> list[dict]:
    """What tune=fair costs, per strategy of --tune-strategies: the cell tuned (its budget of
    trial-epochs, trials pruned by successive halving) against the same cell untuned, both on
    the image and feature caches already built (a first cell builds them), over --tune-epochs
    epochs (and --tune-train-batches of each epoch)."""
    dataset = options.datasets[0]
    small = (
        f"trainer.max_epochs={options.tune_epochs}",
        f"trainer.limit_train_batches={options.tune_train_batches}",
    )
    our_cell(dataset, "finetune", 1, options, extra=small, label="-warm")  # builds the caches
    rows = []
    for strategy in options.tune_strategies:
        untuned = our_cell(dataset, strategy, 0, options, extra=small, label="-untuned")
        tuned = our_cell(dataset, strategy, 0, options, extra=(*small, "tune=fair"), label="-tuned")
        rows.append(
            {
                "dataset": dataset,
                "strategy": strategy,
                "epochs": options.tune_epochs,
                "train_batches": options.tune_train_batches,
                "untuned_s": untuned["wall_time_s"],
                "tuned_s": tuned["wall_time_s"],
                "tune_s": tuned["tune_s"],
                "trials_completed": tuned["tune_trials_completed"],
                "trials_pruned": tuned["tune_trials_pruned"],
                "trial_epochs_budget": tuned["tune_budget_epochs"],
                "trial_epochs_run": tuned["tune_epochs_run"],
                "tuned_vs_untuned": tuned["wall_time_s"] / untuned["wall_time_s"],
            }
        )
    return rows


def fast_vs_fp32(rows: list[dict]) -> list[dict]:
    """Per dataset and strategy, how much faster the fast path is than float32, and the two
    test accuracies (each the mean of the path's two cells: seeds 0 and 1)."""
    table = pd.DataFrame(rows)
    if not {"fast", "fp32"} <= set(table.path):
        return []
    ratios = []
    for (dataset, strategy), group in table.groupby(["dataset", "strategy"], sort=False):
        fast, fp32 = (group[group.path == p].iloc[0] for p in ("fast", "fp32"))
        ratio = {
            "dataset": dataset,
            "strategy": strategy,
            "warm_cell_speedup": fp32.cell_s / fast.cell_s,
            "forward_speedup": fast.forward_img_s / fp32.forward_img_s,
            "train_step_speedup": fast.train_step_img_s / fp32.train_step_img_s,
            "fp32_test_acc": (fp32.test_acc + fp32.first_cell_test_acc) / 2,
            "fast_test_acc": (fast.test_acc + fast.first_cell_test_acc) / 2,
        }
        if fp32.feature_build_s > 0 and fast.feature_build_s > 0:
            # the cold freeze cell's own work: extracting every image's features
            ratio["feature_extraction_speedup"] = fp32.feature_build_s / fast.feature_build_s
        ratios.append(ratio)
    return ratios


# ---------------------------------------------------------------- the command


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the tuned-vs-untuned cells."""
    parser.add_argument(
        "--tune-epochs",
        type=int,
        default=10,
        help="epochs of the tuned-vs-untuned cells (tune=fair's budget: 2x; 0: skip them)",
    )
    parser.add_argument(
        "--tune-strategies",
        default="finetune,lp_ft,freeze",
        help="the strategies whose tuned cell is timed against their untuned one",
    )
    parser.add_argument(
        "--tune-train-batches",
        type=float,
        default=1.0,
        help="share of each epoch's training batches there (1.0: the grid's cells)",
    )
    parser.add_argument(
        "--tune-only", action="store_true", help="measure the tuned-vs-untuned cost alone"
    )


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (the study loop's own, for its process, hidden)."""
    parser = argparse.ArgumentParser(prog="python -m benchmark.tools.bench", description=__doc__)
    parser.add_argument("--datasets", default="hymenoptera,dogs_vs_cats")
    parser.add_argument("--strategies", default="finetune,freeze")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--reference-epochs",
        type=int,
        default=None,
        help="time the study's loop over this many epochs and scale to --epochs (default: all)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compute-steps", type=int, default=5)
    parser.add_argument(
        "--paths",
        default="fp32,fast",
        help="our cells' paths to compare: fp32 (float32, default memory format) and fast "
        "(the default: channels-last, bf16 autocast where native)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where cells, the study's loop and the compute limit run (auto: cuda if there is one)",
    )
    add_tune_arguments(parser)
    parser.add_argument("--json", help="also write the final JSON object to this file")
    parser.add_argument("--data-root", default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--work", default=None, help="runs and store; default: temporary")
    # the study's loop, in its own process
    parser.add_argument("--study-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser


def print_tuning(tuning: list[dict]) -> None:
    """One line per tuned-vs-untuned strategy."""
    for row in tuning:
        print(
            f"tune=fair {row['strategy']} ({row['epochs']} epochs): {row['tuned_s']:.1f}s "
            f"tuned, {row['untuned_s']:.1f}s untuned: ratio {row['tuned_vs_untuned']:.2f} "
            f"({row['trials_completed']:.0f} trials completed, {row['trials_pruned']:.0f} "
            f"pruned; {row['trial_epochs_run']:.0f} of {row['trial_epochs_budget']:.0f} "
            "trial-epochs)"
        )


# The bench table's columns, in order (then freeze vs finetune, where measured).
SHOWN = [
    "dataset",
    "strategy",
    "path",
    "precision",
    "input",
    "cell_s",
    "first_cell_s",
    "image_cache_build_s",
    "feature_build_s",
    "train_img_s",
    "peak_rss_mb",
    "test_acc",
    "study_s",
    "compute_floor_s",
    "speedup_vs_study",
    "ratio_to_floor",
]


def print_table(rows: list[dict]) -> None:
    """The bench's table: a row per dataset, strategy and path."""
    table = pd.DataFrame(rows)
    shown = SHOWN + [c for c in ("freeze_vs_finetune", "study_freeze_vs_finetune") if c in table]
    print(table[shown].round(3).to_string(index=False))


def write_figures(figures: dict, json_file: str | None) -> None:
    """Every figure as one JSON line, printed and, with --json, written to that file."""
    line = json.dumps(figures)
    print(line)
    if json_file:
        Path(json_file).parent.mkdir(parents=True, exist_ok=True)
        Path(json_file).write_text(line + "\n")


def bench(options: BenchOptions) -> int:
    """The bench: the tuned-vs-untuned cells, then (unless --tune-only) each dataset's cells
    against the study's loop and the compute limit; its tables and figures said."""
    print(
        f"bench: {options.backbone}, {options.epochs} epochs, batch {options.batch_size}, "
        f"{options.workers} loader workers, {torch.get_num_threads()} torch threads, "
        f"on {options.device_name}; in {options.work}"
    )
    tuning = tuned_vs_untuned(options) if options.tune_epochs else None
    print_tuning(tuning or [])
    if options.tune_only:
        write_figures({"tuned_vs_untuned": tuning}, options.json_file)
        return 0
    rows = [row for d in options.datasets for row in bench_dataset(d, options)]
    print_table(rows)
    ratios = fast_vs_fp32(rows)
    if ratios:
        print("fast path vs float32:")
        print(pd.DataFrame(ratios).round(3).to_string(index=False))
    write_figures(
        {"bench": rows, "fast_vs_fp32": ratios, "tuned_vs_untuned": tuning}, options.json_file
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmark.tools.bench`: the bench, or (`--study-loop`) the study's loop alone,
    its figures written to --out."""
    args = build_parser().parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.study_loop:
        figures = study_loop(StudyLoopOptions.from_args(args, device))
        Path(args.out).write_text(json.dumps(figures))
        return 0
    return bench(BenchOptions.from_args(args, device))


if __name__ == "__main__":
    sys.exit(main())
