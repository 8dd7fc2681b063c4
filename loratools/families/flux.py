"""Flux.1 (dev / schnell) transformer, described as data.

Every name map is *generated* from a structure (number of double and single blocks, hidden size, MLP
width, guidance embedder), the way diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` and
ComfyUI's ``comfy.utils.flux_to_diffusers`` derive theirs. A structure comes from a family default
(Flux.1-dev: 19 double, 38 single blocks, hidden 3072, MLP 12288, guidance; schnell: no guidance) or
from a checkpoint's key set (``FluxStructure.from_keys``).

Conventions mapped, for one adaptable Linear of the transformer:

* canonical: the diffusers ``FluxTransformer2DModel`` path with component ``transformer.``,
  ``transformer.transformer_blocks.0.attn.to_q``, ``transformer.single_transformer_blocks.0.proj_mlp``.
* original: the BFL checkpoint key (``double_blocks.0.img_attn.qkv``), bare as BFL ships it, or with
  ``model.diffusion_model.`` / ``diffusion_model.`` in front (ComfyUI-saved files). Fused tensors hold
  several canonical modules by rows: ``img_attn.qkv`` / ``txt_attn.qkv`` = q, k, v (``hidden`` rows
  each); ``single_blocks.N.linear1`` = q, k, v, proj_mlp (rows ``[0:h] [h:2h] [2h:3h] [3h:3h+mlp]``).
* row permutation: ``final_layer.adaLN_modulation.1`` ↔ ``norm_out.linear``. BFL's final layer splits the
  modulation into (shift, scale), diffusers' ``AdaLayerNormContinuous`` into (scale, shift), so diffusers
  swaps the two row halves (``swap_scale_shift`` in its single-file converter, in its kohya LoRA
  converter for ``lora_up`` and in ComfyUI's ``flux_to_diffusers``). It is an exact mapping, carried as
  ``FluxModuleMap.row_order = ((h, 2h), (0, h))``: use ``take_rows`` / ``place_rows``, never copy the
  tensor as is. The block modulations (``img_mod.lin``, ``txt_mod.lin``, ``modulation.lin``) are in the
  same order in both (shift, scale, gate[, shift, scale, gate]): diffusers copies them unchanged.
* LoRA names: kohya / sd-scripts ``lora_unet_double_blocks_0_img_attn_qkv`` ("kohya_original": one
  name for a fused tensor), OneTrainer ``lora_transformer_transformer_blocks_0_attn_to_q``
  ("kohya_diffusers"), SimpleTuner LyCORIS ``lycoris_transformer_blocks_0_attn_to_q`` ("lycoris"),
  diffusers / PEFT ``transformer.transformer_blocks.0.attn.to_q`` and DiffSynth's bare path
  ("diffusers"), ComfyUI ``diffusion_model.double_blocks.0.img_attn.qkv`` plus its
  ``diffusion_model.single_blocks.0.linear1_qkv`` (rows ``[0:3h]`` of linear1) ("comfy"), and the
  checkpoint key itself ("original"). These are the keys ComfyUI's ``comfy/lora.py``
  (``model_lora_keys_unet``, Flux section) and diffusers' ``_convert_kohya_flux_lora_to_diffusers`` read.

``lookup`` / ``resolve`` answer names of exactly one module (as in ``sd``); a fused name (``…qkv``,
``…linear1``) names several: ``lookup_group`` answers every name, ``by_original`` lists the modules of a
fused checkpoint tensor in row order, ``fused_name`` gives a writer the fused original of a module.

Only the transformer is described; Flux's text encoders (CLIP-L, T5-XXL) are not. Imports nothing from
``loratools.formats``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from .base import ModuleMap
from .dit import ORIGINAL_PREFIXES, DiTNaming, adapter_hits, component_keys, strip_prefix  # noqa: F401  (re-exported)

#: prefixes a BFL transformer key may carry in a checkpoint (longest first)
COMFY_PREFIX = "diffusion_model."

# diffusers child ↔ BFL child, for the unfused modules of a double block
DOUBLE_PARTS: tuple[tuple[str, str], ...] = (
    ("norm1.linear", "img_mod.lin"),
    ("norm1_context.linear", "txt_mod.lin"),
    ("attn.to_out.0", "img_attn.proj"),
    ("attn.to_add_out", "txt_attn.proj"),
    ("ff.net.0.proj", "img_mlp.0"),
    ("ff.net.2", "img_mlp.2"),
    ("ff_context.net.0.proj", "txt_mlp.0"),
    ("ff_context.net.2", "txt_mlp.2"),
)
# fused q, k, v of a double block: BFL tensor → diffusers children in row order
DOUBLE_FUSED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
)
SINGLE_FUSED = ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
SINGLE_PARTS: tuple[tuple[str, str], ...] = (("norm.linear", "modulation.lin"), ("proj_out", "linear2"))
# top-level modules (diffusers ↔ BFL), guidance only for dev
EMBED_PARTS: tuple[tuple[str, str], ...] = (
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
)
GUIDANCE_PARTS: tuple[tuple[str, str], ...] = (
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
)
INPUT_PARTS: tuple[tuple[str, str], ...] = (
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
    ("context_embedder", "txt_in"),
    ("x_embedder", "img_in"),
)
NORM_OUT = ("norm_out.linear", "final_layer.adaLN_modulation.1")
PROJ_OUT = ("proj_out", "final_layer.linear")


@dataclass(frozen=True)
class FluxModuleMap(ModuleMap):
    """A ``ModuleMap`` that may also permute rows.

    ``row_order``, when set, lists row blocks of the original tensor whose concatenation, in that order,
    is the canonical weight (and bias, and a LoRA ``up`` factor): ``((h, 2h), (0, h))`` for
    ``norm_out.linear``. ``rows`` is then None (the whole tensor, reordered). Use ``take_rows`` /
    ``place_rows`` for every module: they handle plain, fused and permuted maps alike.
    """

    row_order: tuple[tuple[int, int], ...] | None = None

    @property
    def fused(self) -> bool:
        """True when the original tensor also holds other modules (a row slice of it is this module)."""
        return self.rows is not None

    @property
    def permuted(self) -> bool:
        """True when the canonical rows are a reordering of the original's (``norm_out.linear``)."""
        return self.row_order is not None

    def row_blocks(self) -> tuple[tuple[int, int], ...] | None:
        """Original row blocks forming the canonical rows, in order; None for a plain 1:1 copy."""
        if self.row_order is not None:
            return self.row_order
        return (self.rows,) if self.rows is not None else None


