"""HunyuanVideo (T2V and I2V) transformer, described as data.

Maps are generated from a structure (double / single / token-refiner block counts, hidden size, MLP width,
guidance embedder), as diffusers' ``convert_hunyuan_video_transformer_to_diffusers`` and
``_convert_hunyuan_video_lora_to_diffusers`` derive theirs. Facts, from those and
``HunyuanVideoTransformer3DModel``:

* canonical: ``transformer.<HunyuanVideoTransformer3DModel path>``
  (``transformer.transformer_blocks.0.attn.to_q``, ``transformer.context_embedder.proj_in``).
* original: Tencent's key (``double_blocks.0.img_attn_qkv``: underscores where Flux has dots), bare or
  with ``model.diffusion_model.`` / ``diffusion_model.``. Fused: ``img_attn_qkv`` = to_q, to_k, to_v;
  ``txt_attn_qkv`` = add_q_proj, add_k_proj, add_v_proj; the token refiner's ``self_attn_qkv`` = to_q,
  to_k, to_v (``hidden`` rows each); ``single_blocks.N.linear1`` = to_q, to_k, to_v, proj_mlp (rows
  ``[0:h] [h:2h] [2h:3h] [3h:3h+mlp]``).
* row permutation: ``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear`` only (shift, scale → scale,
  shift). The block modulations (``img_mod.linear``, ``txt_mod.linear``, ``modulation.linear``) and the
  refiner's ``adaLN_modulation.1`` (gates) are copied unchanged.
* not mapped: ``img_in.proj`` ↔ ``x_embedder.proj`` (the patch-embedding Conv3d, a 5-D weight).
* LoRA names: musubi-tuner ``lora_unet_double_blocks_0_img_attn_qkv`` (kohya "original", fused),
  diffusion-pipe / HunyuanVideo ``transformer.double_blocks.0.img_attn_qkv`` and ComfyUI
  ``diffusion_model.double_blocks.0.img_attn_qkv`` (original paths behind ``transformer.`` /
  ``diffusion_model.``: ``comfy/lora.py`` HunyuanVideo section, diffusers'
  ``_convert_hunyuan_video_lora_to_diffusers``), diffusers / PEFT ``transformer.transformer_blocks.0.attn.to_q``,
  OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q``.
* ComfyUI loads Tencent checkpoints into Flux-style module names (``img_attn.qkv``, ``img_mod.lin``,
  ``img_mlp.0``, ``modulation.lin``, ``time_in.in_layer``): ``comfy_internal`` gives that name of an
  original path (``COMFY_INTERNAL_RENAMES``), for checkpoints saved by ComfyUI and its generic LoRA keys;
  ``HunyuanVideoStructure(comfy_names=True)`` describes such a checkpoint (``from_keys`` tells them apart).

Family: ``hunyuan_video`` (T2V: 20 double + 40 single blocks, 2 refiner blocks, hidden 3072, guidance; I2V
has the same Linear layers without the guidance embedder). Detection needs the token refiner, which
no Flux key set has: check HunyuanVideo *before* Flux, whose ``detect`` would also accept HunyuanVideo's
diffusers keys (``transformer_blocks`` + ``single_transformer_blocks.N.proj_mlp``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .dit import DiTFamilyMixin, DiTNaming, blocks_seen, hidden_of
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

#: diffusion-pipe (and HunyuanVideo's own) LoRA keys: ``transformer.`` + the Tencent path
DIFFUSION_PIPE_PREFIX = "transformer."
EXTRA_PREFIXES = (DIFFUSION_PIPE_PREFIX,)
#: Tencent path fragment → ComfyUI's internal (Flux-style) module name fragment, applied in order
COMFY_INTERNAL_RENAMES: tuple[tuple[str, str], ...] = (
    ("txt_in.t_embedder.mlp.0", "txt_in.t_embedder.in_layer"),
    ("txt_in.t_embedder.mlp.2", "txt_in.t_embedder.out_layer"),
    ("txt_in.c_embedder.linear_1", "txt_in.c_embedder.in_layer"),
    ("txt_in.c_embedder.linear_2", "txt_in.c_embedder.out_layer"),
    ("_mod.linear", "_mod.lin"),
    ("_attn_qkv", "_attn.qkv"),
    ("mlp.fc1", "mlp.0"),
    ("mlp.fc2", "mlp.2"),
    ("_attn_proj", "_attn.proj"),
    ("modulation.linear", "modulation.lin"),
    ("_in.mlp.2", "_in.out_layer"),
    ("_in.mlp.0", "_in.in_layer"),
)

REFINER_EMBED_PARTS: tuple[tuple[str, str], ...] = (
    ("context_embedder.time_text_embed.timestep_embedder.linear_1", "txt_in.t_embedder.mlp.0"),
    ("context_embedder.time_text_embed.timestep_embedder.linear_2", "txt_in.t_embedder.mlp.2"),
    ("context_embedder.time_text_embed.text_embedder.linear_1", "txt_in.c_embedder.linear_1"),
    ("context_embedder.time_text_embed.text_embedder.linear_2", "txt_in.c_embedder.linear_2"),
    ("context_embedder.proj_in", "txt_in.input_embedder"),
)
REFINER_QKV = ("self_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
REFINER_PARTS: tuple[tuple[str, str], ...] = (
    ("attn.to_out.0", "self_attn_proj"),
    ("ff.net.0.proj", "mlp.fc1"),
    ("ff.net.2", "mlp.fc2"),
    ("norm_out.linear", "adaLN_modulation.1"),
)
EMBED_PARTS: tuple[tuple[str, str], ...] = (
    ("time_text_embed.timestep_embedder.linear_1", "time_in.mlp.0"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.mlp.2"),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
)
GUIDANCE_PARTS: tuple[tuple[str, str], ...] = (
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.mlp.0"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.mlp.2"),
)
DOUBLE_MODS: tuple[tuple[str, str], ...] = (
    ("norm1.linear", "img_mod.linear"),
    ("norm1_context.linear", "txt_mod.linear"),
)
DOUBLE_QKV = ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v"))
TXT_QKV = ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
# model order of the context projections in diffusers' attention module: add_k, add_v, add_q
TXT_ORDER = ("attn.add_k_proj", "attn.add_v_proj", "attn.add_q_proj")
DOUBLE_PARTS: tuple[tuple[str, str], ...] = (
    ("attn.to_out.0", "img_attn_proj"),
    ("attn.to_add_out", "txt_attn_proj"),
    ("ff.net.0.proj", "img_mlp.fc1"),
    ("ff.net.2", "img_mlp.fc2"),
    ("ff_context.net.0.proj", "txt_mlp.fc1"),
    ("ff_context.net.2", "txt_mlp.fc2"),
)
SINGLE_FUSED = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
NORM_OUT = ("norm_out.linear", "final_layer.adaLN_modulation.1")
PROJ_OUT = ("proj_out", "final_layer.linear")
#: modules of the model deliberately not described, with the reason
EXCLUDED = {
    "x_embedder.proj": "patch-embedding Conv3d img_in.proj (5-D weight, outside ModuleMap's Linear/Conv2d); "
    "musubi-tuner's LoRA targets the double/single blocks only"
}


@dataclass(frozen=True)
class HunyuanVideoStructure:
    """The shape of a HunyuanVideo transformer, enough to generate every module name and row slice.

    ``prefix`` precedes Tencent keys in the checkpoint described (``""``, ``"model.diffusion_model."`` or
    ``"diffusion_model."``). ``comfy_names`` describes a checkpoint saved by ComfyUI, whose keys are its
    internal Flux-style names (``comfy_internal``) instead of Tencent's.
    """

    num_double: int = 20
    num_single: int = 40
    num_refiner: int = 2
    hidden: int = 3072
    mlp_hidden: int = 12288
    guidance: bool = True
    prefix: str = ""
    comfy_names: bool = False

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], prefix: str = "") -> HunyuanVideoStructure:
        """Structure of a diffusers ``HunyuanVideoTransformer3DModel`` config (``dict(transformer.config)``)."""
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return cls(
            num_double=int(config["num_layers"]),
            num_single=int(config["num_single_layers"]),
            num_refiner=int(config.get("num_refiner_layers", 2)),
            hidden=hidden,
            mlp_hidden=int(hidden * float(config.get("mlp_ratio", 4.0))),
            guidance=bool(config.get("guidance_embeds", True)),
            prefix=prefix,
        )

    @classmethod
    def from_keys(cls, keys: Iterable[str] | Mapping[str, Any]) -> HunyuanVideoStructure:
        """Infer the structure from a Tencent or diffusers key set (sizes from shapes when given tensors,
        else HunyuanVideo's)."""
        ks = keyset(keys)
        got = detect(ks)
        if got is None:
            raise ValueError("not a HunyuanVideo transformer key set")
        if got[1] == "diffusers":
            pre = _diffusers_prefix(ks) or ""
            prefix = ""
            dbl, sgl, ref = (
                pre + "transformer_blocks.",
                pre + "single_transformer_blocks.",
                pre + "context_embedder.token_refiner.refiner_blocks.",
            )
            hid_key, mlp_key = (
                pre + "context_embedder.proj_in.weight",
                pre + "transformer_blocks.0.ff.net.0.proj.weight",
            )
            guidance = any(k.startswith(pre + "time_text_embed.guidance_embedder.") for k in ks)
        else:
            prefix, comfy = _original_prefix(ks) or ("", False)
            dbl, sgl, ref = (
                prefix + "double_blocks.",
                prefix + "single_blocks.",
                prefix + "txt_in.individual_token_refiner.blocks.",
            )
            hid_key = prefix + "txt_in.input_embedder.weight"
            mlp_key = prefix + (comfy_internal if comfy else str)("double_blocks.0.img_mlp.fc1.weight")
            guidance = any(k.startswith(prefix + "guidance_in.") for k in ks)
        hidden = rows_of(keys, hid_key) or cls.hidden
        mlp = rows_of(keys, mlp_key) or (cls.mlp_hidden if hidden == cls.hidden else 4 * hidden)
        counts = (count_blocks(ks, dbl), count_blocks(ks, sgl), count_blocks(ks, ref))
        return cls(*counts, hidden, mlp, guidance, prefix, got[1] != "diffusers" and comfy)

    def pairs(self) -> list[Pair]:
        """Every module as ``(diffusers path, Tencent path, rows)``, in ``HunyuanVideoTransformer3DModel`` order
        (ComfyUI's internal path instead of Tencent's when ``comfy_names``)."""
        if self.comfy_names:
            return [
                (d, comfy_internal(o), r)
                for d, o, r in type(self)(**{**self.__dict__, "comfy_names": False}).pairs()
            ]
        h = self.hidden
        out: list[Pair] = [(d, o, None) for d, o in REFINER_EMBED_PARTS]
        for i in range(self.num_refiner):
            d, o = (
                f"context_embedder.token_refiner.refiner_blocks.{i}",
                f"txt_in.individual_token_refiner.blocks.{i}",
            )
            out += [
                (f"{d}.{c}", f"{o}.{orig}", r)
                for c, orig, r in fused_rows(REFINER_QKV[0], REFINER_QKV[1], (h, h, h))
            ]
            out += [(f"{d}.{c}", f"{o}.{orig}", None) for c, orig in REFINER_PARTS]
        out += [(d, o, None) for d, o in EMBED_PARTS]
        if self.guidance:
            out += [(d, o, None) for d, o in GUIDANCE_PARTS]
        for i in range(self.num_double):
            d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
            out += [(f"{d}.{c}", f"{o}.{orig}", None) for c, orig in DOUBLE_MODS]
            out += [
                (f"{d}.{c}", f"{o}.{orig}", r)
                for c, orig, r in fused_rows(DOUBLE_QKV[0], DOUBLE_QKV[1], (h, h, h))
            ]
            txt = {c: (orig, r) for c, orig, r in fused_rows(TXT_QKV[0], TXT_QKV[1], (h, h, h))}
            out += [(f"{d}.{c}", f"{o}.{txt[c][0]}", txt[c][1]) for c in TXT_ORDER]
            out += [(f"{d}.{c}", f"{o}.{orig}", None) for c, orig in DOUBLE_PARTS]
        for i in range(self.num_single):
            d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            lin1 = {
                c: r for c, _, r in fused_rows(SINGLE_FUSED[0], SINGLE_FUSED[1], (h, h, h, self.mlp_hidden))
            }
            out += [
                (f"{d}.{c}", f"{o}.{SINGLE_FUSED[0]}", lin1[c])
                for c in ("attn.to_q", "attn.to_k", "attn.to_v")
            ]
            out.append((f"{d}.norm.linear", f"{o}.modulation.linear", None))
            out.append((f"{d}.proj_mlp", f"{o}.{SINGLE_FUSED[0]}", lin1["proj_mlp"]))
            out.append((f"{d}.proj_out", f"{o}.linear2", None))
        out += [(NORM_OUT[0], NORM_OUT[1], None), (PROJ_OUT[0], PROJ_OUT[1], None)]
        return out

    def row_orders(self) -> dict[str, tuple[tuple[int, int], ...]]:
        """Diffusers paths whose rows are a permutation of the original's: ``norm_out.linear``."""
        return {NORM_OUT[0]: swap_halves(2 * self.hidden)}

    def module_maps(self) -> list[FluxModuleMap]:
        """Every adaptable module (all Linear layers of ``HunyuanVideoTransformer3DModel``), in model order."""
        return build_maps(self.pairs(), self.prefix, self.row_orders())


def comfy_internal(path: str) -> str:
    """ComfyUI's internal (Flux-style) name of a Tencent path: ``double_blocks.0.img_attn_qkv`` →
    ``double_blocks.0.img_attn.qkv``, ``time_in.mlp.0`` → ``time_in.in_layer``."""
    for old, new in COMFY_INTERNAL_RENAMES:
        path = path.replace(old, new)
    return path


def _original_prefix(keys: list[str]) -> tuple[str, bool] | None:
    """``(prefix, comfy_names)`` of a Tencent (``img_attn_qkv``) or ComfyUI-internal (``img_attn.qkv``)
    original key set, or None."""
    for qkv, comfy in (("img_attn_qkv.", False), ("img_attn.qkv.", True)):
        p = find_prefix(
            keys,
            lambda p, ks, qkv=qkv: (
                any_block(ks, p, "double_blocks", qkv)
                and any(k.startswith(p + "txt_in.individual_token_refiner.") for k in ks)
            ),
        )
        if p is not None:
            return p, comfy
    return None


def _diffusers_prefix(keys: list[str]) -> str | None:
    return find_prefix(
        keys,
        lambda p, ks: (
            any_block(ks, p, "transformer_blocks", "attn.add_q_proj.")
            and any(k.startswith(p + "context_embedder.token_refiner.") for k in ks)
        ),
        DIFFUSERS_PREFIXES,
    )


# ------------------------------------------------------------------------------------------ family
class HunyuanVideoNaming(DiTNaming):
    """:class:`DiTNaming` of HunyuanVideo, plus diffusion-pipe's ``transformer.<Tencent path>`` ("original": fused
    names) and ComfyUI's internal ``diffusion_model.<Flux-style path>`` ("comfy") of every module."""

    label = "HunyuanVideo"

    def extra_names(self, module: Any, bare: str) -> list[tuple[str, str]]:
        if self.structure.comfy_names:
            return []
        out = [(DIFFUSION_PIPE_PREFIX + bare, "original")]
        internal = comfy_internal(bare)
        if internal != bare:
            out.append((COMFY_PREFIX + internal, "comfy"))
        return out


#: modules whose input width is the hidden size
_HIDDEN_INPUT = r"(?:^|\.)(?:transformer_blocks|single_transformer_blocks)\.\d+\.(?:attn\.(?:to_[qkv]|add_[qkv]_proj)|proj_mlp)$"


@dataclass(frozen=True)
class HunyuanVideoFamily(DiTFamilyMixin):
    """One HunyuanVideo variant: its name, description and default structure."""

    naming_class = HunyuanVideoNaming

    name: str
    description: str
    default: HunyuanVideoStructure

    def structure_for_shapes(self, seen: Mapping[str, tuple[int, ...]]) -> HunyuanVideoStructure | None:
        """Hidden size from a block's q/k/v or MLP input width, MLP width from ``proj_mlp`` (or ``linear1``'s rows
        less 3 hidden); block counts at least the default's."""
        hidden = hidden_of(seen, _HIDDEN_INPUT)
        if hidden is None:
            return None
        mlp = next((abs(s[0]) - (3 * hidden if s[0] < 0 else 0) for p, s in seen.items()
                    if p.endswith(".proj_mlp")), 4 * hidden)
        d = self.default
        return HunyuanVideoStructure(
            max(d.num_double, blocks_seen(seen, "transformer_blocks")),
            max(d.num_single, blocks_seen(seen, "single_transformer_blocks")),
            max(d.num_refiner, blocks_seen(seen, "refiner_blocks")),
            hidden, mlp, d.guidance, d.prefix,
        )


HUNYUAN_VIDEO_FAMILIES: dict[str, HunyuanVideoFamily] = {
    "hunyuan_video": HunyuanVideoFamily(
        "hunyuan_video",
        "HunyuanVideo T2V / I2V: 20 double + 40 single blocks, 2 token-refiner blocks, hidden 3072",
        HunyuanVideoStructure(),
    )
}


# --------------------------------------------------------------------------------------- detection
def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """Which HunyuanVideo family and layout a *checkpoint* key set is: ``(family, layout)`` or None.

    Original: ``[model.diffusion_model.|diffusion_model.]double_blocks.N.img_attn_qkv`` (or ComfyUI's
    internal ``img_attn.qkv``) with ``txt_in.individual_token_refiner``; diffusers: ``[transformer.]transformer_blocks.N.attn.add_q_proj``
    with ``context_embedder.token_refiner``. Flux (no token refiner, ``img_attn.qkv``) never answers.
    """
    ks = keyset(keys)
    got = _original_prefix(ks)
    if got is not None:
        return "hunyuan_video", layout_of(got[0])
    if _diffusers_prefix(ks) is not None:
        return "hunyuan_video", "diffusers"
    return None


def claims(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """True when a key set has HunyuanVideo transformer blocks (Tencent or diffusers names, any prefix)."""
    return detect(keys) is not None


__all__ = [
    "COMFY_INTERNAL_RENAMES",
    "COMFY_PREFIX",
    "DIFFUSERS_PREFIXES",
    "DIFFUSION_PIPE_PREFIX",
    "EXCLUDED",
    "EXTRA_PREFIXES",
    "HUNYUAN_VIDEO_FAMILIES",
    "HunyuanVideoFamily",
    "HunyuanVideoStructure",
    "KOHYA_DIFFUSERS_PREFIX",
    "KOHYA_ORIGINAL_PREFIX",
    "LYCORIS_PREFIX",
    "ORIGINAL_PREFIXES",
    "claims",
    "comfy_internal",
    "detect",
]
