"""loratools: extract, resize, merge, convert and inspect LoRA adapters.

The public API is small: read an adapter (:func:`load_adapter`), operate on its canonical layers
(:mod:`loratools.linalg`, :mod:`loratools.stats`), write it back (:func:`save_adapter`).
"""

from loratools.adapter import Adapter, FullLayer, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats import load_adapter, save_adapter

__all__ = ["Adapter", "FullLayer", "Layer", "LoraLayer", "LoraToolsError", "load_adapter", "save_adapter"]
__version__ = "0.1.0"
