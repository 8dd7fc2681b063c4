"""Stable Diffusion 1.x, 2.x, XL and XL-refiner checkpoints, described as data.

Every name map here is *generated* from a structure (number of down blocks, layers per block, which
blocks have attentions and how deep their transformers are, text-encoder layer counts), the way
diffusers' ``convert_ldm_unet_checkpoint`` and ComfyUI's ``unet_to_diffusers`` derive theirs; no list
of module names is typed out. A structure comes either from a family's defaults (the released
models) or from the key set of an actual checkpoint (``UNetStructure.from_keys``).

Conventions mapped, for one adaptable module (a Linear or Conv2d weight):

* canonical: diffusers pipeline path, ``unet.down_blocks.0.attentions.0.proj_in``,
  ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, ``text_encoder_2.…`` (SDXL bigG).
* original: the single-file checkpoint module key, ``model.diffusion_model.input_blocks.1.1.proj_in``,
  ``cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj``,
  ``conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj`` (q, k, v fused by rows).
* kohya stems, ``.`` mangled to ``_``: "diffusers" style ``lora_unet_down_blocks_0_attentions_0_proj_in``
  (what sd-scripts writes for SD1.x/2.x, trained on the diffusers UNet) and "original" style
  ``lora_unet_input_blocks_1_1_proj_in`` (what sd-scripts writes for SDXL, trained on its sgm UNet).
  Text encoders: ``lora_te_…`` (SD1.x/2.x), ``lora_te1_…`` / ``lora_te2_…`` (SDXL), the HF path mangled.
* ComfyUI: ``diffusion_model.input_blocks.1.1.proj_in`` and
  ``text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj`` (``clip_h`` for SD2,
  ``clip_g`` for SDXL's bigG), the generic keys ComfyUI's ``comfy/lora.py`` (``model_lora_keys_unet``,
  ``model_lora_keys_clip``) accepts for every weight of its models.

Imports nothing from ``loratools.formats``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

from .base import ModuleMap

UNET_KEY = "model.diffusion_model."
UNET_KEY_UNPREFIXED = "diffusion_model."
VAE_KEYS = ("first_stage_model.", "vae.")

# diffusers ResnetBlock2D Linear/Conv2d children ↔ LDM ResBlock children (as in diffusers'
# update_unet_resnet_ldm_to_diffusers and ComfyUI's UNET_MAP_RESNET); the shortcut exists only where
# the channel count changes.
RESNET_PARTS: tuple[tuple[str, str], ...] = (
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv2", "out_layers.3"),
)
RESNET_SHORTCUT = ("conv_shortcut", "skip_connection")
# Transformer2DModel / SpatialTransformer: same child names in both layouts.
ATTENTION_OUTER = ("proj_in", "proj_out")
TRANSFORMER_BLOCK_PARTS: tuple[str, ...] = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
) + ("ff.net.0.proj", "ff.net.2")
# CLIP encoder layer Linear children (HF names).
CLIP_LAYER_PARTS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
# OpenCLIP resblock ↔ HF encoder layer (diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"]);
# q/k/v are the three row blocks of attn.in_proj_weight, in that order.
OPEN_CLIP_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
OPEN_CLIP_PARTS = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


# --------------------------------------------------------------------------------------------- UNet
@dataclass(frozen=True)
class UNetStructure:
    """The block structure of an SD UNet, enough to generate every module name.

    ``down_depths[b][j]`` is the transformer depth of the attention after resnet ``j`` of down block ``b``
    (0: no attention); ``up_depths[b][j]`` the same for up block ``b`` (``layers_per_block + 1``
    layers); ``*_shortcut`` whether that resnet has a 1x1 shortcut conv. Every block but the last has a
    downsampler / upsampler. ``add_embedding``: SDXL's ``label_emb`` / ``add_embedding`` MLP.
    """

    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    mid_depth: int
    down_shortcut: tuple[tuple[bool, ...], ...]
    up_shortcut: tuple[tuple[bool, ...], ...]
    add_embedding: bool = False

    @property
    def num_blocks(self) -> int:
        return len(self.down_depths)

    @property
    def layers_per_block(self) -> int:
        return len(self.down_depths[0])

    @classmethod
    def from_config(
        cls,
        block_out_channels: Sequence[int],
        layers_per_block: int,
        depths: Sequence[int],
        mid_depth: int,
        add_embedding: bool = False,
    ) -> UNetStructure:
        """Structure of a UNet built like diffusers' ``UNet2DConditionModel``.

        ``depths[b]`` is down block ``b``'s transformer depth (0 for a ``DownBlock2D``); up blocks mirror
        it reversed. Down resnet 0 has a shortcut when the channel count changes; every up resnet has
        one (its input is concatenated with a skip).
        """
        nb, lpb = len(block_out_channels), layers_per_block
        down_sc = tuple(
            tuple(j == 0 and (block_out_channels[max(b - 1, 0)] != block_out_channels[b]) for j in range(lpb))
            for b in range(nb)
        )
        return cls(
            down_depths=tuple((int(depths[b]),) * lpb for b in range(nb)),
            up_depths=tuple((int(depths[nb - 1 - u]),) * (lpb + 1) for u in range(nb)),
            mid_depth=int(mid_depth),
            down_shortcut=down_sc,
            up_shortcut=tuple((True,) * (lpb + 1) for _ in range(nb)),
            add_embedding=add_embedding,
        )

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any]) -> UNetStructure:
        """Structure of a diffusers ``UNet2DConditionModel`` config dict (``dict(unet.config)``)."""
        types = list(config["down_block_types"])
        lpb = config["layers_per_block"]
        if not isinstance(lpb, int):
            raise ValueError("per-block layers_per_block is not an SD UNet")
        tl = config.get("transformer_layers_per_block", 1)
        tl = [tl] * len(types) if isinstance(tl, int) else list(tl)
        depths = [tl[b] if "CrossAttn" in t else 0 for b, t in enumerate(types)]
        mid = tl[-1] if "CrossAttn" in str(config.get("mid_block_type") or "UNetMidBlock2DCrossAttn") else 0
        return cls.from_config(
            config["block_out_channels"], lpb, depths, mid, config.get("addition_embed_type") == "text_time"
        )

    @classmethod
    def from_keys(cls, keys: Iterable[str]) -> UNetStructure:
        """Infer the structure from UNet tensor keys relative to the UNet (``input_blocks.1.1.proj_in.weight``).

        Layers per block come from the first downsampler (``input_blocks.{lpb+1}.0.op``), the block count
        from the number of input blocks, depths from the ``transformer_blocks`` indices present.
        """
        rx = re.compile(r"^(input_blocks|output_blocks|middle_block)\.(\d+)\.(.+)$")
        depth: dict[tuple[str, int], int] = {}
        seen: dict[str, set[int]] = {"input_blocks": set(), "output_blocks": set(), "middle_block": set()}
        ops: set[int] = set()
        shortcut: set[tuple[str, int]] = set()
        add_embedding = False
        for k in keys:
            if k.startswith("label_emb.0.0."):
                add_embedding = True
            m = rx.match(k)
            if not m:
                continue
            kind, n, rest = m.group(1), int(m.group(2)), m.group(3)
            seen[kind].add(n)
            if rest.startswith("0.op."):
                ops.add(n)
            elif rest.startswith("0.skip_connection."):
                shortcut.add((kind, n))
            if kind == "middle_block":
                inner = rest if n == 1 else ""
            else:
                inner = rest[2:] if rest.startswith("1.") else ""
            t = re.match(r"transformer_blocks\.(\d+)\.", inner)
            if t:
                depth[(kind, n)] = max(depth.get((kind, n), 0), int(t.group(1)) + 1)
        if not seen["input_blocks"]:
            raise ValueError("no UNet input_blocks keys")
        n_in = max(seen["input_blocks"]) + 1
        lpb = min(ops) - 1 if ops else n_in - 1
        nb, rem = divmod(n_in, lpb + 1)
        n_out = max(seen["output_blocks"], default=-1) + 1
        if rem or nb < 1 or n_out != nb * (lpb + 1):
            raise ValueError(
                f"UNet keys do not form an SD block structure ({n_in} input blocks, {n_out} output blocks, "
                f"{lpb} layers per block)"
            )
        if sorted(ops) != [(b + 1) * (lpb + 1) for b in range(nb - 1)]:
            raise ValueError("UNet downsamplers are not at the end of every block but the last")
        return cls(
            down_depths=tuple(
                tuple(depth.get(("input_blocks", 1 + b * (lpb + 1) + j), 0) for j in range(lpb))
                for b in range(nb)
            ),
            up_depths=tuple(
                tuple(depth.get(("output_blocks", u * (lpb + 1) + j), 0) for j in range(lpb + 1))
                for u in range(nb)
            ),
            mid_depth=depth.get(("middle_block", 1), 0),
            down_shortcut=tuple(
                tuple(("input_blocks", 1 + b * (lpb + 1) + j) in shortcut for j in range(lpb))
                for b in range(nb)
            ),
            up_shortcut=tuple(
                tuple(("output_blocks", u * (lpb + 1) + j) in shortcut for j in range(lpb + 1))
                for u in range(nb)
            ),
            add_embedding=add_embedding,
        )

    def pairs(self) -> list[tuple[str, str]]:
        """Every adaptable module as ``(diffusers path, LDM path)``, both relative to the UNet.

        Index arithmetic as in diffusers' ``convert_ldm_unet_checkpoint``: down resnet ``j`` of block
        ``b`` is ``input_blocks.{1 + b(lpb+1) + j}.0`` (its attention ``….1``), the downsampler
        ``input_blocks.{(b+1)(lpb+1)}.0.op``; up layer ``j`` of block ``u`` is
        ``output_blocks.{u(lpb+1) + j}``, the upsampler ``….{2 if that layer has an attention else 1}.conv``;
        mid ``resnets.0/attentions.0/resnets.1`` are ``middle_block.0/1/2``.
        """
        if self.mid_depth < 1:
            raise ValueError("an SD UNet has a cross-attention mid block")
        out: list[tuple[str, str]] = [
            ("time_embedding.linear_1", "time_embed.0"),
            ("time_embedding.linear_2", "time_embed.2"),
        ]
        if self.add_embedding:
            out += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]
        out.append(("conv_in", "input_blocks.0.0"))
        nb, lpb = self.num_blocks, self.layers_per_block
        for b in range(nb):
            for j in range(lpb):
                n = 1 + b * (lpb + 1) + j
                out += _resnet(
                    f"down_blocks.{b}.resnets.{j}", f"input_blocks.{n}.0", self.down_shortcut[b][j]
                )
                out += _attention(
                    f"down_blocks.{b}.attentions.{j}", f"input_blocks.{n}.1", self.down_depths[b][j]
                )
            if b < nb - 1:
                out.append(
                    (f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{(b + 1) * (lpb + 1)}.0.op")
                )
        out += _resnet("mid_block.resnets.0", "middle_block.0", False)
        out += _attention("mid_block.attentions.0", "middle_block.1", self.mid_depth)
        out += _resnet("mid_block.resnets.1", "middle_block.2", False)
        for u in range(nb):
            for j in range(lpb + 1):
                n = u * (lpb + 1) + j
                out += _resnet(f"up_blocks.{u}.resnets.{j}", f"output_blocks.{n}.0", self.up_shortcut[u][j])
                out += _attention(
                    f"up_blocks.{u}.attentions.{j}", f"output_blocks.{n}.1", self.up_depths[u][j]
                )
            if u < nb - 1:
                n = u * (lpb + 1) + lpb
                idx = 2 if self.up_depths[u][lpb] else 1
                out.append((f"up_blocks.{u}.upsamplers.0.conv", f"output_blocks.{n}.{idx}.conv"))
        out.append(("conv_out", "out.2"))
        return out


def _resnet(d: str, o: str, shortcut: bool) -> list[tuple[str, str]]:
    parts = RESNET_PARTS + ((RESNET_SHORTCUT,) if shortcut else ())
    return [(f"{d}.{a}", f"{o}.{b}") for a, b in parts]


def _attention(d: str, o: str, depth: int) -> list[tuple[str, str]]:
    if depth <= 0:
        return []
    names = list(ATTENTION_OUTER) + [
        f"transformer_blocks.{t}.{p}" for t in range(depth) for p in TRANSFORMER_BLOCK_PARTS
    ]
    return [(f"{d}.{n}", f"{o}.{n}") for n in names]


# ------------------------------------------------------------------------------------ text encoders
@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and where the original single file keeps it.

    ``kind`` is ``"clip"`` (HF layout in the file, same child names) or ``"open_clip"`` (``resblocks``,
    fused ``attn.in_proj_weight`` whose rows ``[0:h]``, ``[h:2h]``, ``[2h:3h]`` are q, k, v — ``hidden``
    is ``h``). ``comfy`` is ComfyUI's CLIP name (``clip_l``/``clip_h``/``clip_g``). ``skip_layers`` are
    layers present in the file but absent from diffusers' model (SD2: resblocks.23, diffusers'
    ``SD_2_TEXT_ENCODER_KEYS_TO_IGNORE``). ``projection``: the (transposed) ``text_projection`` is mapped.
    ``text_model``: the clip layout has the ``text_model.`` level (old SD1 files lack it).
    """

    component: str
    kind: str
    prefix: str
    num_layers: int
    comfy: str
    hidden: int = 768
    projection: bool = False
    skip_layers: tuple[int, ...] = ()
    text_model: bool = True

    def module_maps(self) -> list[ModuleMap]:
        """Every adaptable module of this encoder (encoder layers, then the projection)."""
        c, p, h = self.component, self.prefix, self.hidden
        out: list[ModuleMap] = []
        for i in range(self.num_layers):
            if i in self.skip_layers:
                continue
            canon = f"{c}.text_model.encoder.layers.{i}"
            if self.kind == "clip":
                base = f"{p}text_model.encoder.layers.{i}" if self.text_model else f"{p}encoder.layers.{i}"
                out += [
                    ModuleMap(f"{canon}.{n}", f"{base}.{n}", None, f"{base}.{n}.weight")
                    for n in CLIP_LAYER_PARTS
                ]
                continue
            base = f"{p}transformer.resblocks.{i}"
            for j, n in enumerate(OPEN_CLIP_QKV):
                out.append(
                    ModuleMap(
                        f"{canon}.{n}",
                        f"{base}.attn.in_proj",
                        (j * h, (j + 1) * h),
                        f"{base}.attn.in_proj_weight",
                    )
                )
            for n, o in OPEN_CLIP_PARTS.items():
                out.append(ModuleMap(f"{canon}.{n}", f"{base}.{o}", None, f"{base}.{o}.weight"))
        if self.projection:
            key = f"{p}text_projection"
            out.append(ModuleMap(f"{c}.text_projection", key, None, key, transpose=self.kind == "open_clip"))
        return out


