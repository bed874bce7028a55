"""Datasets as split manifests: sources (each dataset's official layout) -> scan (file checks) ->
manifest (splits). Light to import (pandas, Pillow); the loaders that feed a backbone are in
`benchmark.data.loading` (torch, Lightning) and the decoded-image cache in `benchmark.data.cache`.
"""

from benchmark.data.manifest import Manifest, assign_splits, build_manifest
from benchmark.data.scan import DatasetError, Scan, scan_class_folders, unusable_reason
from benchmark.data.sources import PREPARERS, Source, register_dataset

__all__ = [
    "PREPARERS",
    "DatasetError",
    "Manifest",
    "Scan",
    "Source",
    "assign_splits",
    "build_manifest",
    "register_dataset",
    "scan_class_folders",
    "unusable_reason",
]
