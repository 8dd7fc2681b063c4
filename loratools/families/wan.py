"""Wan 2.1 / 2.2 video transformer, described as data.

Maps are generated from a structure (number of blocks, hidden size, FFN width, whether the image-to-video
CLIP branch is present, which pipeline component holds it), as diffusers'
``convert_wan_transformer_to_diffusers`` and its Wan LoRA converters derive theirs. Facts, from those and
``WanTransformer3DModel``:

* canonical: ``transformer.<WanTransformer3DModel path>`` (``transformer.blocks.0.attn1.to_q``); the
  second expert of Wan 2.2 A14B (low-noise) is the pipeline component ``transformer_2`` (diffusers'
  ``WanPipeline``: ``transformer`` for timesteps ≥ the boundary, the high-noise expert; ``transformer_2``
  below it; LoRAs load into it with ``load_lora_weights(…, load_into_transformer_2=True)``), so its
  canonical names start with ``transformer_2.`` (``WanStructure.component``).
* original: the Wan-Video key (``blocks.0.self_attn.q``), bare or with ``model.diffusion_model.`` /
  ``diffusion_model.``. Nothing is fused and no rows are permuted; only the names differ:
  ``self_attn.{q,k,v,o}`` ↔ ``attn1.{to_q,to_k,to_v,to_out.0}``, ``cross_attn.*`` ↔ ``attn2.*``,
  image-to-video ``cross_attn.k_img`` / ``v_img`` ↔ ``attn2.add_k_proj`` / ``add_v_proj``, ``ffn.0`` /
  ``ffn.2`` ↔ ``ffn.net.0.proj`` / ``ffn.net.2``, ``time_embedding.{0,2}`` / ``time_projection.1`` /
  ``text_embedding.{0,2}`` ↔ ``condition_embedder.*``, ``img_emb.proj.{1,3}`` ↔
  ``condition_embedder.image_embedder.ff.net.{0.proj,2}``, ``head.head`` ↔ ``proj_out``.
* not mapped: ``patch_embedding`` (a Conv3d with a 5-D weight; no LoRA convention read names it);
  ``head.modulation`` and the blocks' ``modulation`` are parameters (``scale_shift_table``), not layers.
* LoRA names: musubi-tuner ``lora_unet_blocks_0_self_attn_q`` (kohya "original"), ComfyUI / diffusion-pipe
  / Wan-Video ``diffusion_model.blocks.0.self_attn.q`` (diffusers' ``_convert_non_diffusers_wan_lora_…``
  and ``_convert_musubi_wan_lora_…``), diffusers / PEFT ``transformer.blocks.0.attn1.to_q``, OneTrainer
  ``lora_transformer_blocks_0_attn1_to_q``.

Families: ``wan21`` (Wan 2.1: T2V-1.3B/14B, I2V/FLF2V-14B with the CLIP image branch; default T2V-14B) and
``wan22`` (Wan 2.2: TI2V-5B, hidden 3072; T2V/I2V-A14B = two experts of Wan 2.1-14B's structure, I2V
without the CLIP branch; default one A14B expert). 2.1-T2V-14B and 2.2-T2V-A14B experts have identical
key sets: ``detect`` answers wan21 for them (the names and maps are the same either way).
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
    Pair,
    any_block,
    build_maps,
    count_blocks,
    find_prefix,
    keyset,
    layout_of,
    rows_of,
)
from .flux import FluxModuleMap

#: musubi-tuner's Wan LoRA stems are the kohya "original" ones: ``lora_unet_blocks_0_self_attn_q``
MUSUBI_PREFIX = KOHYA_ORIGINAL_PREFIX
#: diffusers pipeline components of the two Wan 2.2 A14B experts: (high noise, low noise)
EXPERT_COMPONENTS = ("transformer", "transformer_2")

EMBED_PARTS: tuple[tuple[str, str], ...] = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
)
IMAGE_EMBED_PARTS: tuple[tuple[str, str], ...] = (
    ("condition_embedder.image_embedder.ff.net.0.proj", "img_emb.proj.1"),
    ("condition_embedder.image_embedder.ff.net.2", "img_emb.proj.3"),
)
# per block, in model order
ATTN_CHILDREN: tuple[tuple[str, str], ...] = (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "o"))
ATTENTIONS: tuple[tuple[str, str], ...] = (("attn1", "self_attn"), ("attn2", "cross_attn"))
IMAGE_ATTN_PARTS: tuple[tuple[str, str], ...] = (
    ("attn2.add_k_proj", "cross_attn.k_img"),
    ("attn2.add_v_proj", "cross_attn.v_img"),
)
FFN_PARTS: tuple[tuple[str, str], ...] = (("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"))
PROJ_OUT = ("proj_out", "head.head")
#: modules of the model deliberately not described, with the reason
EXCLUDED = {
    "patch_embedding": "patch-embedding Conv3d (5-D weight, outside ModuleMap's Linear/Conv2d); musubi-tuner's "
    "and diffusers' Wan LoRA names never include it"
}


@dataclass(frozen=True)
class WanStructure:
    """The shape of a Wan transformer, enough to generate every module name.

    ``image`` is True for Wan 2.1's image-to-video models (CLIP image embedder and the cross-attention's
    ``k_img`` / ``v_img``). ``in_channels`` (16 for T2V, 36 for I2V, 48 for Wan 2.2-TI2V-5B) only tells
    versions apart. ``component`` is ``transformer`` or, for Wan 2.2's low-noise expert, ``transformer_2``.
    """

    num_layers: int = 40
    hidden: int = 5120
    ffn_hidden: int = 13824
    image: bool = False
    in_channels: int = 16
    component: str = "transformer"
    prefix: str = ""

    @classmethod
    def from_diffusers_config(
        cls, config: Mapping[str, Any], prefix: str = "", component: str = "transformer"
    ) -> WanStructure:
        """Structure of a diffusers ``WanTransformer3DModel`` config (``dict(transformer.config)``)."""
        return cls(
            num_layers=int(config["num_layers"]),
            hidden=int(config["num_attention_heads"]) * int(config["attention_head_dim"]),
            ffn_hidden=int(config["ffn_dim"]),
            image=config.get("image_dim") is not None,
            in_channels=int(config.get("in_channels", 16)),
            component=component,
            prefix=prefix,
        )

    @classmethod
    def from_keys(cls, keys: Iterable[str] | Mapping[str, Any], component: str | None = None) -> WanStructure:
        """Infer the structure from a Wan-Video or diffusers key set (sizes from shapes when given tensors,
        else the detected family's). ``component`` defaults to ``transformer_2`` for a diffusers key set
        under ``transformer_2.``, else ``transformer`` (an original file does not say which expert it is)."""
        ks = keyset(keys)
        got = detect(keys)
        if got is None:
            raise ValueError("not a Wan transformer key set")
        default = WAN_FAMILIES[got[0]].default
        if got[1] == "diffusers":
            pre = _diffusers_prefix(ks) or ""
            prefix, q, ffn, img = (
                "",
                pre + "blocks.0.attn1.to_q.weight",
                pre + "blocks.0.ffn.net.0.proj.weight",
                ".attn2.add_k_proj.",
            )
        else:
            pre = prefix = _original_prefix(ks) or ""
            q, ffn, img = (
                pre + "blocks.0.self_attn.q.weight",
                pre + "blocks.0.ffn.0.weight",
                ".cross_attn.k_img.",
            )
        hidden = rows_of(keys, q) or default.hidden
        ffn_hidden = rows_of(keys, ffn) or default.ffn_hidden
        in_ch = rows_of(keys, pre + "patch_embedding.weight", 1) or default.in_channels
        image = any(k.startswith(pre + "blocks.") and img in k for k in ks)
        component = component or ("transformer_2" if pre == "transformer_2." else "transformer")
        return cls(count_blocks(ks, pre + "blocks."), hidden, ffn_hidden, image, in_ch, component, prefix)

    def pairs(self) -> list[Pair]:
        """Every module as ``(diffusers path, Wan-Video path, rows)``, in ``WanTransformer3DModel`` order
        (rows always None: nothing is fused)."""
        named = list(EMBED_PARTS) + (list(IMAGE_EMBED_PARTS) if self.image else [])
        for i in range(self.num_layers):
            d, o = f"blocks.{i}", f"blocks.{i}"
            for da, oa in ATTENTIONS:
                named += [(f"{d}.{da}.{dc}", f"{o}.{oa}.{oc}") for dc, oc in ATTN_CHILDREN]
            if self.image:
                named += [(f"{d}.{dc}", f"{o}.{oc}") for dc, oc in IMAGE_ATTN_PARTS]
            named += [(f"{d}.{dc}", f"{o}.{oc}") for dc, oc in FFN_PARTS]
        named.append(PROJ_OUT)
        return [(d, o, None) for d, o in named]

    def module_maps(self) -> list[FluxModuleMap]:
        """Every adaptable module (all Linear layers of ``WanTransformer3DModel``), in model order."""
        return build_maps(self.pairs(), self.prefix, component=self.component)


def _original_prefix(keys: list[str]) -> str | None:
    return find_prefix(keys, lambda p, ks: any_block(ks, p, "blocks", "self_attn.q."))


def _diffusers_prefix(keys: list[str]) -> str | None:
    return find_prefix(
        keys,
        lambda p, ks: (
            any_block(ks, p, "blocks", "attn1.to_q.") and any_block(ks, p, "blocks", "ffn.net.0.proj.")
        ),
        ("transformer.", "transformer_2.", ""),
    )


# ------------------------------------------------------------------------------------------ family
@dataclass(frozen=True)
class WanFamily(DiTFamilyMixin):
    """One Wan version: its name, description and default structure."""

    name: str
    description: str
    default: WanStructure


WAN_FAMILIES: dict[str, WanFamily] = {
    f.name: f
    for f in (
        WanFamily(
            "wan21",
            "Wan 2.1 T2V-14B (40 blocks, hidden 5120); T2V-1.3B, I2V/FLF2V-14B (CLIP image branch) from keys",
            WanStructure(),
        ),
        WanFamily(
            "wan22",
            "Wan 2.2 A14B expert (transformer / transformer_2, 40 blocks, hidden 5120); TI2V-5B (30 blocks, "
            "hidden 3072) from keys",
            WanStructure(),
        ),
    )
}


# --------------------------------------------------------------------------------------- detection
def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """Which Wan family and layout a *checkpoint* key set is: ``(family, layout)`` or None.

    Original: ``[model.diffusion_model.|diffusion_model.]blocks.N.self_attn.q…``; diffusers:
    ``[transformer.|transformer_2.]blocks.N.attn1.to_q`` with ``blocks.N.ffn.net.0.proj``. Version, when
    the key set carries shapes: hidden 3072 (TI2V-5B) or 36 input channels without the CLIP image branch
    (I2V-A14B) → wan22; otherwise wan21 (2.2's T2V-A14B experts are named exactly like 2.1-T2V-14B).
    """
    ks = keyset(keys)
    p = _original_prefix(ks)
    if p is not None:
        layout, q, img = layout_of(p), p + "blocks.0.self_attn.q.weight", ".cross_attn.k_img."
    else:
        p = _diffusers_prefix(ks)
        if p is None:
            return None
        layout, q, img = "diffusers", p + "blocks.0.attn1.to_q.weight", ".attn2.add_k_proj."
    image = any(k.startswith(p + "blocks.") and img in k for k in ks)
    hidden = rows_of(keys, q)
    in_ch = rows_of(keys, p + "patch_embedding.weight", 1)
    v22 = hidden == 3072 or (in_ch == 36 and not image)
    return ("wan22" if v22 else "wan21"), layout


def claims(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """True when a key set has Wan transformer blocks (Wan-Video or diffusers names, any prefix)."""
    return detect(keys) is not None


__all__ = [
    "COMFY_PREFIX",
    "DIFFUSERS_PREFIXES",
    "EXCLUDED",
    "EXPERT_COMPONENTS",
    "KOHYA_DIFFUSERS_PREFIX",
    "KOHYA_ORIGINAL_PREFIX",
    "LYCORIS_PREFIX",
    "MUSUBI_PREFIX",
    "ORIGINAL_PREFIXES",
    "WAN_FAMILIES",
    "WanFamily",
    "WanStructure",
    "claims",
    "detect",
]
