"""loratools: extract, resize, merge, convert and inspect LoRA adapters.

The public API is small: read an adapter (:func:`load_adapter`), operate on its canonical layers
(:mod:`loratools.linalg`, :mod:`loratools.stats`), write it back (:func:`save_adapter`).

The public names are imported on first use (PEP 562 ``__getattr__``) so that ``import loratools``,
and with it ``loratools --help``, does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from loratools.errors import LoraToolsError

if TYPE_CHECKING:
    from loratools.adapter import Adapter, FullLayer, Layer, LoraLayer
    from loratools.formats import load_adapter, save_adapter

_LAZY = {
    "Adapter": "loratools.adapter", "FullLayer": "loratools.adapter", "Layer": "loratools.adapter",
    "LoraLayer": "loratools.adapter", "load_adapter": "loratools.formats", "save_adapter": "loratools.formats",
}

__all__ = ["Adapter", "FullLayer", "Layer", "LoraLayer", "LoraToolsError", "load_adapter", "save_adapter"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loratools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
