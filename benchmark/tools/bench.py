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
from benchmark.models.backbones import create_backbone
from benchmark.models.precision import native_bf16

DEFAULT_DATA = os.environ.get("BENCHMARK_DATA_ROOT", "data")


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


def study_loop(args: argparse.Namespace) -> dict[str, float]:
    """The study's training loop (Resize 256, random-resized crop, flip; SGD lr 0.001 momentum
    0.9, StepLR 10/0.1; BatchNorm left in training mode under freeze), timed per epoch."""
    manifest = build_manifest(
        DatasetConfig(name=args.dataset), Path(args.data_root), 0, Path(args.cache_dir)
    ).frame
    made = create_backbone(args.backbone)
    p = made.preprocess
    normalize = T.Normalize(p.mean, p.std)
    resize = int(p.input_size / p.crop_pct)
    train_tf = T.Compose(
        [
            T.Resize(resize),
            T.RandomResizedCrop(p.input_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(p.input_size), T.ToTensor(), normalize])
    classes = sorted(manifest.label.unique())

    def loader(split: str, transform: T.Compose, shuffle: bool) -> DataLoader:
        rows = manifest[manifest.split == split]
        targets = [classes.index(label) for label in rows.label]
        dataset = StudyFolder(rows.path.tolist(), targets, transform)
        return DataLoader(dataset, args.batch_size, shuffle=shuffle, num_workers=args.workers)

    train, val = loader("train", train_tf, True), loader("val", val_tf, False)
    device = torch.device(args.device)
    model = nn.Sequential(made.model, nn.Linear(made.num_features, len(classes))).to(device)
    if args.strategy == "freeze":
        for parameter in made.model.parameters():
            parameter.requires_grad = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.001, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.1)
    best, seconds = 0.0, []
    for _ in range(args.epochs):
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
    args: argparse.Namespace,
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
        f"backbone={args.backbone}",
        f"seed={seed}",
        f"trainer.max_epochs={args.epochs}",
        "trainer.enable_progress_bar=false",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}",
        f"paths.data_root={args.data_root}",
        f"paths.cache_dir={args.cache_dir}",
        f"tracking.uri={args.tracking_uri}",
        f"hydra.run.dir={args.work}/runs/{dataset}-{strategy}-{seed}-{path}{label}",
        "rerun=true",
        # bf16 and channels-last on a GPU, as users run a GPU cell; the CPU otherwise.
        "trainer=gpu" if args.device == "cuda" else "trainer.accelerator=cpu",
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
    mlflow.set_tracking_uri(args.tracking_uri)
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


def split_sizes(dataset: str, args: argparse.Namespace) -> dict[str, int]:
    manifest = build_manifest(
        DatasetConfig(name=dataset), Path(args.data_root), 0, Path(args.cache_dir)
    ).frame
    return manifest.split.value_counts().to_dict()


# ---------------------------------------------------------------- the bench