def take_rows(m: ModuleMap, original: Any) -> Any:
    """The canonical tensor of module ``m`` from its original tensor (weight, bias or LoRA up factor)."""
    blocks = m.row_blocks() if isinstance(m, FluxModuleMap) else ((m.rows,) if m.rows else None)
    if blocks is None:
        return original
    if len(blocks) == 1:
        a, b = blocks[0]
        return original[a:b]
    import torch

    return torch.cat([original[a:b] for a, b in blocks], dim=0)


def place_rows(m: ModuleMap, canonical: Any, out: Any) -> None:
    """Write module ``m``'s canonical tensor into its rows of ``out`` (an original-layout tensor)."""
    blocks = m.row_blocks() if isinstance(m, FluxModuleMap) else ((m.rows,) if m.rows else None)
    if blocks is None:
        out[...] = canonical
        return
    i = 0
    for a, b in blocks:
        out[a:b] = canonical[i : i + b - a]
        i += b - a


# --------------------------------------------------------------------------------------- structure
@dataclass(frozen=True)
class FluxStructure:
    """The shape of a Flux.1 transformer, enough to generate every module name and row slice.

    ``prefix`` is what precedes BFL keys in the checkpoint described (``""`` as BFL ships them,
    ``"model.diffusion_model."`` or ``"diffusion_model."`` in ComfyUI-saved files).
    """

    num_double: int = 19
    num_single: int = 38
    hidden: int = 3072
    mlp_hidden: int = 12288
    guidance: bool = True
    prefix: str = ""

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], prefix: str = "") -> FluxStructure:
        """Structure of a diffusers ``FluxTransformer2DModel`` config (``dict(transformer.config)``)."""
        hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        return cls(
            num_double=int(config["num_layers"]),
            num_single=int(config["num_single_layers"]),
            hidden=hidden,
            mlp_hidden=int(hidden * float(config.get("mlp_ratio", 4.0))),
            guidance=bool(config.get("guidance_embeds", False)),
            prefix=prefix,
        )

    @classmethod
    def from_keys(cls, keys: Iterable[str] | Mapping[str, Any]) -> FluxStructure:
        """Infer the structure from a BFL or diffusers key set.

        Block counts from the block indices present, guidance from ``guidance_in`` /
        ``guidance_embedder``; hidden and MLP sizes from the tensors' shapes when given a mapping of
        things with ``.shape`` (``img_in`` / ``x_embedder`` rows, first image MLP rows), else Flux.1's.
        """
        ks = _keyset(keys)
        got = detect(ks)
        if got is None:
            raise ValueError("not a Flux.1 transformer key set")
        layout = got[1]
        if layout == "diffusers":
            pre = "transformer." if any(k.startswith("transformer.") for k in ks) else ""
            dbl, sgl = pre + "transformer_blocks.", pre + "single_transformer_blocks."
            hid_key, mlp_key = pre + "x_embedder.weight", pre + "transformer_blocks.0.ff.net.0.proj.weight"
            guidance = any("guidance_embedder." in k for k in ks)
            prefix = ""
        else:
            prefix = _original_prefix(ks)
            dbl, sgl = prefix + "double_blocks.", prefix + "single_blocks."
            hid_key, mlp_key = prefix + "img_in.weight", prefix + "double_blocks.0.img_mlp.0.weight"
            guidance = any(k.startswith(prefix + "guidance_in.") for k in ks)
        hidden, mlp = cls.hidden, cls.mlp_hidden
        if isinstance(keys, Mapping):
            shape = getattr(keys.get(hid_key), "shape", None)
            if shape is not None:
                hidden = int(shape[0])
            shape = getattr(keys.get(mlp_key), "shape", None)
            if shape is not None:
                mlp = int(shape[0])
            elif hidden != cls.hidden:
                mlp = 4 * hidden
        return cls(_count(ks, dbl), _count(ks, sgl), hidden, mlp, guidance, prefix)

    def pairs(self) -> list[tuple[str, str, tuple[int, int] | None]]:
        """Every module as ``(diffusers path, BFL path, rows)``, in ``FluxTransformer2DModel`` order."""
        h = self.hidden
        out: list[tuple[str, str, tuple[int, int] | None]] = [(d, o, None) for d, o in EMBED_PARTS]
        if self.guidance:
            out += [(d, o, None) for d, o in GUIDANCE_PARTS]
        out += [(d, o, None) for d, o in INPUT_PARTS]
        for i in range(self.num_double):
            d, o = f"transformer_blocks.{i}", f"double_blocks.{i}"
            part = dict(DOUBLE_PARTS)
            out += [(f"{d}.{c}", f"{o}.{part[c]}", None) for c in ("norm1.linear", "norm1_context.linear")]
            for (orig, children), outp in zip(DOUBLE_FUSED, ("attn.to_out.0", "attn.to_add_out")):
                out += [(f"{d}.{c}", f"{o}.{orig}", (j * h, (j + 1) * h)) for j, c in enumerate(children)]
                out.append((f"{d}.{outp}", f"{o}.{part[outp]}", None))
            out += [
                (f"{d}.{c}", f"{o}.{part[c]}", None)
                for c in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
            ]
        orig, children = SINGLE_FUSED
        sizes = (h, h, h, self.mlp_hidden)
        starts = (0, h, 2 * h, 3 * h)
        for i in range(self.num_single):
            d, o = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            out.append((f"{d}.norm.linear", f"{o}.modulation.lin", None))
            out.append((f"{d}.proj_mlp", f"{o}.{orig}", (starts[3], starts[3] + sizes[3])))
            out.append((f"{d}.proj_out", f"{o}.linear2", None))
            out += [
                (f"{d}.{c}", f"{o}.{orig}", (starts[j], starts[j] + sizes[j]))
                for j, c in enumerate(children[:3])
            ]
        out += [(NORM_OUT[0], NORM_OUT[1], None), (PROJ_OUT[0], PROJ_OUT[1], None)]
        return out

    def module_maps(self) -> list[FluxModuleMap]:
        """Every adaptable module (all Linear layers of ``FluxTransformer2DModel``), in model order."""
        h = self.hidden
        out = []
        for d, o, rows in self.pairs():
            orig = self.prefix + o
            row_order = ((h, 2 * h), (0, h)) if d == NORM_OUT[0] else None
            out.append(FluxModuleMap(f"transformer.{d}", orig, rows, f"{orig}.weight", row_order=row_order))
        return out