# ------------------------------------------------------------------------------------ full structure
@dataclass(frozen=True)
class SDStructure:
    """A whole SD checkpoint: family, UNet structure (or None), text encoders, UNet key prefix."""

    family: str
    unet: UNetStructure | None
    text_encoders: tuple[TextEncoderSpec, ...]
    unet_prefix: str = UNET_KEY

    def module_maps(self) -> list[ModuleMap]:
        """Every adaptable module: UNet first (generation order), then each text encoder."""
        out: list[ModuleMap] = []
        if self.unet is not None:
            for d, o in self.unet.pairs():
                orig = self.unet_prefix + o
                out.append(ModuleMap(f"unet.{d}", orig, None, f"{orig}.weight"))
        for te in self.text_encoders:
            out += te.module_maps()
        return out


@dataclass(frozen=True)
class SDFamily:
    """One SD family: its name, default structure (the released model) and kohya text-encoder prefixes."""

    name: str
    description: str
    default: SDStructure
    # component → kohya prefix written; extra prefixes accepted on reading (ComfyUI / diffusers aliases)
    kohya_te: Mapping[str, str] = field(default_factory=dict)
    kohya_te_aliases: Mapping[str, str] = field(default_factory=dict)

    def naming(self, keys: Iterable[str] | Mapping[str, Any] | None = None) -> SDNaming:
        """Name maps for the default structure, or for the structure of a checkpoint key set."""
        if keys is None:
            return _default_naming(self.name)
        return SDNaming(self, structure_from_keys(keys, family=self.name))

    def detect(self, keys: Iterable[str]) -> tuple[str, str] | None:
        """``(name, layout)`` when a checkpoint key set is this family, else None."""
        got = detect(keys)
        return got if got is not None and got[0] == self.name else None


