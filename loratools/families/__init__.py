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

from . import dit_registry, flux, sd
from .base import LAYOUTS, ModuleMap
from .dit import adapter_hits

#: the families loratools resolves adapters and checkpoints with (every format knows their conventions): the Stable
#: Diffusion UNets and the DiT transformers — Flux.1, SD3/3.5, Wan 2.1/2.2, Qwen-Image, HunyuanVideo (fused
#: projections split on reading, fused again by fused conventions)
FAMILIES: dict[str, Any] = {**sd.SD_FAMILIES, **flux.FLUX_FAMILIES, **dit_registry.DIT_DESCRIBED}
#: the DiT families, in the order adapter detection prefers them on a tie (Flux first: its names are the most used)
DIT_FAMILIES: dict[str, Any] = {**flux.FLUX_FAMILIES, **dit_registry.DIT_DESCRIBED}
#: other names users give a family (``--family flux``)
ALIASES: dict[str, str] = {"flux": "flux_dev", "sd3.5": "sd35_large", "sd35": "sd35_large", "wan": "wan21",
                           "qwen": "qwen_image", "qwen-image": "qwen_image", "hunyuan": "hunyuan_video",
                           "hunyuan-video": "hunyuan_video"}


def family_name(name: str) -> str:
    """A family name with its alias resolved (``flux`` → ``flux_dev``); unknown names unchanged."""
    return ALIASES.get(name, name)


def get_family(name: str) -> Any:
    """The registered family called ``name`` or one of its aliases (ValueError naming the known ones otherwise)."""
    try:
        return FAMILIES[family_name(name)]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


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
    """Name maps of ``family`` in the structure of a diffusers pipeline folder (its components' configs; a DiT
    family's structure from its transformer's keys)."""
    fam = get_family(family)
    own = getattr(fam, "pipeline_naming", None)
    if own is not None:
        return own(configs, keys)
    return sd.SDNaming(fam, sd.structure_from_pipeline(family, configs, keys))


def detect_family(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """``(family, layout)`` of a checkpoint key set, layout one of ``LAYOUTS``; None if no family fits. SD first,
    then the DiT families (HunyuanVideo, Qwen-Image, SD3, Wan, then Flux: ``dit_registry.DETECT_ORDER``); SD's
    answer stands only where no DiT family claims the keys."""
    ks = keys if isinstance(keys, Mapping) else list(keys)
    dit = dit_registry.detect(ks) or flux.detect(ks)
    got = sd.detect(ks)
    return got if got is not None and dit is None else dit


def detect_adapter(names: Iterable[str]) -> tuple[str, str] | None:
    """``(family, convention)`` of an adapter's module names or keys, or None if no family knows them. SD's answer
    stands unless a DiT family names more transformer modules than the best SD family names UNet modules (a Flux
    LoRA's CLIP-L ``lora_te1_`` names resolve in SD too; its transformer names never do, nor do SD UNet names in a
    DiT)."""
    names = list(names)
    got = sd.detect_adapter(names)
    fl = dit_adapter_hits(names)
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


def dit_adapter_hits(names: Iterable[str]) -> tuple[str, str, int] | None:
    """``(family, convention, modules)``: the DiT family naming the most transformer modules of an adapter (first in
    ``DIT_FAMILIES`` on a tie), its most common convention among them, how many modules; None if none."""
    return adapter_hits(names, DIT_FAMILIES)


__all__ = ["ALIASES", "DIT_FAMILIES", "dit_adapter_hits", "FAMILIES", "family_name", "LAYOUTS", "flux", "detect_adapter", "naming_for", "naming_for_layers", "pipeline_naming", "ModuleMap", "detect_family", "get_family", "sd"]