def _count(keys: list[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx, default=-1) + 1


def _keyset(keys: Iterable[str] | Mapping[str, Any]) -> list[str]:
    return list(keys.keys()) if isinstance(keys, Mapping) else list(keys)


def _original_prefix(keys: list[str]) -> str:
    for p in ORIGINAL_PREFIXES:
        if any(k.startswith(p + "double_blocks.") or k.startswith(p + "single_blocks.") for k in keys):
            return p
    return ""


# ------------------------------------------------------------------------------------------ family
@dataclass(frozen=True)
class FluxFamily:
    """One Flux.1 variant: its name, description and default structure."""

    name: str
    description: str
    default: FluxStructure
    #: the family whose text-encoder names describe this one's CLIP-L (``text_encoder``): kohya ``lora_te1_`` /
    #: ``lora_te_`` layers of Flux LoRAs are SD1.x's CLIP-L layers (T5 is not described)
    text_encoder_family: str = "sd15"
    #: sd-scripts' kohya prefix of Flux's CLIP-L layers (``lora_te1_``; T5 would be ``lora_te3_``)
    kohya_text_encoder_prefix: str = "lora_te1_"

    def naming(self, keys: Iterable[str] | Mapping[str, Any] | None = None) -> FluxNaming:
        """Name maps for the default structure, or for the structure of a checkpoint key set."""
        if keys is None:
            return _default_naming(self.name)
        return FluxNaming(self, FluxStructure.from_keys(keys))

    def detect(self, keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
        """``(name, layout)`` when a checkpoint key set is this family, else None."""
        got = detect(keys)
        return got if got is not None and got[0] == self.name else None

    def pipeline_naming(self, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str] | Mapping[str, Any]):
        """Name maps of a diffusers pipeline folder's transformer (its structure from its ``transformer.`` keys)."""
        return FluxNaming(self, FluxStructure.from_keys(component_keys(keys, "transformer")))

    def naming_for_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> FluxNaming:
        """Name maps in the structure an *adapter's* layers imply: ``shapes`` maps layer names (any convention,
        fused ones included) to ΔW shapes. The hidden size comes from the input width of a block's q/k/v,
        modulation or MLP input, the MLP width from ``proj_mlp`` (or ``linear1``); block counts are at least the
        default's. The default structure where the layers tell nothing."""
        nm = _default_naming(self.name)
        hidden = mlp = None
        counts = {"transformer_blocks": self.default.num_double, "single_transformer_blocks": self.default.num_single}
        fused_rows: list[int] = []
        for name, shape in shapes.items():
            got = nm.lookup_group(name)
            if got is None or len(shape) != 2:
                continue
            mods = got[0]
            for m in mods:
                block = re.match(r"transformer\.((?:single_)?transformer_blocks)\.(\d+)\.", m.canonical)
                if block:
                    counts[block.group(1)] = max(counts[block.group(1)], int(block.group(2)) + 1)
            path = mods[0].path
            if _HIDDEN_INPUT.search(path):
                hidden = int(shape[1])
            if len(mods) == 1 and path.endswith(".proj_mlp"):
                mlp = int(shape[0])
            if len(mods) == 4:
                fused_rows.append(int(shape[0]))
        if hidden is None:
            return nm
        if mlp is None:
            mlp = fused_rows[0] - 3 * hidden if fused_rows else 4 * hidden
        st = FluxStructure(counts["transformer_blocks"], counts["single_transformer_blocks"], hidden, mlp,
                           self.default.guidance)
        return nm if st == self.default else FluxNaming(self, st)


#: modules whose input width is the hidden size (a block's attention projections, modulation and MLP input)
_HIDDEN_INPUT = re.compile(r"(?:attn\.(?:to_[qkv]|add_[qkv]_proj)|proj_mlp|norm1(?:_context)?\.linear|norm\.linear"
                           r"|ff(?:_context)?\.net\.0\.proj)$")


FLUX_FAMILIES: dict[str, FluxFamily] = {
    f.name: f
    for f in (
        FluxFamily(
            "flux_dev",
            "Flux.1-dev (and Kontext/Fill/Krea variants): 19 double + 38 single blocks, hidden 3072, guidance",
            FluxStructure(),
        ),
        FluxFamily(
            "flux_schnell",
            "Flux.1-schnell: 19 double + 38 single blocks, hidden 3072, no guidance embedder",
            FluxStructure(guidance=False),
        ),
    )
}


# --------------------------------------------------------------------------------------- detection
def claims(keys: Iterable[str] | Mapping[str, Any]) -> bool:
    """True when a key set has Flux transformer blocks (BFL or diffusers names, any prefix)."""
    return detect(keys) is not None


def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """Which Flux.1 family and layout a *checkpoint* key set is: ``(family, layout)`` or None.

    Layouts as ``base.LAYOUTS``: "original" (``model.diffusion_model.double_blocks…``),
    "original_unprefixed" (``diffusion_model.double_blocks…`` or BFL's bare ``double_blocks…``),
    "diffusers" (``[transformer.]transformer_blocks.N.attn…`` with ``single_transformer_blocks``). The
    family is dev when a guidance embedder is present, else schnell. Needs both block kinds with their
    Flux children (``img_attn`` / ``linear1``; ``attn.add_q_proj`` / ``proj_mlp``), so no SD key set (nor
    SD3's ``joint_blocks``) answers.
    """
    ks = _keyset(keys)
    for p in ORIGINAL_PREFIXES:
        dbl = any(k.startswith(p + "double_blocks.") and ".img_attn." in k for k in ks)
        sgl = any(k.startswith(p + "single_blocks.") and ".linear1." in k for k in ks)
        if dbl and sgl:
            layout = "original" if p == "model.diffusion_model." else "original_unprefixed"
            guided = any(k.startswith(p + "guidance_in.") for k in ks)
            return ("flux_dev" if guided else "flux_schnell", layout)
    for p in ("transformer.", ""):
        dbl = any(k.startswith(p + "transformer_blocks.") and ".attn.add_q_proj." in k for k in ks)
        sgl = any(k.startswith(p + "single_transformer_blocks.") and ".proj_mlp." in k for k in ks)
        if dbl and sgl:
            guided = any(k.startswith(p + "time_text_embed.guidance_embedder.") for k in ks)
            return ("flux_dev" if guided else "flux_schnell", "diffusers")
    return None


# ------------------------------------------------------------------------------------------ naming
class FluxNaming(DiTNaming):
    """All name conventions of one Flux structure (:class:`DiTNaming`), plus ComfyUI's
    ``diffusion_model.single_blocks.N.linear1_qkv`` (rows ``[0:3h]`` of linear1: q, k, v)."""

    label = "Flux"

    def __init__(self, family: FluxFamily, structure: FluxStructure) -> None:
        super().__init__(family, structure)

    def extra_groups(self) -> dict[str, tuple[tuple[str, ...], str]]:
        out = {}
        for bfl, group in self._by_original.items():
            if bfl.endswith(".linear1"):
                qkv = tuple(g.canonical for g in group if not g.path.endswith("proj_mlp"))
                out[f"{COMFY_PREFIX}{bfl}_qkv"] = (qkv, "comfy")
        return out


@cache
def _default_naming(name: str) -> FluxNaming:
    fam = FLUX_FAMILIES[name]
    return FluxNaming(fam, fam.default)


def naming(
    family: str | None = "flux_dev", keys: Iterable[str] | Mapping[str, Any] | None = None
) -> FluxNaming:
    """Name maps of a family's default structure, or of a checkpoint key set (family detected if None)."""
    if keys is not None and family is None:
        got = detect(keys)
        if got is None:
            raise ValueError("not a Flux.1 transformer key set")
        family = got[0]
    return FLUX_FAMILIES[family].naming(keys)


def module_maps(keys: Iterable[str] | Mapping[str, Any]) -> list[FluxModuleMap]:
    """Every adaptable module of a Flux checkpoint, structure inferred from its keys (and shapes)."""
    return FluxStructure.from_keys(keys).module_maps()


def detect_adapter_hits(keys: Iterable[str]) -> tuple[str, str, int] | None:
    """``(family, convention, modules)`` of an adapter's keys: how many transformer modules it names.

    Scored over both families; a tie (no ``guidance_in`` names, the usual case) goes to flux_dev, since
    dev and schnell share every other name. Convention: the most common among the resolved names.
    """
    return adapter_hits(keys, FLUX_FAMILIES)


def detect_adapter(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(family, convention)`` of an adapter's keys, or None if they name no Flux transformer module."""
    got = detect_adapter_hits(keys)
    return got[:2] if got else None