def _clip_l(component: str, prefix: str) -> TextEncoderSpec:
    return TextEncoderSpec(component, "clip", prefix, 12, "clip_l", hidden=768)


def _bigg(prefix: str) -> TextEncoderSpec:
    return TextEncoderSpec("text_encoder_2", "open_clip", prefix, 32, "clip_g", hidden=1280, projection=True)


_SD15_UNET = UNetStructure.from_config((320, 640, 1280, 1280), 2, (1, 1, 1, 0), 1)
SD_FAMILIES: dict[str, SDFamily] = {
    f.name: f
    for f in (
        SDFamily(
            "sd15",
            "Stable Diffusion 1.x: LDM UNet, CLIP-L at cond_stage_model.transformer.",
            SDStructure("sd15", _SD15_UNET, (_clip_l("text_encoder", "cond_stage_model.transformer."),)),
            {"text_encoder": "lora_te"},
            {"lora_te1": "text_encoder"},
        ),
        SDFamily(
            "sd2",
            "Stable Diffusion 2.x: LDM UNet (SD1 block structure), OpenCLIP-H at cond_stage_model.model.",
            SDStructure(
                "sd2",
                _SD15_UNET,
                (
                    TextEncoderSpec(
                        "text_encoder",
                        "open_clip",
                        "cond_stage_model.model.",
                        24,
                        "clip_h",
                        1024,
                        skip_layers=(23,),
                    ),
                ),
            ),
            {"text_encoder": "lora_te"},
            {"lora_te1": "text_encoder"},
        ),
        SDFamily(
            "sdxl",
            "SDXL base: SGM UNet with label_emb, CLIP-L at conditioner.embedders.0, OpenCLIP-bigG at embedders.1",
            SDStructure(
                "sdxl",
                UNetStructure.from_config((320, 640, 1280), 2, (0, 2, 10), 10, add_embedding=True),
                (
                    _clip_l("text_encoder", "conditioner.embedders.0.transformer."),
                    _bigg("conditioner.embedders.1.model."),
                ),
            ),
            {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
            {"lora_te": "text_encoder"},
        ),
        SDFamily(
            "sdxl_refiner",
            "SDXL refiner: SGM UNet (4 blocks, depth 4) with label_emb, OpenCLIP-bigG at conditioner.embedders.0",
            SDStructure(
                "sdxl_refiner",
                UNetStructure.from_config((384, 768, 1536, 1536), 2, (0, 4, 4, 0), 4, add_embedding=True),
                (_bigg("conditioner.embedders.0.model."),),
            ),
            {"text_encoder_2": "lora_te2"},
            # ComfyUI maps lora_te_ onto a refiner's clip_g (comfy/lora.py model_lora_keys_clip)
            {"lora_te": "text_encoder_2"},
        ),
    )
}


# ---------------------------------------------------------------------------------------- detection
def _keyset(keys: Iterable[str] | Mapping[str, Any]) -> list[str]:
    return list(keys.keys()) if isinstance(keys, Mapping) else list(keys)


def detect(keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
    """Which SD family and layout a *checkpoint* key set is: ``(family, layout)`` or None.

    Layout: ``"original"`` (``model.diffusion_model.`` UNet), ``"original_unprefixed"``
    (``diffusion_model.``), ``"diffusers"`` (``unet.down_blocks…`` / ``down_blocks…``). Family by the
    text encoders (SDXL: ``conditioner.embedders.1``; refiner: ``conditioner.embedders.0.model.``; SD2:
    ``cond_stage_model.model.``; SD1: ``cond_stage_model.transformer.``), else by the UNet (``label_emb`` →
    SDXL, 4 blocks → refiner; with tensors given, SD2 by its 1024-wide cross-attention). A UNet-only key
    list cannot tell SD2 from SD1 and answers sd15.
    """
    ks = _keyset(keys)
    if not ks:
        return None

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in ks)

    if has(UNET_KEY):
        layout, uprefix = "original", UNET_KEY
    elif has(UNET_KEY_UNPREFIXED):
        layout, uprefix = "original_unprefixed", UNET_KEY_UNPREFIXED
    elif any(
        k.startswith(("unet.", "down_blocks.", "mid_block.", "text_encoder.", "text_encoder_2.")) for k in ks
    ):
        if has("text_encoder_2.") or any("add_embedding." in k for k in ks):
            return ("sdxl", "diffusers")
        if isinstance(keys, Mapping):  # SD2's cross-attention reads 1024-wide OpenCLIP-H states
            probe = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
            shape = getattr(keys.get(probe) or keys.get("unet." + probe), "shape", None)
            if shape is not None and shape[-1] == 1024:
                return ("sd2", "diffusers")
        return ("sd15", "diffusers")
    elif has("cond_stage_model.") or has("conditioner.embedders."):
        layout, uprefix = "original", UNET_KEY
    else:
        return None
    if has("conditioner.embedders.1."):
        return ("sdxl", layout)
    if has("conditioner.embedders.0.model."):
        return ("sdxl_refiner", layout)
    if has("cond_stage_model.model."):
        return ("sd2", layout)
    if has("cond_stage_model.transformer."):
        return ("sd15", layout)
    if not has(uprefix + "input_blocks."):  # a diffusion_model. file of another architecture (Flux, SD3…)
        return None
    if any(k.startswith(uprefix + "label_emb.") for k in ks):
        ib = uprefix + "input_blocks."
        n_in = len({k[len(ib) :].split(".", 1)[0] for k in ks if k.startswith(ib)})
        return ("sdxl_refiner" if n_in > 9 else "sdxl", layout)
    if isinstance(keys, Mapping):
        probe = uprefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        shape = getattr(keys.get(probe), "shape", None)
        if shape is not None and shape[-1] == 1024:
            return ("sd2", layout)
    return ("sd15", layout)


def structure_from_keys(keys: Iterable[str] | Mapping[str, Any], family: str | None = None) -> SDStructure:
    """The structure of a checkpoint from its keys (any layout of ``detect`` but diffusers).

    Text-encoder layer counts come from the keys; OpenCLIP's q/k/v row height from the tensors when a
    mapping of tensors (or anything with ``.shape``) is given (``in_proj_weight`` rows / 3), else the
    family's default hidden size. Components absent from the key set are left out.
    """
    ks = _keyset(keys)
    got = detect(keys)
    if got is None:
        raise ValueError("not a Stable Diffusion checkpoint key set")
    fam_name, layout = got
    if family is not None:
        fam_name = family
    if layout == "diffusers":
        raise ValueError("structure_from_keys reads original single-file layouts, not diffusers folders")
    fam = SD_FAMILIES[fam_name]
    uprefix = UNET_KEY if layout == "original" else UNET_KEY_UNPREFIXED
    unet_keys = [k[len(uprefix) :] for k in ks if k.startswith(uprefix)]
    unet = UNetStructure.from_keys(unet_keys) if unet_keys else None
    tes: list[TextEncoderSpec] = []
    for te in fam.default.text_encoders:
        sub = [k[len(te.prefix) :] for k in ks if k.startswith(te.prefix)]
        if not sub:
            continue
        if te.kind == "clip":
            text_model = any(s.startswith("text_model.") for s in sub)
            rx = r"^(?:text_model\.)?encoder\.layers\.(\d+)\."
        else:
            text_model = True
            rx = r"^transformer\.resblocks\.(\d+)\."
        idx = [int(m.group(1)) for s in sub if (m := re.match(rx, s))]
        hidden = te.hidden
        if isinstance(keys, Mapping) and idx:
            probe = (
                f"{te.prefix}transformer.resblocks.0.attn.in_proj_weight"
                if te.kind == "open_clip"
                else f"{te.prefix}{'text_model.' if text_model else ''}encoder.layers.0.self_attn.q_proj.weight"
            )
            shape = getattr(keys.get(probe), "shape", None)
            if shape is not None:
                hidden = int(shape[0]) // (3 if te.kind == "open_clip" else 1)
        projection = te.projection and f"{te.prefix}text_projection" in ks
        tes.append(
            replace(
                te,
                num_layers=max(idx, default=-1) + 1,
                hidden=hidden,
                projection=projection,
                text_model=text_model,
            )
        )
    return SDStructure(fam_name, unet, tuple(tes), uprefix)


def structure_from_pipeline(
    family: str, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str] | Mapping[str, Any] = ()
) -> SDStructure:
    """The structure of a diffusers pipeline folder of ``family`` from its components' ``config.json``.

    ``configs``: component → its config (``unet``: a ``UNet2DConditionModel`` config; text encoders: a
    ``CLIPTextConfig``, ``num_hidden_layers`` / ``hidden_size``). ``keys`` (pipeline keys, ``<component>.<key>``)
    tell whether ``text_projection`` is there. Only the canonical names are the pipeline's own; the original
    keys are those of the family's single-file layout. Raises ValueError on a config that is no SD component.
    """
    fam = SD_FAMILIES[family]
    ks = set(_keyset(keys))
    try:
        unet = UNetStructure.from_diffusers_config(configs["unet"]) if "unet" in configs else None
        tes: list[TextEncoderSpec] = []
        for te in fam.default.text_encoders:
            cfg = configs.get(te.component)
            if cfg is None:
                continue
            cfg = cfg.get("text_config", cfg)
            tes.append(replace(
                te, num_layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]), skip_layers=(),
                projection=te.projection and f"{te.component}.text_projection.weight" in ks,
            ))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a {family} pipeline component config ({exc})") from None
    return SDStructure(family, unet, tuple(tes))


