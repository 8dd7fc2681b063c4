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

from . import flux, sd
from .base import LAYOUTS, ModuleMap

#: the families loratools resolves adapters and checkpoints with (every format knows their conventions): the Stable
#: Diffusion UNets and the Flux.1 transformers (fused projections split on reading, fused again by fused conventions)
FAMILIES: dict[str, Any] = {**sd.SD_FAMILIES, **flux.FLUX_FAMILIES}
#: every described family (all of them are registered now; kept for callers of the old name)
DESCRIBED: dict[str, Any] = FAMILIES
#: other names users give a family (``--family flux``)
ALIASES: dict[str, str] = {"flux": "flux_dev"}


def family_name(name: str) -> str:
    """A family name with its alias resolved (``flux`` → ``flux_dev``); unknown names unchanged."""
    return ALIASES.get(name, name)


def get_family(name: str) -> Any:
    """The registered family called ``name`` or one of its aliases (ValueError naming the known ones otherwise)."""
    try:
        return FAMILIES[family_name(name)]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """``(family, layout)`` of a checkpoint key set, layout one of ``LAYOUTS``; None if no family fits."""
    return detect_described_family(keys)


def naming_for(family: str, keys: Iterable[str] | Mapping[str, Any] | None = None):
    """Name maps of ``family`` (its default structure, or the structure of a checkpoint's keys)."""
    return get_family(family).naming(keys)


def naming_for_layers(family: str, shapes: Mapping[str, tuple[int, ...]]):
    """Name maps of ``family`` in the structure an adapter's layers imply (``shapes``: layer name in any convention →
    ΔW shape; row slices of fused tensors depend on it), or its default structure for families without that need."""
    fam = get_family(family)
    shaped = getattr(fam, "naming_for_shapes", None)
    return shaped(shapes) if shaped is not None else fam.naming()


def pipeline_naming(family: str, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str] = ()):
    """Name maps of ``family`` in the structure of a diffusers pipeline folder (its components' configs)."""
    fam = get_family(family)
    if isinstance(fam, flux.FluxFamily):  # a diffusers transformer: its structure from the folder's keys
        return flux.FluxNaming(fam, flux.FluxStructure.from_keys(_transformer_keys(keys)))
    return sd.SDNaming(fam, sd.structure_from_pipeline(family, configs, keys))


def _transformer_keys(keys: Iterable[str] | Mapping[str, Any]) -> Mapping[str, Any] | list[str]:
    """A pipeline folder's transformer keys (``transformer.`` dropped; with their values for a mapping of shapes);
    all keys where none has that component."""
    ks = list(keys)
    inner = [k for k in ks if k.startswith("transformer.")]
    if not inner:
        return keys if isinstance(keys, Mapping) else ks
    if isinstance(keys, Mapping):
        return {k[len("transformer."):]: keys[k] for k in inner}
    return [k[len("transformer."):] for k in inner]


def detect_adapter(names: Iterable[str]) -> tuple[str, str] | None:
    """``(family, convention)`` of an adapter's module names or keys, or None if no family knows them."""
    return detect_described_adapter(names)


def detect_described_family(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """:func:`detect_family` over every described family: SD first, then Flux; SD's answer stands only where the key
    set has no Flux transformer blocks."""
    ks = list(keys.keys()) if isinstance(keys, Mapping) else list(keys)
    got = sd.detect(keys if isinstance(keys, Mapping) else ks)
    if got is not None and not flux.claims(ks):
        return got
    return flux.detect(keys if isinstance(keys, Mapping) else ks)


def detect_described_adapter(names: Iterable[str]) -> tuple[str, str] | None:
    """:func:`detect_adapter` over every described family: SD's answer stands unless Flux names more transformer
    modules than the best SD family names UNet modules (a Flux LoRA's CLIP-L ``lora_te1_`` names resolve in SD too;
    its transformer names never do, nor do SD UNet names in Flux)."""
    names = list(names)
    got = sd.detect_adapter(names)
    fl = flux.detect_adapter_hits(names)
    if fl is None:
        return got
    if got is not None:
        mods = {sd.adapter_module(n) for n in names}
        unet = max(
            sum(1 for m in mods if (c := f.naming().resolve(m)) and c.startswith("unet."))
            for f in sd.SD_FAMILIES.values()
        )
        if unet >= fl[2]:
            return got
    return fl[0], fl[1]


__all__ = ["ALIASES", "DESCRIBED", "FAMILIES", "family_name", "LAYOUTS", "detect_described_adapter", "detect_described_family", "flux", "detect_adapter", "naming_for", "naming_for_layers", "pipeline_naming", "ModuleMap", "detect_family", "get_family", "sd"]
