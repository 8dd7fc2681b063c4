"""Seeded tiny SD1.5 / SD2 / SDXL models and their original-layout single files, for family tests.

The models are structurally real (diffusers ``UNet2DConditionModel`` in the SD1.5 and SDXL block
layouts, transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) with tiny widths. A single
file is written by *inverting* diffusers' single-file conversion: every adaptable weight goes where
``loratools.families.sd``'s generated maps put it (OpenCLIP q/k/v stacked by their row slices,
``text_projection`` transposed); biases follow their weight, norms and embeddings follow the container
(resnet / attention) of the mapped modules. Tests then check that diffusers' own
``convert_ldm_unet_checkpoint`` / ``convert_ldm_clip_checkpoint`` / ``convert_open_clip_checkpoint`` turn
the file back into exactly the models' state dicts: the layout is the library's, not ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loratools.families import sd

# ResnetBlock2D children ↔ LDM ResBlock children for the tensors the maps do not carry (norms).
RESNET_NORMS = {"norm1": "in_layers.0", "norm2": "out_layers.0"}
UNET_TOP = {"conv_norm_out": "out.0"}
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_sd15_unet(seed: int = 0, linear_projection: bool = False) -> UNet2DConditionModel:
    """SD1.5 block layout (CrossAttnDown×3 + Down, lpb 2, depth 1, channels 8/16/32/32)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        use_linear_projection=linear_projection,
    )
    return _randomise(unet, seed)


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL block layout (Down + CrossAttnDown×2, depths 2/3, text_time add embedding)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 32),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 3),
        norm_num_groups=4,
        cross_attention_dim=16,
        attention_head_dim=2,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4,
    )
    return _randomise(unet, seed)