# ------------------------------------------------------------------------------------------- naming
def flatten_text_model(path: str) -> str:
    """transformers-5 ``CLIPTextModel`` module path from a canonical one: drop the ``text_model.`` level.

    ``text_encoder.text_model.encoder.layers.0.mlp.fc1`` → ``text_encoder.encoder.layers.0.mlp.fc1``;
    ``text_model.encoder…`` → ``encoder…``. (``CLIPTextModelWithProjection`` keeps ``text_model``.)
    """
    head, sep, tail = path.partition("text_model.")
    if sep and (head == "" or head.endswith(".")) and head.count(".") <= 1:
        return head + tail
    return path


def normalise_text_model(path: str) -> str:
    """Canonical text-encoder path from a transformers-5 flattened one (inverse of ``flatten_text_model``)."""
    for comp in ("text_encoder.", "text_encoder_2.", ""):
        if path.startswith(comp):
            rest = path[len(comp) :]
            if rest.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
                return f"{comp}text_model.{rest}"
    return path


class SDNaming:
    """All name conventions of one SD structure; ``modules`` lists every mapped module in order.

    Built from generated modules only: kohya's mangled stems are resolved by a table of the stems of
    every module (never by un-mangling ``_`` guesses).
    """

    def __init__(self, family: SDFamily, structure: SDStructure) -> None:
        self.family = family
        self.structure = structure
        self.modules: list[ModuleMap] = structure.module_maps()
        self._by_canonical = {m.canonical: m for m in self.modules}
        self._te = {te.component: te for te in structure.text_encoders}
        self._by_original: dict[str, list[ModuleMap]] = {}
        for m in self.modules:
            self._by_original.setdefault(m.original, []).append(m)
        self._index: dict[str, tuple[str, str]] = {}
        first_te = structure.text_encoders[0].component if structure.text_encoders else None
        for m in self.modules:
            c = m.canonical
            self._add(c, c, "diffusers")
            if m.component == "unet" or m.component == first_te:
                self._add(m.path, c, "diffusers")
            if m.component == "unet":
                self._add(self.kohya_stem(c, "diffusers"), c, "kohya_diffusers")
                self._add(self.kohya_stem(c, "original"), c, "kohya_original")
                self._add(self.comfy_key(c), c, "comfy")
                ldm = m.original[len(structure.unet_prefix) :]
                self._add(UNET_KEY + ldm, c, "original")
            else:
                self._add(self.kohya_stem(c), c, "kohya")
                for alias, comp in family.kohya_te_aliases.items():
                    if comp == m.component:
                        self._add(f"{alias}_{m.path.replace('.', '_')}", c, "kohya")
                self._add(self.comfy_key(c), c, "comfy")
                if m.rows is None:
                    self._add(m.original, c, "original")

    def _add(self, name: str, canonical: str, convention: str) -> None:
        old = self._index.setdefault(name, (canonical, convention))
        if old[0] != canonical:
            raise AssertionError(f"name {name!r} generated for both {old[0]} and {canonical}")

    def module(self, canonical: str) -> ModuleMap:
        """The ModuleMap of a canonical name (KeyError if this structure has no such module)."""
        return self._by_canonical[canonical]

    def by_original(self, original: str) -> list[ModuleMap]:
        """The modules stored in one original module key (three, in q, k, v order, for a fused in_proj)."""
        return list(self._by_original.get(original, ()))

    def kohya_stem(self, canonical: str, style: str = "diffusers") -> str:
        """kohya LoRA stem of a module; ``style`` "diffusers" or "original" (UNet only; text encoders same).

        ``lora_unet_down_blocks_0_attentions_0_proj_in`` / ``lora_unet_input_blocks_1_1_proj_in``;
        ``lora_te_…`` (SD1/2), ``lora_te1_…``/``lora_te2_…`` (SDXL): the HF path with ``.`` → ``_``.
        """
        m = self.module(canonical)
        if style not in ("diffusers", "original"):
            raise ValueError(f"kohya style is 'diffusers' or 'original', not {style!r}")
        if m.component == "unet":
            path = m.path if style == "diffusers" else m.original[len(self.structure.unet_prefix) :]
            return "lora_unet_" + path.replace(".", "_")
        return f"{self.family.kohya_te[m.component]}_{m.path.replace('.', '_')}"

    def comfy_key(self, canonical: str) -> str:
        """ComfyUI-native LoRA key (no suffix): ``diffusion_model.<LDM path>`` or
        ``text_encoders.<clip_l|clip_h|clip_g>.transformer.<HF path>``."""
        m = self.module(canonical)
        if m.component == "unet":
            return UNET_KEY_UNPREFIXED + m.original[len(self.structure.unet_prefix) :]
        return f"text_encoders.{self._te[m.component].comfy}.transformer.{m.path}"

    def lookup(self, name: str) -> tuple[str, str] | None:
        """``(canonical, convention)`` for a module name in any known convention, else None.

        Conventions: "diffusers" (canonical, or without component — text encoders then mean the first
        one), "kohya_diffusers", "kohya_original", "kohya" (text encoders, including ComfyUI/diffusers
        aliases such as ``lora_te1_`` on SD1), "comfy", "original" (with or without ``model.``; a fused
        OpenCLIP ``in_proj`` names three modules and is not resolved here: see ``by_original``).
        transformers-5 flattened text-encoder paths and a trailing ``.weight`` are accepted.
        """
        for cand in (name, normalise_text_model(name)):
            got = self._index.get(cand)
            if got is None and cand.endswith(".weight"):
                got = self._index.get(cand[: -len(".weight")])
            if got is not None:
                return got
        return None

    def is_canonical(self, name: str) -> bool:
        """Whether ``name`` is the canonical name of a module of this structure (not an alias of one)."""
        found = self.lookup(name)
        return found is not None and found[0] == name

    def resolve(self, name: str) -> str | None:
        """Canonical name of a module named in any convention (see ``lookup``), or None."""
        got = self.lookup(name)
        return got[0] if got else None

    def unmapped(self, keys: Iterable[str]) -> dict[str, str]:
        """Checkpoint tensors that are no adaptable module's weight, with the reason."""
        mapped = {m.weight_key for m in self.modules}
        out: dict[str, str] = {}
        for k in keys:
            if k not in mapped:
                out[k] = self._reason(k)
        return out

    def _reason(self, k: str) -> str:
        if k.startswith(VAE_KEYS):
            return "VAE"
        if k.startswith("model_ema."):
            return "EMA copy"
        for te in self.structure.text_encoders:
            if k.startswith(te.prefix):
                m = re.match(r"transformer\.resblocks\.(\d+)\.", k[len(te.prefix) :])
                if m and int(m.group(1)) in te.skip_layers:
                    return "text-encoder layer diffusers drops (SD2 uses the penultimate layer)"
                if k.endswith("text_projection") and not te.projection:
                    return "text_projection unused by this family's text encoder"
        if k.endswith(("bias", "_bias")) or re.search(
            r"(norm|ln_|in_layers\.0\.|out_layers\.0\.|\bout\.0\.)", k
        ):
            return "not a weight matrix"
        if re.search(r"(embedding|positional_embedding|token_embedding)", k):
            return "embedding"
        if k.endswith(("position_ids", "logit_scale")) or "." not in k:
            return "not a weight matrix"
        return "not an adaptable module"


