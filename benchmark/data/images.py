"""What a backbone sees, before any tensor: its preprocessing, and any image file as upright RGB.

A leaf module (Pillow and NumPy only): the data loaders, the decoded-image cache and the backbone
registry all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps


@dataclass(frozen=True)
class Preprocess:
    """The input a backbone was trained on; it belongs to the backbone, never to the dataset."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode becomes RGB: 16-bit scaled (not clipped) to 8 bits, transparency composited on
    white (not on whatever colour hides under alpha 0), palette and CMYK converted."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        pixels = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or pixels.max() > 255 else 255.0
        image = Image.fromarray(np.round(pixels / peak * 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, image)
    return image.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """An upright (EXIF orientation applied) RGB image."""
    with Image.open(path) as image:
        return to_rgb(ImageOps.exif_transpose(image))
