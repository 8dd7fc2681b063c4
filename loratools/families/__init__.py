"""Model families as data: how each family's modules are named in every convention.

A family describes, once, the canonical (diffusers / HF) module path of every adaptable module and its
name in the original single-file checkpoint, in kohya's two stem styles and in ComfyUI, with the row
slices of fused projections. Maps are generated from the family's structure, never typed out.

Registry: ``FAMILIES`` (name → family object with ``naming(keys=None)`` and ``detect(keys)``),
``get_family(name)``, ``detect_family(keys)``. Leaf package: imports nothing from ``loratools.formats``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import sd
from .base import LAYOUTS, ModuleMap

FAMILIES: dict[str, sd.SDFamily] = dict(sd.SD_FAMILIES)


def get_family(name: str) -> sd.SDFamily:
    """The registered family called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """``(family, layout)`` of a checkpoint key set, layout one of ``LAYOUTS``; None if no family fits."""
    return sd.detect(keys)


def naming_for(family: str, keys: Iterable[str] | Mapping[str, Any] | None = None):
    """Name maps of ``family`` (its default structure, or the structure of a checkpoint's keys)."""
    return get_family(family).naming(keys)


def pipeline_naming(family: str, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str] = ()):
    """Name maps of ``family`` in the structure of a diffusers pipeline folder (its components' configs)."""
    fam = get_family(family)
    return sd.SDNaming(fam, sd.structure_from_pipeline(family, configs, keys))


def detect_adapter(names: Iterable[str]) -> tuple[str, str] | None:
    """``(family, convention)`` of an adapter's module names or keys, or None if no family knows them."""
    return sd.detect_adapter(names)


__all__ = ["FAMILIES", "LAYOUTS", "detect_adapter", "naming_for", "pipeline_naming", "ModuleMap", "detect_family", "get_family", "sd"]
