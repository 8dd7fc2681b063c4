"""Where the math runs: ``--device auto|cpu|cuda[:N]``."""

from __future__ import annotations

import torch

from loratools.errors import LoraToolsError


def resolve_device(device: str) -> torch.device:
    """``auto`` → cuda when available, else cpu; an unknown name or an unavailable cuda is an error. Under torchrun
    ``cuda`` is each rank's own GPU, ``cuda:LOCAL_RANK``."""
    from loratools.distributed import device_name

    if device == "auto":
        return torch.device(device_name("cuda") if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise LoraToolsError(f"unknown device {device!r}; expected auto, cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoraToolsError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    try:
        return torch.device(device_name(device))
    except RuntimeError:
        raise LoraToolsError(f"unknown device {device!r}; expected auto, cpu or cuda") from None
