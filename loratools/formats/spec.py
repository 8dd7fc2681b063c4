"""The one interface every adapter format implements (DESIGN.md §8), and the options a writer takes.

A format module defines ``FORMAT = AdapterFormat(...)`` and is listed once in :mod:`loratools.formats`'s registry;
the rest of loratools asks the registry (``get_format(name).folder``, ``.refuse(name, layer)``, ``.dora``) and never
tests a format's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer


@dataclass(frozen=True)
class WriteOptions:
    """What a writer may be asked besides the adapter and the output path.

    ``component`` is the pipeline component (``unet``, ``transformer``…) of layers whose names carry none (default:
    guessed from the module paths); with ``force_component`` it re-homes every layer (the user's ``--component``).
    ``kohya_prefix`` replaces the prefix of component-less kohya stems.
    """

    dtype: torch.dtype | None = None
    kohya_prefix: str | None = None
    component: str | None = None
    force_component: bool = False
    #: kohya stem style for model families that have two (SD UNet): "diffusers" (``lora_unet_down_blocks_…``, the
    #: default: ComfyUI, A1111/Forge and diffusers all load it) or "original" (``lora_unet_input_blocks_…``); None
    #: keeps each layer's source stem where it has one
    kohya_style: str | None = None
    #: the base model the adapter is for (the user's ``--base``), for formats whose files name the base's own tensors
    #: (GGUF: architecture, tensor names and the q/k row order come from its ``config.json``); None if not given
    base: Path | None = None


def no_refusal(name: str, layer: Layer) -> str | None:
    return None


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format.

    * ``claims(key)``: whether a tensor key of a single file belongs to this format (detection counts the keys each
      format claims; a file whose keys no one format claims is an error naming a key). Folder formats set ``detect``.
    * ``read(path) -> Adapter`` for a file or folder already detected (or named) as this format; ``write(adapter,
      out, force, options)`` writes atomically; a read-only format has no ``write`` and names in ``writes_as`` the
      format that writes its layers (LyCORIS files are kohya-layout files).
    * ``refuse(name, layer)``: why this format cannot hold a layer (None if it can), asked before any work.
    * ``dora``: the DoRA convention it stores (:data:`loratools.dora.PEFT` / ``LYCORIS``), None if it cannot hold
      DoRA; ``dora_all_or_none`` names the adapter-wide DoRA switch where DoRA is all or nothing
      (PEFT's ``use_dora``).
    * ``folder``: written as a folder (else one file named ``*<suffix>``, ``.safetensors`` by default); ``priority``
      breaks ties in detection (higher wins) where two formats claim every key of a file. ``detect`` may also
      recognise a file by its signature (GGUF's magic).
    * ``check_base(path | None)``: formats that need the base model to write (GGUF) check the user's ``--base``
      here, before any work (None: no ``--base`` given), and raise a one-line error; None where no base is needed.
    * ``fused_layers(adapter, options)``: the layers as this format's file holds them where that differs from the
      canonical split modules (DiT fused projections in sd-scripts / ComfyUI names: see :mod:`loratools.formats.fused`),
      with notes for the report; None where the layers are written as they are.
    * ``plain_lora_metadata(metadata, layers)``: the source metadata once ``convert`` made every layer plain LoRA
      (LyCORIS rewrites its network module and algo); None keeps it as it is.
    """

    name: str
    summary: str
    folder: bool
    read: Callable[[Path], Adapter] | None
    write: Callable[[Adapter, Path, bool, WriteOptions], None] | None = None
    claims: Callable[[str], bool] | None = None
    detect: Callable[[Path], bool] | None = None
    refuse: Callable[[str, Layer], str | None] = no_refusal
    dora: str | None = None
    dora_all_or_none: str | None = None
    writes_as: str | None = None
    priority: int = 0
    plain_lora_metadata: Callable[[dict[str, str], dict[str, Layer]], dict[str, str]] | None = None
    suffix: str = ".safetensors"
    check_base: Callable[[Path | None], None] | None = None
    fused_layers: Callable[[Adapter, WriteOptions], tuple[dict[str, Layer], list[str]] | None] | None = None
