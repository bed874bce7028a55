"""Weak spots a new user hits on day one (issue 23): each ends in one clear line, or is handled."""

from __future__ import annotations

from benchmark.data import scan_class_folders
from tests.test_faults import folder_of


def test_macos_archive_debris_beside_the_class_folders_is_skipped(tmp_path, shared_data):
    root = folder_of(tmp_path, shared_data, count=3)
    debris = root / "__MACOSX"
    for name in ("ants", "bees"):
        (debris / name).mkdir(parents=True)
        (debris / name / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    scan = scan_class_folders(root)
    assert sorted(scan.images.label.unique()) == ["ants", "bees"]
    reason = scan.skipped.reason[scan.skipped.path == str(debris)]
    assert len(reason) == 1 and "macOS" in reason.item()
