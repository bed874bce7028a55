"""`trainer.precision=auto` (the default): bf16 autocast where the cell's device computes bf16
natively, float32 elsewhere.

The CPU path counts as native when the processor has AVX512-BF16 or AMX tiles (AMD Zen 4+, Intel
Cooper Lake, Sapphire Rapids and later); a GPU when CUDA reports bf16 without emulation (Ampere
and later). Autocast keeps the weights, the optimizer and the loss in float32, so only the
convolutions and matrix products run in bf16 (on this project's 2-core EPYC: Lite0 forward 1.5x,
train step 1.2-1.35x on top of channels-last; see `make bench`).

`resolve` puts the concrete value into the cell before the cell's key is computed, so the key,
the run's params (`trainer.precision`) and the feature cache all name what actually ran; any
explicit `trainer.precision` (e.g. `32-true`) is kept as it is.
"""

from __future__ import annotations

from enum import Enum

import torch

from benchmark.config.spec import CellSpec

AUTO = "auto"


class Precision(str, Enum):
    """The two precisions `auto` chooses between (Lightning's names)."""

    fast = "bf16-mixed"
    fp32 = "32-true"


def device_type(accelerator: str) -> str:
    """The device a Lightning `accelerator` value puts the cell on."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu" if accelerator in ("auto", "cpu") else str(accelerator)


def native_bf16(device: str) -> bool:
    """Whether `device` ("cpu", "cuda") multiplies bf16 in hardware rather than emulating it."""
    if device == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "cpu":
        cpu = torch.cpu  # oneDNN's own capability probes
        return any(
            bool(getattr(cpu, probe, lambda: False)())
            for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        )
    return False


def choose(accelerator: str) -> Precision:
    """What `auto` means for a cell on `accelerator`."""
    return Precision.fast if native_bf16(device_type(accelerator)) else Precision.fp32


def resolve(spec: CellSpec) -> CellSpec:
    """The cell with `trainer.precision=auto` replaced by the concrete precision (see the
    module); any other precision is kept."""
    if str(spec.trainer.get("precision", AUTO)) != AUTO:
        return spec
    return spec.with_trainer(precision=choose(str(spec.trainer.get("accelerator", "auto"))).value)