def tiny_clip(
    layers: int = 2, hidden: int = 8, projection: bool = False, seed: int = 0
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A tiny CLIP text encoder (CLIP-L / OpenCLIP-H role; with ``projection`` the bigG role)."""
    cfg = CLIPTextConfig(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=7,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return _randomise(model, seed)


def text_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CLIP state dict with the ``text_model.`` level (transformers 5 flattens ``CLIPTextModel``)."""
    return {sd.normalise_text_model(k): v for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ writers
def unet_to_original(state: dict[str, torch.Tensor], naming: sd.SDNaming) -> dict[str, torch.Tensor]:
    """The UNet part of an original single file from a diffusers UNet state dict."""
    prefix = naming.structure.unet_prefix
    mods = {m.path: m.original[len(prefix) :] for m in naming.modules if m.component == "unet"}
    containers: dict[str, tuple[str, bool]] = {}
    for d, o in mods.items():
        if d.endswith(".conv1"):
            containers[d[: -len(".conv1")]] = (o[: -len(".in_layers.2")], True)
        elif d.endswith(".proj_in"):
            containers[d[: -len(".proj_in")]] = (o[: -len(".proj_in")], False)
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        if mod in mods:
            out[f"{prefix}{mods[mod]}.{leaf}"] = v
            continue
        if mod in UNET_TOP:
            out[f"{prefix}{UNET_TOP[mod]}.{leaf}"] = v
            continue
        for cont, (ocont, resnet) in containers.items():
            if mod.startswith(cont + "."):
                inner = mod[len(cont) + 1 :]
                out[f"{prefix}{ocont}.{RESNET_NORMS[inner] if resnet else inner}.{leaf}"] = v
                break
        else:
            raise KeyError(f"no original place for UNet tensor {k}")
    return out


def clip_to_original(
    state: dict[str, torch.Tensor], naming: sd.SDNaming, component: str
) -> dict[str, torch.Tensor]:
    """A CLIP-L (HF layout) text encoder's part of an original single file."""
    spec = next(t for t in naming.structure.text_encoders if t.component == component)
    mods = {m.path: m for m in naming.modules if m.component == component}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        if mod in mods and leaf == "weight":
            out[mods[mod].weight_key] = v
        elif k.startswith("text_model."):
            out[spec.prefix + (k if spec.text_model else k[len("text_model.") :])] = v
        else:
            raise KeyError(f"no original place for CLIP tensor {k}")
    return out


def open_clip_to_original(
    state: dict[str, torch.Tensor],
    naming: sd.SDNaming,
    component: str,
    projection: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """An OpenCLIP text encoder's part of an original single file: q/k/v fused into ``in_proj`` by
    the maps' row slices, ``text_projection`` transposed (or ``projection`` as given, for SD2 files
    whose projection diffusers ignores)."""
    spec = next(t for t in naming.structure.text_encoders if t.component == component)
    p = spec.prefix
    mods = {m.path: m for m in naming.modules if m.component == component}
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for k, v in state.items():
        mod, _, leaf = k.rpartition(".")
        m = mods.get(mod)
        if m is not None and m.rows is not None:
            key = m.weight_key if leaf == "weight" else m.weight_key.replace("in_proj_weight", "in_proj_bias")
            if key not in out:
                out[key] = torch.full((3 * (m.rows[1] - m.rows[0]), *v.shape[1:]), float("nan"))
            out[key][m.rows[0] : m.rows[1]] = v
            filled[key] = filled.get(key, 0) + v.shape[0]
        elif m is not None:
            if m.transpose:
                out[m.weight_key] = v.T.contiguous()
            else:
                out[m.weight_key if leaf == "weight" else f"{m.original}.{leaf}"] = v
        elif k.removeprefix("text_model.") in OPEN_CLIP_TOP:
            out[p + OPEN_CLIP_TOP[k.removeprefix("text_model.")]] = v
        elif ln := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", k):
            out[f"{p}transformer.resblocks.{ln[1]}.ln_{ln[2]}.{ln[3]}"] = v
        else:
            raise KeyError(f"no original place for OpenCLIP tensor {k}")
    assert all(filled[k] == out[k].shape[0] for k in filled), "q/k/v row slices do not tile in_proj"
    if projection is not None:
        out[f"{p}text_projection"] = projection
    return out


VAE = {
    "first_stage_model.encoder.conv_in.weight": torch.ones(2, 3, 3, 3),
    "first_stage_model.encoder.conv_in.bias": torch.zeros(2),
}


@dataclass
class TinyCheckpoint:
    """A tiny original-layout single file and the diffusers-side models it was written from."""

    family: str
    ckpt: dict[str, torch.Tensor]
    naming: sd.SDNaming
    unet: UNet2DConditionModel
    text_encoders: dict[str, torch.nn.Module]  # component -> model


def _naming(family: str, unet: UNet2DConditionModel, tes: list[sd.TextEncoderSpec]) -> sd.SDNaming:
    st = sd.SDStructure(family, sd.UNetStructure.from_diffusers_config(dict(unet.config)), tuple(tes))
    return sd.SDNaming(sd.SD_FAMILIES[family], st)


def sd15_checkpoint(seed: int = 0) -> TinyCheckpoint:
    """SD1.5: ``model.diffusion_model.*``, ``cond_stage_model.transformer.text_model.*``, VAE tensors."""
    unet, te = tiny_sd15_unet(seed), tiny_clip(2, 8, seed=seed + 1)
    spec = sd.TextEncoderSpec("text_encoder", "clip", "cond_stage_model.transformer.", 2, "clip_l", 8)
    nm = _naming("sd15", unet, [spec])
    ckpt = {
        **unet_to_original(unet.state_dict(), nm),
        **clip_to_original(text_state_dict(te), nm, "text_encoder"),
    }
    return TinyCheckpoint("sd15", {**ckpt, **VAE}, nm, unet, {"text_encoder": te})


def sd2_checkpoint(seed: int = 0) -> TinyCheckpoint:
    """SD2: SD1.5 UNet layout (linear proj_in) + OpenCLIP-H at ``cond_stage_model.model.`` (3 layers)."""
    unet, te = tiny_sd15_unet(seed, linear_projection=True), tiny_clip(3, 8, seed=seed + 1)
    spec = sd.TextEncoderSpec(
        "text_encoder", "open_clip", "cond_stage_model.model.", 3, "clip_h", 8, skip_layers=(23,)
    )
    nm = _naming("sd2", unet, [spec])
    proj = torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))
    ckpt = {
        **unet_to_original(unet.state_dict(), nm),
        **open_clip_to_original(text_state_dict(te), nm, "text_encoder", projection=proj),
    }
    return TinyCheckpoint("sd2", {**ckpt, **VAE}, nm, unet, {"text_encoder": te})


def sdxl_checkpoint(seed: int = 0) -> TinyCheckpoint:
    """SDXL: ``model.diffusion_model.*``, CLIP-L at ``conditioner.embedders.0.transformer.``, bigG (hidden
    12, projection 8, fused ``in_proj``) at ``conditioner.embedders.1.model.``, VAE tensors."""
    unet = tiny_sdxl_unet(seed)
    te1, te2 = tiny_clip(2, 8, seed=seed + 1), tiny_clip(3, 12, projection=True, seed=seed + 2)
    specs = [
        sd.TextEncoderSpec("text_encoder", "clip", "conditioner.embedders.0.transformer.", 2, "clip_l", 8),
        sd.TextEncoderSpec(
            "text_encoder_2", "open_clip", "conditioner.embedders.1.model.", 3, "clip_g", 12, projection=True
        ),
    ]
    nm = _naming("sdxl", unet, specs)
    ckpt = {
        **unet_to_original(unet.state_dict(), nm),
        **clip_to_original(text_state_dict(te1), nm, "text_encoder"),
        **open_clip_to_original(text_state_dict(te2), nm, "text_encoder_2"),
    }
    return TinyCheckpoint("sdxl", {**ckpt, **VAE}, nm, unet, {"text_encoder": te1, "text_encoder_2": te2})


def kohya_lora(tiny: TinyCheckpoint, seed: int = 0, ranks: tuple[int, ...] = (2,), alpha_cycle: int = 5,
               alpha_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A kohya LoRA with diffusers-style stems on every module of a tiny checkpoint: random factors, module i at rank
    ``ranks[i % len(ranks)]`` and alpha ``1 + i % alpha_cycle`` (fused OpenCLIP q/k/v: their row slices' shapes)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i, m in enumerate(tiny.naming.modules):
        w = tiny.ckpt[m.weight_key]
        if m.rows is not None:
            w = w[m.rows[0] : m.rows[1]]
        if m.transpose:
            w = w.T
        r = ranks[i % len(ranks)]
        stem = tiny.naming.kohya_stem(m.canonical, "diffusers")
        out[f"{stem}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g)
        out[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], r, *([1] * (w.dim() - 2)), generator=g)
        out[f"{stem}.alpha"] = torch.tensor(float(1 + i % alpha_cycle), dtype=alpha_dtype)
    return out


CHECKPOINTS = {"sd15": sd15_checkpoint, "sd2": sd2_checkpoint, "sdxl": sdxl_checkpoint}
