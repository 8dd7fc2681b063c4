"""Qwen-Image (and Qwen-Image-Edit) transformer, described as data.

Qwen-Image shipped in diffusers format; its single-file checkpoints (ComfyUI's repackaged
``qwen_image_*.safetensors``) use the *same* module names, which is why diffusers' single-file loader maps
``QwenImageTransformer2DModel`` checkpoints with the identity. Facts, from that and
``QwenImageTransformer2DModel``:

* canonical: ``transformer.<QwenImageTransformer2DModel path>``
  (``transformer.transformer_blocks.0.attn.to_q``, ``….img_mod.1``, ``….img_mlp.net.0.proj``).
* original: the same path, bare or with ``model.diffusion_model.`` / ``diffusion_model.`` in front. Nothing
  is fused and no rows are permuted (``norm_out.linear`` is copied as is by diffusers' loader).
* layouts: ``model.diffusion_model.`` keys are "original", ``diffusion_model.`` keys "original_unprefixed",
  bare or ``transformer.`` keys "diffusers" (a bare single file *is* in diffusers names; reading it either
  way gives the same tensors).
* not mapped: ``time_text_embed.addition_t_embedding`` (an Embedding, Qwen-Image-Layered only).
* LoRA names: musubi-tuner / sd-scripts ``lora_unet_transformer_blocks_0_attn_to_q`` (kohya "original" =
  ``lora_unet_`` + the path mangled), OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q``,
  diffusers / PEFT ``transformer.transformer_blocks.0.attn.to_q``, DiffSynth / ComfyUI's "QwenImage LoRA
  format" bare ``transformer_blocks.0.attn.to_q``, ComfyUI ``diffusion_model.transformer_blocks.0.attn.to_q``,
  SimpleTuner ``lycoris_transformer_blocks_0_attn_to_q`` (``comfy/lora.py`` QwenImage section; diffusers'
  ``_convert_non_diffusers_qwen_lora_to_diffusers``).

Family: ``qwen_image`` (Qwen-Image, -Edit, -Edit-2509/2511: 60 blocks, hidden 3072; the variants share
every Linear name and shape, so they are one family). Qwen-Image-2.1 is another model class and is not
described here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .dit import DiTFamilyMixin
from .dit_keys import (
    COMFY_PREFIX,
    DIFFUSERS_PREFIXES,
    KOHYA_DIFFUSERS_PREFIX,
    KOHYA_ORIGINAL_PREFIX,
    LYCORIS_PREFIX,
    ORIGINAL_PREFIXES,
    PREFIXED,
    Pair,
    any_block,
    build_maps,
    count_blocks,
    find_prefix,
    keyset,
    rows_of,
)
from .flux import FluxModuleMap

TOP_PARTS = (
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "img_in",
    "txt_in",
)
# per block, in model order
BLOCK_PARTS = (
    "img_mod.1",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.add_q_proj",
    "attn.to_out.0",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mod.1",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
FINAL_PARTS = ("norm_out.linear", "proj_out")
#: modules of the model deliberately not described, with the reason
EXCLUDED = {"time_text_embed.addition_t_embedding": "an Embedding (Qwen-Image-Layered), not a Linear"}
#: prefixes of a Qwen-Image key set that make it the "diffusers" layout (checked after the original ones)
DIFFUSERS_KEY_PREFIXES = ("transformer.", "")


@dataclass(frozen=True)
class QwenImageStructure:
    """The shape of a Qwen-Image transformer, enough to generate every module name.

    ``prefix`` precedes the keys in the checkpoint described (``""``, ``"model.diffusion_model."`` or
    ``"diffusion_model."``); the original path *is* the diffusers path.
    """

    num_layers: int = 60
    hidden: int = 3072
    mlp_hidden: int = 12288
    prefix: str = ""

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], prefix: str = "") -> QwenImageStructure:
        """Structure of a diffusers ``QwenImageTransformer2DModel`` config (``dict(transformer.config)``)."""
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return cls(num_layers=int(config["num_layers"]), hidden=hidden, mlp_hidden=4 * hidden, prefix=prefix)

    @classmethod
    def from_keys(cls, keys: Iterable[str] | Mapping[str, Any]) -> QwenImageStructure:
        """Infer the structure from a Qwen-Image key set (sizes from shapes when given tensors)."""
        ks = keyset(keys)
        pre = _prefix(ks)
        if pre is None:
            raise ValueError("not a Qwen-Image transformer key set")
        hidden = rows_of(keys, pre + "img_in.weight") or cls.hidden
        mlp = rows_of(keys, pre + "transformer_blocks.0.img_mlp.net.0.proj.weight") or 4 * hidden
        prefix = "" if pre == "transformer." else pre
        return cls(count_blocks(ks, pre + "transformer_blocks."), hidden, mlp, prefix)

    def pairs(self) -> list[Pair]:
        """Every module as ``(diffusers path, original path, rows)`` (the two paths are equal), in
        ``QwenImageTransformer2DModel`` order."""
        paths = list(TOP_PARTS)
        for i in range(self.num_layers):
            paths += [f"transformer_blocks.{i}.{c}" for c in BLOCK_PARTS]
        paths += FINAL_PARTS
        return [(p, p, None) for p in paths]

    def module_maps(self) -> list[FluxModuleMap]:
        """Every adaptable module (all Linear layers of ``QwenImageTransformer2DModel``), in model order."""
        return build_maps(self.pairs(), self.prefix)


def _prefix(keys: list[str]) -> str | None:
    return find_prefix(
        keys,
        lambda p, ks: (
            any_block(ks, p, "transformer_blocks", "img_mod.1.")
            and any_block(ks, p, "transformer_blocks", "txt_mod.1.")
        ),
        (*ORIGINAL_PREFIXES[:-1], *DIFFUSERS_KEY_PREFIXES),
    )


# ------------------------------------------------------------------------------------------ family
@dataclass(frozen=True)
class QwenImageFamily(DiTFamilyMixin):
    """One Qwen-Image variant: its name, description and default structure."""

    name: str
    description: str
    default: QwenImageStructure


QWEN_IMAGE_FAMILIES: dict[str, QwenImageFamily] = {
    "qwen_image": QwenImageFamily(
        "qwen_image",
        "Qwen-Image / Qwen-Image-Edit (2509, 2511): 60 blocks, hidden 3072",
        QwenImageStructure(),
    )
}


# --------------------------------------------------------------------------------------- detection
def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """Which Qwen-Image family and layout a *checkpoint* key set is: ``(family, layout)`` or None.

    Needs ``transformer_blocks.N.img_mod.1`` and ``….txt_mod.1`` (no other family has them). Layout
    "original" for ``model.diffusion_model.``, "original_unprefixed" for ``diffusion_model.``, "diffusers"
    for bare or ``transformer.`` keys.
    """
    pre = _prefix(keyset(keys))
    if pre is None:
        return None
    layout = "original" if pre == PREFIXED else "original_unprefixed" if pre == COMFY_PREFIX else "diffusers"
    return "qwen_image", layout


def claims(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """True when a key set has Qwen-Image transformer blocks (any prefix)."""
    return detect(keys) is not None


__all__ = [
    "COMFY_PREFIX",
    "DIFFUSERS_PREFIXES",
    "EXCLUDED",
    "KOHYA_DIFFUSERS_PREFIX",
    "KOHYA_ORIGINAL_PREFIX",
    "LYCORIS_PREFIX",
    "ORIGINAL_PREFIXES",
    "QWEN_IMAGE_FAMILIES",
    "QwenImageFamily",
    "QwenImageStructure",
    "claims",
    "detect",
]
