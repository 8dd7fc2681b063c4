"""What every diffusion-transformer (DiT) family description shares, and what the fused ↔ split engine asks of it.

A DiT family (Flux.1 in :mod:`loratools.families.flux`; SD3, Wan, Qwen-Image, HunyuanVideo modelled on it) describes
its adaptable Linears as ``ModuleMap``s whose original checkpoint tensor may hold several canonical modules by rows
(``rows``) or one module's rows in another order (``row_order``). Its naming object answers, besides SD's
``lookup`` / ``resolve`` / ``module`` / ``kohya_stem`` / ``comfy_key`` / ``unmapped``:

* ``lookup_group(name) -> (modules, convention) | None``: every module a (possibly fused) name covers, in row order;
* ``by_original(key) -> modules``: the modules of one original tensor, in row order;
* ``ORIGINAL_CONVENTIONS``: the conventions whose names are original tensors (their LoRA factors are in original
  rows: kohya "original" stems ``lora_unet_…``, ComfyUI ``diffusion_model.…``, checkpoint keys);
* ``kohya_default_style``: the kohya stem style written unless asked ("original": sd-scripts' names, which
  ComfyUI, diffusers and Forge all read);
* ``is_canonical(name)``.

:class:`DiTNaming` gives a family's naming class the last three (subclass it); the family object may add
``naming_for_shapes(shapes)`` (its structure from an adapter's layer shapes: row slices depend on the hidden size).
The engine (:mod:`loratools.formats.fused`, name resolution, the kohya / ComfyUI writers) only uses this surface, so a
new DiT family is a description module and its tests. Imports nothing from ``loratools.formats``.
"""

from __future__ import annotations

from typing import Any

#: kohya "original" stem prefix, kohya "diffusers" (OneTrainer) stem prefix, ComfyUI prefix of a DiT's keys
KOHYA_ORIGINAL_PREFIX = "lora_unet_"
KOHYA_DIFFUSERS_PREFIX = "lora_transformer_"
COMFY_PREFIX = "diffusion_model."
#: conventions that name original checkpoint tensors (fused projections, original row order)
ORIGINAL_CONVENTIONS = frozenset({"kohya_original", "comfy", "original"})


class DiTNaming:
    """Mixin for a DiT family's naming class (needs ``modules`` and a ``_by_canonical`` dict of them)."""

    #: kohya stem style written unless asked: sd-scripts' original names
    kohya_default_style = "original"
    ORIGINAL_CONVENTIONS = ORIGINAL_CONVENTIONS
    _by_canonical: dict[str, Any]

    def is_canonical(self, name: str) -> bool:
        """Whether ``name`` is the canonical name of a module of this structure (not an alias of one)."""
        return name in self._by_canonical


def original_conventions(naming: Any) -> frozenset[str]:
    """The conventions of ``naming`` that name original tensors (the DiT default where it does not say)."""
    return getattr(naming, "ORIGINAL_CONVENTIONS", ORIGINAL_CONVENTIONS)


def is_canonical(naming: Any, name: str) -> bool:
    """``naming.is_canonical(name)``, or for a naming without it: ``name`` resolves to itself."""
    check = getattr(naming, "is_canonical", None)
    if check is not None:
        return bool(check(name))
    found = naming.lookup(name)
    return found is not None and found[0] == name
