"""Looking at the data before training, with the same overrides as `python -m benchmark`:

- `python -m benchmark.tools.data stats dataset=NAME ...`: what a run would train and test on
  (images per class and split, as the study printed them) and every file left out, with the reason.
- `python -m benchmark.tools.data preview dataset=NAME augment=POLICY ... [--out FILE]`: a grid of
  augmented training images, as the backbone will see them (before normalisation).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torchvision.utils import make_grid, save_image

from benchmark.config.schema import register_configs
from benchmark.config.spec import CellSpec, from_config
from benchmark.data.loading import build_augmentation, build_transform, load_rgb
from benchmark.data.manifest import Manifest, build_manifest
from benchmark.data.scan import DatasetError
from benchmark.models.backbones import create_backbone

CONF = Path(__file__).resolve().parents[2] / "conf"
USAGE = (
    "usage: python -m benchmark.tools.data stats [key=value ...]\n"
    "       python -m benchmark.tools.data preview [key=value ...] [--out FILE] [--images N]"
)


def compose_config(overrides: list[str]) -> CellSpec:
    """The cell these overrides describe (the boundary: typed from here on)."""
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "outputs/data"  # no Hydra run folder: nothing is written there
    return from_config(cfg)


def manifest_for(spec: CellSpec) -> Manifest:
    return build_manifest(spec.dataset, Path(spec.paths.data_root), spec.seed, spec.cache_dir)


def stats(overrides: list[str]) -> int:
    cfg = compose_config(overrides)
    try:
        manifest = manifest_for(cfg)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{cfg.dataset.name}: {len(manifest.frame)} images, {len(manifest.classes)} classes, "
        f"from {manifest.root}"
    )
    print(f"manifest sha256 {manifest.sha256}\n")
    print(manifest.counts().to_string())
    print(f"\n{len(manifest.skipped)} file(s) left out")
    if len(manifest.skipped):
        print(manifest.skipped.to_string(index=False))
    return 0


def preview(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.tools.data preview")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args(argv)
    cfg = compose_config(args.overrides)
    try:
        manifest = manifest_for(cfg)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    made = create_backbone(cfg.backbone.name, cfg.backbone.weights_path, model=cfg.backbone.model)
    preprocess = made.preprocess
    augmentation = build_augmentation(cfg.augment.transforms, preprocess)
    transform = build_transform(preprocess, cfg.colour.grayscale, augmentation)
    train = manifest.frame[manifest.frame.split == "train"]
    rows = train.sample(n=min(args.images, len(train)), random_state=cfg.seed)
    mean = torch.tensor(preprocess.mean).view(3, 1, 1)
    std = torch.tensor(preprocess.std).view(3, 1, 1)
    images = [transform(load_rgb(path)) * std + mean for path in rows.path]
    out = args.out or Path("results") / f"preview-{cfg.dataset.name}-{cfg.augment.name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(images, nrow=int(len(images) ** 0.5 + 0.999), padding=4), out)
    print(
        f"wrote {out}: {len(images)} training images of {cfg.dataset.name} with "
        f"augment={cfg.augment.name}, as {cfg.backbone.name} sees them"
    )
    return 0


def main(argv: list[str]) -> int:
    commands = {"stats": stats, "preview": preview}
    if not argv or argv[0] not in commands:
        print(USAGE, file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