@cache
def _default_naming(name: str) -> SDNaming:
    fam = SD_FAMILIES[name]
    return SDNaming(fam, fam.default)


def naming(family: str | None = "sd15", keys: Iterable[str] | Mapping[str, Any] | None = None) -> SDNaming:
    """Name maps of a family's default structure, or of a checkpoint key set (family detected if None)."""
    if keys is not None and family is None:
        got = detect(keys)
        if got is None:
            raise ValueError("not a Stable Diffusion checkpoint key set")
        family = got[0]
    return SD_FAMILIES[family].naming(keys)


# ------------------------------------------------------------------------------- module-level API
def module_maps(keys: Iterable[str] | Mapping[str, Any]) -> list[ModuleMap]:
    """Every adaptable module of an original single-file checkpoint (with or without leading ``model.``).

    The structure is inferred from the keys; pass a mapping of tensors to get OpenCLIP row slices from
    the real ``in_proj_weight`` height rather than the family's default hidden size.
    """
    st = structure_from_keys(keys)
    return st.module_maps()


def unmapped(keys: Iterable[str] | Mapping[str, Any]) -> dict[str, str]:
    """Checkpoint keys not mapped by ``module_maps``, with the reason ("VAE", "not a weight matrix", …)."""
    st = structure_from_keys(keys)
    return SDNaming(SD_FAMILIES[st.family], st).unmapped(_keyset(keys))