def study(dataset: str, strategy: str, args: argparse.Namespace) -> dict[str, float]:
    """The study's loop in a fresh process (its own peak memory), for `reference_epochs`."""
    out = Path(args.work) / f"study-{dataset}-{strategy}.json"
    command = [
        sys.executable,
        "-m",
        "benchmark.tools.bench",
        "--study-loop",
        f"--dataset={dataset}",
        f"--strategy={strategy}",
        f"--epochs={args.reference_epochs or args.epochs}",
        f"--backbone={args.backbone}",
        f"--batch-size={args.batch_size}",
        f"--workers={args.workers}",
        f"--data-root={args.data_root}",
        f"--cache-dir={args.cache_dir}",
        f"--device={args.device}",
        f"--out={out}",
    ]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def bench_dataset(dataset: str, args: argparse.Namespace) -> list[dict]:
    sizes = split_sizes(dataset, args)
    n_train, n_val, n_test = sizes["train"], sizes["val"], sizes["test"]
    device = torch.device(args.device)
    rows = []
    references: dict[str, dict[str, float]] = {}
    for path in args.paths:
        limit = compute_limit(
            args.backbone, 2, args.batch_size, args.compute_steps, device, path == "fast"
        )
        forward, train_step = limit["forward_img_s"], limit["train_step_img_s"]
        one_pass_s = (n_train + n_val + n_test) / forward
        floors = {
            # Every epoch trains on the training split and evaluates the validation split.
            "finetune": args.epochs * (n_train / train_step + n_val / forward) + n_test / forward,
            # The frozen backbone's features: one forward pass over every image.
            "freeze": one_pass_s,
        }
        print(
            f"{dataset} ({path}): {n_train}/{n_val}/{n_test} images; forward {forward:.1f} "
            f"img/s, train step {train_step:.1f} img/s; one forward pass {one_pass_s:.1f}s",
            flush=True,
        )
        # freeze first: its first cell builds the image cache and the features (timed apart).
        for strategy in [s for s in ("freeze", "finetune") if s in args.strategies]:
            first = our_cell(dataset, strategy, 0, args, path)
            built_s = first.get("image_cache_build_s", 0.0) + first.get("feature_build_s", 0.0)
            # A cell that built a cache is measured again (another seed) on the warm cache; a
            # long one that found them warm already is measured once.
            cell = our_cell(dataset, strategy, 1, args, path) if built_s > 0 else first
            if strategy not in references:  # the study's loop does not change with our path
                references[strategy] = study(dataset, strategy, args)
            reference = references[strategy]
            study_s = reference["epoch_s"] * args.epochs
            cell_s = cell["wall_time_s"]
            row = {
                "dataset": dataset,
                "strategy": strategy,
                "path": path,
                "precision": cell["precision"],
                "channels_last": cell["channels_last"],
                "input": cell["input"],
                "epochs": args.epochs,
                "cell_s": cell_s,
                "process_s": cell["process_s"],
                "first_cell_s": first["wall_time_s"],
                "image_cache_build_s": first.get("image_cache_build_s", 0.0),
                "feature_build_s": first.get("feature_build_s", 0.0),
                "train_img_s": cell["train_images_per_s"],
                "peak_rss_mb": cell["peak_rss_mb"],
                "peak_gpu_mem_mb": cell.get("peak_gpu_mem_mb"),
                "device": args.device_name,
                "test_acc": cell["test_acc"],
                "first_cell_test_acc": first["test_acc"],
                "study_s": study_s,
                "study_epochs_timed": args.reference_epochs or args.epochs,
                "study_max_val_acc": reference["max_val_acc"],
                "study_peak_rss_mb": reference["peak_rss_mb"],
                "forward_img_s": forward,
                "train_step_img_s": train_step,
                "compute_floor_s": floors[strategy],
                "one_forward_pass_s": one_pass_s,
                "speedup_vs_study": study_s / cell_s,
                "ratio_to_floor": cell_s / floors[strategy],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    for path in args.paths:
        freeze, finetune = (
            next((r for r in rows if r["strategy"] == s and r["path"] == path), None)
            for s in ("freeze", "finetune")
        )
        if freeze and finetune:
            for row in (freeze, finetune):
                row["freeze_vs_finetune"] = finetune["cell_s"] / freeze["cell_s"]
                row["study_freeze_vs_finetune"] = finetune["study_s"] / freeze["study_s"]
    return rows


def tuned_vs_untuned(args: argparse.Namespace) -> list[dict]:
    """What tune=fair costs, per strategy of --tune-strategies: the cell tuned (its budget of
    trial-epochs, trials pruned by successive halving) against the same cell untuned, both on
    the image and feature caches already built (a first cell builds them), over --tune-epochs
    epochs (and --tune-train-batches of each epoch)."""
    dataset = args.datasets.split(",")[0]
    small = (
        f"trainer.max_epochs={args.tune_epochs}",
        f"trainer.limit_train_batches={args.tune_train_batches}",
    )
    our_cell(dataset, "finetune", 1, args, extra=small, label="-warm")  # builds the caches
    rows = []
    for strategy in args.tune_strategies.split(","):
        untuned = our_cell(dataset, strategy, 0, args, extra=small, label="-untuned")
        tuned = our_cell(dataset, strategy, 0, args, extra=(*small, "tune=fair"), label="-tuned")
        rows.append(
            {
                "dataset": dataset,
                "strategy": strategy,
                "epochs": args.tune_epochs,
                "train_batches": args.tune_train_batches,
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


def main(argv: list[str] | None = None) -> int:
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
    parser.add_argument(
        "--tune-epochs",
        type=int,
        default=10,
        help="epochs of the tuned-vs-untuned cells (tune=fair's budget: 1.8x; 0: skip them)",
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
    parser.add_argument("--json", help="also write the final JSON object to this file")
    parser.add_argument("--data-root", default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--work", default=None, help="runs and store; default: temporary")
    # the study's loop, in its own process
    parser.add_argument("--study-loop", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.study_loop:
        Path(args.out).write_text(json.dumps(study_loop(args)))
        return 0
    args.device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    args.work = args.work or tempfile.mkdtemp(prefix="bench-")
    args.cache_dir = args.cache_dir or str(Path(args.work) / "cache")
    args.tracking_uri = f"sqlite:///{Path(args.work).resolve() / 'mlflow.db'}"
    args.strategies = args.strategies.split(",")
    args.paths = args.paths.split(",")
    print(
        f"bench: {args.backbone}, {args.epochs} epochs, batch {args.batch_size}, "
        f"{args.workers} loader workers, {torch.get_num_threads()} torch threads, "
        f"on {args.device_name}; in {args.work}"
    )
    tuning = tuned_vs_untuned(args) if args.tune_epochs else None
    for row in tuning or []:
        print(
            f"tune=fair {row['strategy']} ({row['epochs']} epochs): {row['tuned_s']:.1f}s "
            f"tuned, {row['untuned_s']:.1f}s untuned: ratio {row['tuned_vs_untuned']:.2f} "
            f"({row['trials_completed']:.0f} trials completed, {row['trials_pruned']:.0f} "
            f"pruned; {row['trial_epochs_run']:.0f} of {row['trial_epochs_budget']:.0f} "
            "trial-epochs)"
        )
    if args.tune_only:
        figures = json.dumps({"tuned_vs_untuned": tuning})
        print(figures)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(figures + "\n")
        return 0
    rows = [row for d in args.datasets.split(",") for row in bench_dataset(d, args)]
    table = pd.DataFrame(rows)
    shown = [
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
    shown += [c for c in ("freeze_vs_finetune", "study_freeze_vs_finetune") if c in table]
    print(table[shown].round(3).to_string(index=False))
    ratios = fast_vs_fp32(rows)
    if ratios:
        print("fast path vs float32:")
        print(pd.DataFrame(ratios).round(3).to_string(index=False))
    figures = json.dumps({"bench": rows, "fast_vs_fp32": ratios, "tuned_vs_untuned": tuning})
    print(figures)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(figures + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
