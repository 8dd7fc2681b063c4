"""Stable Diffusion 3 / 3.5 (MMDiT) transformer, described as data.

Maps are generated from a structure (number of joint blocks, hidden size, MLP width, which blocks carry
SD3.5-medium's second image attention), as diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers``
derives its own. Facts, from that converter and ``SD3Transformer2DModel``:

* canonical: ``transformer.<SD3Transformer2DModel path>`` (``transformer.transformer_blocks.0.attn.to_q``).
* original: Stability's MMDiT key (``joint_blocks.0.x_block.attn.qkv``), bare or with
  ``model.diffusion_model.`` / ``diffusion_model.`` in front. Fused: ``x_block.attn.qkv`` = to_q, to_k,
  to_v; ``context_block.attn.qkv`` = add_q_proj, add_k_proj, add_v_proj; ``x_block.attn2.qkv`` (dual
  attention blocks of SD3.5-medium) = attn2.to_q, to_k, to_v; ``hidden`` rows each.
* the last joint block is "context pre-only": its context block has no ``attn.proj`` (``to_add_out``) and
  no MLP (``ff_context``), and its ``adaLN_modulation.1`` is an ``AdaLayerNormContinuous`` in diffusers:
  rows (shift, scale) in MMDiT, (scale, shift) in diffusers, swapped like ``final_layer.adaLN_modulation.1``
  ↔ ``norm_out.linear`` (``row_order``). The other modulations are copied unchanged.
* the patch embedding ``pos_embed.proj`` ↔ ``x_embedder.proj`` is a Conv2d (kernel = patch size); it is
  mapped (sd-scripts adapts it with ``emb_dims``: ``lora_unet_x_embedder_proj``), its weight is 4-D.
* LoRA names: sd-scripts ``lora_unet_joint_blocks_0_x_block_attn_qkv`` (fused), OneTrainer
  ``lora_transformer_transformer_blocks_0_attn_to_q``, SimpleTuner ``lycoris_…``, diffusers / PEFT
  ``transformer.transformer_blocks.0.attn.to_q``, flash-sd3's ``base_model.model.<diffusers path>``,
  ComfyUI ``diffusion_model.joint_blocks.0.x_block.attn.qkv`` (``comfy/lora.py``, SD3 section).

Families: ``sd3`` (SD3-medium: 24 blocks, hidden 1536), ``sd35_large`` (SD3.5-large / large-turbo: 38
blocks, hidden 2432, q/k RMSNorm), ``sd35_medium`` (24 blocks, hidden 1536, q/k RMSNorm, a second image
attention ``attn2`` in blocks 0-12). Imports nothing from ``loratools.formats``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .dit import DiTFamilyMixin, blocks_seen, hidden_of
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
    fused_rows,
    keyset,
    layout_of,
    rows_of,
    swap_halves,
)
from .flux import FluxModuleMap

#: flash-sd3 and other PEFT-saved SD3 LoRAs: ``base_model.model.<diffusers path>`` (read by ComfyUI)
PEFT_BASE_PREFIX = "base_model.model."
EXTRA_PREFIXES = (PEFT_BASE_PREFIX,)

# diffusers child ↔ MMDiT child, unfused modules of a joint block (context ones absent in the last block)
TOP_PARTS: tuple[tuple[str, str], ...] = (
    ("pos_embed.proj", "x_embedder.proj"),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
    ("context_embedder", "context_embedder"),
)
X_QKV = ("x_block.attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
# model order of the context projections in diffusers' JointAttnProcessor module: add_k, add_v, add_q
CONTEXT_QKV = ("context_block.attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
CONTEXT_ORDER = ("attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj")
X2_QKV = ("x_block.attn2.qkv", ("attn2.to_q", "attn2.to_k", "attn2.to_v"))
FF_PARTS = (("ff.net.0.proj", "x_block.mlp.fc1"), ("ff.net.2", "x_block.mlp.fc2"))
FF_CONTEXT_PARTS = (
    ("ff_context.net.0.proj", "context_block.mlp.fc1"),
    ("ff_context.net.2", "context_block.mlp.fc2"),
)
NORM_OUT = ("norm_out.linear", "final_layer.adaLN_modulation.1")
PROJ_OUT = ("proj_out", "final_layer.linear")
#: modules of the model deliberately not described, with the reason
EXCLUDED: dict[str, str] = {}


@dataclass(frozen=True)
class SD3Structure:
    """The shape of an SD3 / SD3.5 MMDiT, enough to generate every module name and row slice.

    ``prefix`` precedes the MMDiT keys in the checkpoint described (``""``, ``"model.diffusion_model."``
    or ``"diffusion_model."``).
    """

    num_layers: int = 24
    hidden: int = 1536
    mlp_hidden: int = 6144
    dual_attention_layers: tuple[int, ...] = ()
    prefix: str = ""

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], prefix: str = "") -> SD3Structure:
        """Structure of a diffusers ``SD3Transformer2DModel`` config (``dict(transformer.config)``)."""
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return cls(
            num_layers=int(config["num_layers"]),
            hidden=hidden,
            mlp_hidden=4 * hidden,
            dual_attention_layers=tuple(sorted(int(i) for i in config.get("dual_attention_layers") or ())),
            prefix=prefix,
        )

    @classmethod
    def from_keys(cls, keys: Iterable[str] | Mapping[str, Any]) -> SD3Structure:
        """Infer the structure from an MMDiT or diffusers key set (sizes from shapes when given tensors,
        else the detected family's)."""
        ks = keyset(keys)
        got = detect(ks)
        if got is None:
            raise ValueError("not an SD3 / SD3.5 transformer key set")
        default = SD3_FAMILIES[got[0]].default
        if got[1] == "diffusers":
            pre = "transformer." if any(k.startswith("transformer.transformer_blocks.") for k in ks) else ""
            blocks, prefix = pre + "transformer_blocks.", ""
            hid_key, mlp_key = (
                pre + "context_embedder.weight",
                pre + "transformer_blocks.0.ff.net.0.proj.weight",
            )
            attn2 = ".attn2."
        else:
            prefix = _original_prefix(ks)
            blocks = prefix + "joint_blocks."
            hid_key, mlp_key = (
                prefix + "context_embedder.weight",
                prefix + "joint_blocks.0.x_block.mlp.fc1.weight",
            )
            attn2 = ".x_block.attn2."
        dual = sorted(
            {int(k[len(blocks) :].split(".", 1)[0]) for k in ks if k.startswith(blocks) and attn2 in k}
        )
        hidden = rows_of(keys, hid_key) or default.hidden
        mlp = rows_of(keys, mlp_key) or (4 * hidden if hidden != default.hidden else default.mlp_hidden)
        return cls(count_blocks(ks, blocks), hidden, mlp, tuple(dual), prefix)

    def pairs(self) -> list[Pair]:
        """Every module as ``(diffusers path, MMDiT path, rows)``, in ``SD3Transformer2DModel`` order."""
        h = self.hidden
        out: list[Pair] = [(d, o, None) for d, o in TOP_PARTS]
        for i in range(self.num_layers):
            d, o = f"transformer_blocks.{i}", f"joint_blocks.{i}"
            last = i == self.num_layers - 1
            out.append((f"{d}.norm1.linear", f"{o}.x_block.adaLN_modulation.1", None))
            out.append((f"{d}.norm1_context.linear", f"{o}.context_block.adaLN_modulation.1", None))
            out += [
                (f"{d}.{c}", f"{o}.{orig}", r) for c, orig, r in fused_rows(X_QKV[0], X_QKV[1], (h, h, h))
            ]
            ctx = {c: (orig, r) for c, orig, r in fused_rows(CONTEXT_QKV[0], CONTEXT_QKV[1], (h, h, h))}
            out += [(f"{d}.{c}", f"{o}.{ctx[c][0]}", ctx[c][1]) for c in CONTEXT_ORDER]
            out.append((f"{d}.attn.to_out.0", f"{o}.x_block.attn.proj", None))
            if not last:
                out.append((f"{d}.attn.to_add_out", f"{o}.context_block.attn.proj", None))
            if i in self.dual_attention_layers:
                out += [
                    (f"{d}.{c}", f"{o}.{orig}", r)
                    for c, orig, r in fused_rows(X2_QKV[0], X2_QKV[1], (h, h, h))
                ]
                out.append((f"{d}.attn2.to_out.0", f"{o}.x_block.attn2.proj", None))
            out += [(f"{d}.{c}", f"{o}.{orig}", None) for c, orig in FF_PARTS]
            if not last:
                out += [(f"{d}.{c}", f"{o}.{orig}", None) for c, orig in FF_CONTEXT_PARTS]
        out += [(NORM_OUT[0], NORM_OUT[1], None), (PROJ_OUT[0], PROJ_OUT[1], None)]
        return out

    def row_orders(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Diffusers paths whose rows are a permutation of the original's: the two ``AdaLayerNormContinuous``
        modulations (``norm_out.linear`` and the last block's ``norm1_context.linear``), shift/scale swapped."""
        swap = swap_halves(2 * self.hidden)
        last = f"transformer_blocks.{self.num_layers - 1}.norm1_context.linear"
        return {NORM_OUT[0]: swap, last: swap} if self.num_layers else {NORM_OUT[0]: swap}

    def module_maps(self) -> list[FluxModuleMap]:
        """Every adaptable module (all Linear layers of ``SD3Transformer2DModel`` and the patch-embedding
        Conv2d), in model order."""
        return build_maps(self.pairs(), self.prefix, self.row_orders())


def _original_prefix(keys: list[str]) -> str:
    return find_prefix(keys, lambda p, ks: any_block(ks, p, "joint_blocks", "x_block.")) or ""


# ------------------------------------------------------------------------------------------ family
@dataclass(frozen=True)
class SD3Family(DiTFamilyMixin):
    """One SD3 / SD3.5 variant: its name, description and default structure."""

    name: str
    description: str
    default: SD3Structure

    def structure_for_shapes(self, seen: Mapping[str, tuple[int, ...]]) -> SD3Structure | None:
        """Hidden size from a block's attention / modulation input width; the block count from the last block
        seen when it is "context pre-only" (no ``attn.to_add_out`` where earlier blocks have one), else at least
        the default's; dual-attention blocks from ``attn2`` modules seen."""
        hidden = hidden_of(seen, _HIDDEN_INPUT)
        if hidden is None:
            return None
        last = blocks_seen(seen, "transformer_blocks")
        has_out = any(p.endswith(".attn.to_add_out") for p in seen)
        pre_only = last > 0 and f"transformer_blocks.{last - 1}.attn.to_add_out" not in seen and has_out
        layers = last if pre_only else max(last, self.default.num_layers)
        dual = {i for i in self.default.dual_attention_layers if i < layers}
        dual |= {int(p.split(".")[1]) for p in seen if p.startswith("transformer_blocks.") and ".attn2." in p}
        mlp = next((int(s[0]) for p, s in seen.items() if p.endswith(".ff.net.0.proj")), 4 * hidden)
        return SD3Structure(layers, hidden, mlp, tuple(sorted(dual)), self.default.prefix)


#: modules whose input width is the hidden size
_HIDDEN_INPUT = r"transformer_blocks\.\d+\.(?:attn2?\.(?:to_[qkv]|add_[qkv]_proj)|norm1(?:_context)?\.linear)$"


SD3_FAMILIES: dict[str, SD3Family] = {
    f.name: f
    for f in (
        SD3Family("sd3", "SD3-medium: 24 joint blocks, hidden 1536", SD3Structure()),
        SD3Family(
            "sd35_medium",
            "SD3.5-medium: 24 joint blocks, hidden 1536, q/k RMSNorm, second image attention in blocks 0-12",
            SD3Structure(dual_attention_layers=tuple(range(13))),
        ),
        SD3Family(
            "sd35_large",
            "SD3.5-large / large-turbo: 38 joint blocks, hidden 2432, q/k RMSNorm",
            SD3Structure(num_layers=38, hidden=2432, mlp_hidden=9728),
        ),
    )
}


# --------------------------------------------------------------------------------------- detection
def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """Which SD3 family and layout a *checkpoint* key set is: ``(family, layout)`` or None.

    Original: ``[model.diffusion_model.|diffusion_model.]joint_blocks.N.x_block…``. Diffusers:
    ``[transformer.]transformer_blocks.N.norm1_context.linear`` beside ``pos_embed.proj`` and no
    ``single_transformer_blocks`` (Flux, HunyuanVideo) — Qwen-Image has no ``norm1_context``. Variant: a
    second image attention (``x_block.attn2`` / ``attn2``) → sd35_medium; q/k norms (``attn.ln_q`` /
    ``attn.norm_q``) or more than 24 blocks → sd35_large; else sd3.
    """
    ks = keyset(keys)
    p = _original_prefix(ks)
    if any_block(ks, p, "joint_blocks", "x_block."):
        blocks, attn2, qk = p + "joint_blocks.", ".x_block.attn2.", ".attn.ln_q."
        layout = layout_of(p)
    else:
        for pre in DIFFUSERS_PREFIXES:
            if (
                any_block(ks, pre, "transformer_blocks", "norm1_context.linear.")
                and any(k.startswith(pre + "pos_embed.proj.") for k in ks)
                and not any(k.startswith(pre + "single_transformer_blocks.") for k in ks)
            ):
                break
        else:
            return None
        blocks, attn2, qk = pre + "transformer_blocks.", ".attn2.", ".attn.norm_q."
        layout = "diffusers"
    if any(k.startswith(blocks) and attn2 in k for k in ks):
        return "sd35_medium", layout
    if any(qk in k for k in ks) or count_blocks(ks, blocks) > 24:
        return "sd35_large", layout
    return "sd3", layout


def claims(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """True when a key set has SD3 transformer blocks (MMDiT or diffusers names, any prefix)."""
    return detect(keys) is not None


__all__ = [
    "COMFY_PREFIX",
    "DIFFUSERS_PREFIXES",
    "EXCLUDED",
    "EXTRA_PREFIXES",
    "KOHYA_DIFFUSERS_PREFIX",
    "KOHYA_ORIGINAL_PREFIX",
    "LYCORIS_PREFIX",
    "ORIGINAL_PREFIXES",
    "PEFT_BASE_PREFIX",
    "SD3_FAMILIES",
    "SD3Family",
    "SD3Structure",
    "claims",
    "detect",
]
