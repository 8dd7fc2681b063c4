"""Registration list of the DiT families described beside Flux.1: SD3/3.5, Wan 2.1/2.2, Qwen-Image,
HunyuanVideo (one module each, all in the shape of ``flux.py``).

Kept apart from ``families/__init__.py`` so the DiT engine decides where they join ``DESCRIBED`` /
``FAMILIES``. Every family object has ``name``, ``description``, ``default`` (a structure with
``pairs()`` / ``module_maps()``), ``structure(keys=None)`` and ``detect(keys)``; every module has
``detect(keys) -> (family, layout) | None`` and ``claims(keys)``.

Detection order (``DETECT_ORDER``): each module's markers are exclusive among these four, Flux.1 and SD
(tested), with one exception handled by order: Flux's ``detect`` also accepts HunyuanVideo's diffusers key
set (``transformer_blocks…attn.add_q_proj`` + ``single_transformer_blocks…proj_mlp``), and a ComfyUI-saved
HunyuanVideo file with Flux-style names (``img_attn.qkv``), so HunyuanVideo (token refiner) must be asked
*before* Flux. SD's detection claims none of these key sets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any

from . import hunyuan_video, qwen_image, sd3, wan

#: family name → the module describing it
DIT_MODULES: dict[str, ModuleType] = {
    **{n: sd3 for n in sd3.SD3_FAMILIES},
    **{n: wan for n in wan.WAN_FAMILIES},
    **{n: qwen_image for n in qwen_image.QWEN_IMAGE_FAMILIES},
    **{n: hunyuan_video for n in hunyuan_video.HUNYUAN_VIDEO_FAMILIES},
}
#: family name → family object (name, description, default structure, structure(keys), detect(keys))
DIT_DESCRIBED: dict[str, Any] = {
    **sd3.SD3_FAMILIES,
    **wan.WAN_FAMILIES,
    **qwen_image.QWEN_IMAGE_FAMILIES,
    **hunyuan_video.HUNYUAN_VIDEO_FAMILIES,
}
#: checkpoint detectors, in the order to ask them (all before Flux's; see the module docstring)
DETECT_ORDER: tuple[Callable[[Iterable[str] | Mapping[str, Any]], tuple[str, str] | None], ...] = (
    hunyuan_video.detect,
    qwen_image.detect,
    sd3.detect,
    wan.detect,
)


def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """``(family, layout)`` of a checkpoint key set among the families listed here, or None."""
    ks = keys if isinstance(keys, Mapping) else list(keys)
    for fn in DETECT_ORDER:
        got = fn(ks)
        if got is not None:
            return got
    return None


__all__ = ["DETECT_ORDER", "DIT_DESCRIBED", "DIT_MODULES", "detect"]
