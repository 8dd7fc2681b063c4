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


def on_device(layer, device: torch.device):
    """``layer`` (a canonical layer dataclass) with its tensors on ``device``; the same object where they are there
    already (CPU runs: no copy, the bytes of a single run unchanged)."""
    import dataclasses

    moved = {f.name: v.to(device) for f in dataclasses.fields(layer)
             if isinstance(v := getattr(layer, f.name), torch.Tensor) and v.device != device}
    return dataclasses.replace(layer, **moved) if moved else layer