def kohya_stem(canonical: str, style: str = "diffusers", family: str = "sd15") -> str:
    """kohya stem of a canonical module in a family's default structure (see ``SDNaming.kohya_stem``)."""
    return _default_naming(family).kohya_stem(canonical, style)


def comfy_key(canonical: str, family: str = "sd15") -> str:
    """ComfyUI-native key of a canonical module in a family's default structure."""
    return _default_naming(family).comfy_key(canonical)


def resolve(name: str, family: str = "sd15") -> str | None:
    """Canonical name of a module named in any convention, in a family's default structure."""
    return _default_naming(family).resolve(name)


_ADAPTER_PART = re.compile(
    r"\.(?:lora_(?:A|B|down|up|mid)|lora_magnitude_vector|alpha|dora_scale|hada_w[12]_[ab]|hada_t[12]"
    r"|lokr_w[12](?:_[ab])?|lokr_t2|diff|diff_b|weight|bias)(?:\.|$)"
)


def adapter_module(key: str) -> str:
    """The module part of an adapter tensor key (``lora_unet_x.lora_down.weight`` → ``lora_unet_x``)."""
    m = _ADAPTER_PART.search(key)
    return key[: m.start()] if m else key


def detect_adapter(keys: Iterable[str]) -> tuple[str, str] | None:
    """``(family, convention)`` of an adapter's keys, scored by how many modules each family resolves.

    Conventions as in ``SDNaming.lookup`` ("kohya_original", "kohya_diffusers", "comfy", "diffusers", …;
    the most common UNet one wins, else the text encoders'). Ties go to the earlier family (sd15, sd2,
    sdxl, sdxl_refiner): SD1 and SD2 share every UNet name, so only text-encoder layers ≥ 12 tell SD2.
    """
    mods = {adapter_module(k) for k in keys}
    best: tuple[int, str, list[tuple[str, str]]] | None = None
    for name in SD_FAMILIES:
        nm = _default_naming(name)
        hits = [h for h in (nm.lookup(m) for m in mods) if h is not None]
        if hits and (best is None or len(hits) > best[0]):
            best = (len(hits), name, hits)
    if best is None:
        return None
    unet = Counter(conv for canon, conv in best[2] if canon.startswith("unet."))
    conv = (unet or Counter(conv for _, conv in best[2])).most_common(1)[0][0]
    return best[1], conv
