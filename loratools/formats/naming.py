"""Naming helpers shared by every adapter format (a leaf module: format modules import it, never each other).

Pipeline components (``unet``, ``text_encoder``…), kohya prefixes and stems (``lora_unet_`` + the module path with
``.`` → ``_``), and the component a layer is written under.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from loratools.errors import LoraToolsError
from loratools.families.base import COMPONENTS, split_component  # noqa: F401  (re-exported)

#: kohya prefix → diffusers pipeline component
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_transformer_": "transformer",
}
COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                    "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
#: the prefix LyCORIS's own ``LycorisNetwork`` gives its module names (no pipeline component)
LYCORIS_PREFIX = "lycoris_"


def split_prefix(stem: str) -> tuple[str | None, str]:
    """``lora_te2_text_model_x`` → (``lora_te2_``, ``text_model_x``); longest known prefix wins."""
    for prefix in sorted([*KOHYA_PREFIXES, LYCORIS_PREFIX], key=len, reverse=True):
        if stem.startswith(prefix):
            return prefix, stem[len(prefix):]
    return None, stem


def tag_stem(layer, stem: str):
    """Record a layer's on-disk stem and its pipeline component (from the prefix) for resolution and writing."""
    prefix, _ = split_prefix(stem)
    layer.meta["kohya_stem"] = stem
    layer.meta["component"] = KOHYA_PREFIXES.get(prefix) if prefix else None
    return layer


def mangle(path: str) -> str:
    """kohya's module-name mangling: dots become underscores."""
    return path.replace(".", "_")


#: first module-path segment → pipeline component, for adapters whose module paths carry no component
ROOT_COMPONENTS = {"transformer_blocks": "transformer", "single_transformer_blocks": "transformer",
                   "text_model": "text_encoder"}


def layer_component(name: str, layer, component: str | None = None, force: bool = False) -> str:
    """Pipeline component a layer is written under (kohya prefix, diffusers key): ``component`` when ``force`` (the
    user's ``--component``); else the one its name or its source file gave it; else ``component`` (the
    adapter-wide guess, :func:`adapter_component`); else unet."""
    if force and component:
        return component
    return split_component(name)[0] or layer.meta.get("component") or component or "unet"


#: a CLIP text-encoder layer named without the ``text_model.`` level: transformers 5's ``CLIPTextModel`` has none
#: (``CLIPTextModelWithProjection`` keeps it), so PEFT adapters made on it name ``encoder.layers.N.self_attn.q_proj``
CLIP_FLAT = re.compile(r"^encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")


def clip_text_model_path(path: str) -> str:
    """A CLIP text-encoder module path with its ``text_model.`` level (the path in transformers 4 and in
    ``CLIPTextModelWithProjection``, what kohya stems and diffusers' text-encoder loaders of every version take);
    other paths unchanged."""
    return "text_model." + path if CLIP_FLAT.match(path) else path


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's ``get_pattern_key`` (``peft/utils/other.py``): the first pattern p with
    re.match(rf"(.*\\.)?({p})$", module), None if none (PEFT then uses the adapter-wide r / lora_alpha)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _root_component(name: str) -> str | None:
    return ROOT_COMPONENTS.get(name.split(".", 1)[0]) or ("text_encoder" if CLIP_FLAT.match(name) else None)


def adapter_component(names: Iterable[str]) -> str | None:
    """The one pipeline component an adapter's component-less module paths point to, from their roots (DiT
    ``transformer_blocks`` → transformer, CLIP ``text_model`` or transformers 5's flat CLIP
    ``encoder.layers.N.self_attn…`` → text_encoder); None if none or several."""
    found = {_root_component(n) for n in names if split_component(n)[0] is None}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def check_single_component(adapter, component: str) -> None:
    """``--component`` re-homes every layer: refuse an adapter whose layers belong to several components."""
    found = {split_component(n)[0] or la.meta.get("component") for n, la in adapter.layers.items()} - {None}
    if len(found) > 1:
        raise LoraToolsError(
            f"--component {component}: the adapter has layers for {', '.join(sorted(found))}; "
            "it can only re-home a single-component adapter"
        )



