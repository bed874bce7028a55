"""`python -m benchmark.data stats dataset=NAME [key=value ...]`: what a run would train and test
on — images per class and split, as the study printed them — and every file left out, with why.
Takes the same overrides as `python -m benchmark`."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from benchmark.config import register_configs
from benchmark.data.manifest import build_manifest
from benchmark.data.scan import DatasetError

CONF = Path(__file__).resolve().parents[2] / "conf"
USAGE = "usage: python -m benchmark.data stats [dataset=NAME] [key=value ...]"


def stats(overrides: list[str]) -> int:
    register_configs()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    try:
        manifest = build_manifest(
            cfg.dataset, Path(cfg.paths.data_root), cfg.seed, Path(cfg.paths.cache_dir)
        )
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


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "stats":
        print(USAGE, file=sys.stderr)
        return 2
    return stats(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
