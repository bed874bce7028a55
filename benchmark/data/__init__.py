"""Datasets as split manifests (sources -> scan -> manifest), and loaders that feed a backbone."""

from benchmark.data.loading import (
    ImageDataset,
    ManifestDataModule,
    Preprocess,
    build_augmentation,
    build_transform,
    load_rgb,
    to_rgb,
)
from benchmark.data.manifest import Manifest, assign_splits, build_manifest
from benchmark.data.scan import DatasetError, Scan, scan_class_folders, unusable_reason
from benchmark.data.sources import PREPARERS, Source, register_dataset

__all__ = [
    "PREPARERS",
    "DatasetError",
    "ImageDataset",
    "Manifest",
    "ManifestDataModule",
    "Preprocess",
    "Scan",
    "Source",
    "assign_splits",
    "build_augmentation",
    "build_manifest",
    "build_transform",
    "load_rgb",
    "register_dataset",
    "scan_class_folders",
    "to_rgb",
    "unusable_reason",
]
