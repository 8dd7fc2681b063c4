"""Flux.1 family maps, checked against the libraries that define each layout.

The BFL layout is diffusers': its single-file converter must turn a file we write from our maps back
into the model exactly; kohya / ComfyUI LoRA names must be what diffusers' kohya Flux LoRA converter
maps to the same modules and rows; the default structures must list exactly the Linear layers of
full-size ``FluxTransformer2DModel``s built on the meta device.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from sd_models import CHECKPOINTS

from loratools.families import FAMILIES, detect_adapter, detect_family, flux, sd


def get_family(name: str):
    return FAMILIES[name]

TINY = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=16,
    pooled_projection_dim=8,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)
DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, guidance_embeds=True)
# tensors that are no adaptable module: diffusers child ↔ BFL child (qk RMSNorm scales)
DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}


def _adaptable(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def tiny_flux(seed: int = 0, guidance: bool = True) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY, "guidance_embeds": guidance})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def to_bfl(state: dict[str, torch.Tensor], nm: flux.FluxNaming, prefix: str = "") -> dict[str, torch.Tensor]:
    """Invert the single-file conversion with our maps: each module's weight and bias go to its rows."""
    out: dict[str, torch.Tensor] = {}
    for m in nm.modules:
        for end in ("weight", "bias"):
            src = state[f"{m.path}.{end}"]
            key = prefix + m.weight_key.removesuffix(".weight") + "." + end
            if key not in out:
                group = nm.by_original(m.original)
                rows = max(g.rows[1] for g in group) if m.fused else src.shape[0]
                out[key] = torch.full((rows, *src.shape[1:]), float("nan"))
            flux.place_rows(m, src, out[key])
    for i in range(nm.structure.num_double):
        for d, o in DOUBLE_NORMS.items():
            out[f"{prefix}double_blocks.{i}.{o}"] = state[f"transformer_blocks.{i}.{d}"]
    for i in range(nm.structure.num_single):
        for d, o in SINGLE_NORMS.items():
            out[f"{prefix}single_blocks.{i}.{o}"] = state[f"single_transformer_blocks.{i}.{d}"]
    assert not any(t.isnan().any() for t in out.values())
    return out


def diffusers_converter(hidden: int):
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` for another hidden size.

    It hard-codes ``inner_dim = 3072`` (Flux.1's) for the linear1 split; only that literal is changed, the
    rest is the library's code (the full-size row layout is checked unchanged below).
    """
    fn = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    if hidden == 3072:
        return fn
    src = inspect.getsource(fn)
    assert src.count("inner_dim = 3072") == 1
    ns = dict(fn.__globals__)
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden}"), ns)
    return ns[fn.__name__]


# --------------------------------------------------------------------- original layout = diffusers'
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_file_converts_back_exactly_with_diffusers(prefix):
    model = tiny_flux()
    st = flux.FluxStructure.from_diffusers_config(dict(model.config))
    assert (st.num_double, st.num_single, st.hidden, st.mlp_hidden, st.guidance) == (1, 2, 16, 64, True)
    nm = flux.FluxNaming(FAMILIES["flux_dev"], st)
    ref = model.state_dict()
    ckpt = to_bfl(ref, nm, prefix)
    conv = diffusers_converter(16)(dict(ckpt))
    assert conv.keys() == ref.keys()
    assert all(torch.equal(conv[k], ref[k]) for k in ref)


@pytest.mark.parametrize("guidance", [True, False])
def test_structure_and_maps_inferred_from_the_file(guidance):
    model = tiny_flux(guidance=guidance)
    st = flux.FluxStructure.from_diffusers_config(dict(model.config))
    ckpt = to_bfl(model.state_dict(), flux.FluxNaming(FAMILIES["flux_dev"], st))
    family = "flux_dev" if guidance else "flux_schnell"
    assert flux.detect(ckpt) == (family, "original_unprefixed")
    assert detect_family(ckpt) == (family, "original_unprefixed")
    assert flux.FluxStructure.from_keys(ckpt) == st
    maps = flux.module_maps(ckpt)
    assert [m.path for m in maps] == _adaptable(model)
    for m in maps:
        assert ckpt[m.weight_key].dim() == 2
        assert torch.equal(flux.take_rows(m, ckpt[m.weight_key]), model.state_dict()[m.path + ".weight"])
    # prefixed copies and the diffusers layout give the same structure (up to the key prefix)
    for p in ("model.diffusion_model.", "diffusion_model."):
        pre = {p + k: v for k, v in ckpt.items()}
        assert flux.FluxStructure.from_keys(pre).prefix == p
        assert all(m.weight_key in pre for m in flux.module_maps(pre))
    assert flux.FluxStructure.from_keys(model.state_dict()) == st
    assert flux.FluxStructure.from_keys({"transformer." + k: v for k, v in model.state_dict().items()}) == st
    reasons = get_family(family).naming(ckpt).unmapped(list(ckpt) + ["vae.decoder.conv_in.weight"])
    assert reasons["vae.decoder.conv_in.weight"] == "VAE"
    assert set(reasons.values()) == {"VAE", "not a weight matrix"}


def test_full_size_row_layout_with_the_unchanged_diffusers_converter():
    # Flux.1 widths with one-column weights: row arithmetic at hidden 3072 / MLP 12288, no big tensors
    st = flux.FluxStructure(num_double=1, num_single=2)
    nm = flux.FluxNaming(FAMILIES["flux_dev"], st)
    with torch.device("meta"):
        meta = FluxTransformer2DModel(**{**DEV, "num_layers": 1, "num_single_layers": 2})
    ref, n = {}, 0
    for k, p in meta.state_dict().items():
        ref[k] = torch.arange(n, n + p.shape[0], dtype=torch.float32).reshape(
            -1, *([1] if p.dim() > 1 else [])
        )
        n += p.shape[0]
    conv = diffusers_converter(3072)(to_bfl(ref, nm))
    assert conv.keys() == ref.keys()
    assert all(torch.equal(conv[k], ref[k]) for k in ref)


def test_norm_out_rows_are_swapped_halves_and_block_modulations_are_not():
    nm = get_family("flux_dev").naming()
    m = nm.module("transformer.norm_out.linear")
    assert (m.original, m.rows, m.row_order) == (
        "final_layer.adaLN_modulation.1",
        None,
        ((3072, 6144), (0, 3072)),
    )
    w = torch.arange(6144.0)
    assert torch.equal(flux.take_rows(m, w), single_file_utils.swap_scale_shift(w, 0))
    back = torch.empty(6144)
    flux.place_rows(m, flux.take_rows(m, w), back)
    assert torch.equal(back, w)
    for c in (
        "transformer.transformer_blocks.0.norm1.linear",
        "transformer.transformer_blocks.0.norm1_context.linear",
        "transformer.single_transformer_blocks.0.norm.linear",
    ):
        assert nm.module(c).row_blocks() is None and not nm.module(c).permuted


# -------------------------------------------------------------------- full-size default structures
@pytest.mark.parametrize("family,guidance", [("flux_dev", True), ("flux_schnell", False)])
def test_default_structures_match_full_size_models(family, guidance):
    with torch.device("meta"):
        model = FluxTransformer2DModel(**{**DEV, "guidance_embeds": guidance})
    nm = get_family(family).naming()
    assert [m.path for m in nm.modules] == _adaptable(model)
    assert flux.FluxStructure.from_diffusers_config(dict(model.config)) == nm.structure
    shapes = {n: p.shape for n, p in model.named_parameters()}
    for m in nm.modules:
        if m.fused:
            a, b = m.rows
            assert b - a == shapes[m.path + ".weight"][0], m
    assert len(nm.modules) == (504 if guidance else 502)


# ----------------------------------------------------------------------------------- name round trips
def _namings():
    out = [(name, f.naming()) for name, f in FAMILIES.items() if name.startswith("flux")]
    model = tiny_flux()
    st = flux.FluxStructure.from_diffusers_config(dict(model.config))
    ckpt = to_bfl(model.state_dict(), flux.FluxNaming(FAMILIES["flux_dev"], st), "model.diffusion_model.")
    out.append(("tiny-prefixed", get_family("flux_dev").naming(ckpt)))
    return out


@pytest.mark.parametrize("label,nm", _namings(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_name_resolves_back_to_its_canonical(label, nm):
    bare = flux.strip_prefix
    for m in nm.modules:
        c = m.canonical
        one = [c, m.path, nm.kohya_stem(c, "diffusers"), "lycoris_" + m.path.replace(".", "_")]
        bfl = [
            nm.kohya_stem(c),
            nm.comfy_key(c),
            m.original,
            bare(m.original),
            "model.diffusion_model." + bare(m.original),
        ]
        for n in one + [f"{x}.weight" for x in one[:2]]:
            assert nm.resolve(n) == c, (n, c)
            assert [g.canonical for g in nm.lookup_group(n)[0]] == [c]
        if m.fused:
            group = nm.by_original(m.original)
            assert c in [g.canonical for g in group] and len(group) in (3, 4)
            assert nm.fused_name(c) == m.original
            for n in bfl:
                assert nm.resolve(n) is None, n
                assert nm.lookup_group(n)[0] == group, n
        else:
            assert nm.fused_name(c) is None and nm.by_original(m.original) == [m]
            for n in bfl:
                assert nm.resolve(n) == c, (n, c)
    assert nm.resolve("lora_unet_nothing_here") is None and nm.lookup_group("x.y") is None


def test_name_examples():
    nm = get_family("flux_dev").naming()
    q = "transformer.transformer_blocks.3.attn.add_k_proj"
    assert nm.kohya_stem(q) == "lora_unet_double_blocks_3_txt_attn_qkv"
    assert nm.kohya_stem(q, "diffusers") == "lora_transformer_transformer_blocks_3_attn_add_k_proj"
    assert nm.comfy_key(q) == "diffusion_model.double_blocks.3.txt_attn.qkv"
    assert nm.module(q).rows == (3072, 6144) and nm.fused_name(q) == "double_blocks.3.txt_attn.qkv"
    group = nm.by_original("model.diffusion_model.single_blocks.7.linear1.weight")
    assert [(g.path.rsplit(".", 1)[1], g.rows) for g in group] == [
        ("to_q", (0, 3072)),
        ("to_k", (3072, 6144)),
        ("to_v", (6144, 9216)),
        ("proj_mlp", (9216, 21504)),
    ]
    mods, conv = nm.lookup_group("diffusion_model.single_blocks.7.linear1_qkv")
    assert conv == "comfy" and mods == group[:3]
    assert nm.lookup("lora_unet_single_blocks_7_linear2") == (
        "transformer.single_transformer_blocks.7.proj_out",
        "kohya_original",
    )
    assert nm.resolve("lora_unet_final_layer_adaLN_modulation_1") == "transformer.norm_out.linear"
    assert (
        nm.resolve("lora_unet_guidance_in_in_layer")
        == "transformer.time_text_embed.guidance_embedder.linear_1"
    )
    assert get_family("flux_schnell").naming().resolve("lora_unet_guidance_in_in_layer") is None
    assert (
        nm.resolve("img_in") == "transformer.x_embedder"
        and nm.resolve("x_embedder") == "transformer.x_embedder"
    )
    with pytest.raises(ValueError, match="kohya style"):
        nm.kohya_stem(q, "comfy")


# ------------------------------------------------------------------- diffusers' kohya Flux LoRA loader
def _lora_through_diffusers(stems: list[str], rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """Rank-1 LoRA per stem (up = row ids, alpha = rank), through diffusers; returns lora_B per module."""
    state, n = {}, 0
    for stem in stems:
        state[f"{stem}.lora_down.weight"] = torch.ones(1, 1)
        state[f"{stem}.lora_up.weight"] = torch.arange(n, n + rows[stem], dtype=torch.float32).reshape(-1, 1)
        state[f"{stem}.alpha"] = torch.tensor(1.0)
        n += rows[stem]
    out = _convert_kohya_flux_lora_to_diffusers(dict(state))
    ups = {s: state[f"{s}.lora_up.weight"] for s in stems}
    return ups, {k.removesuffix(".lora_B.weight"): v for k, v in out.items() if k.endswith(".lora_B.weight")}


@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_kohya_and_comfy_names_load_into_the_same_rows_in_diffusers(style):
    nm = get_family("flux_dev").naming()
    with torch.device("meta"):
        model = FluxTransformer2DModel(**DEV)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    name = nm.kohya_stem if style == "kohya" else nm.comfy_key
    stems, rows = [], {}
    for m in nm.modules:
        s = name(m.canonical)
        if s not in rows:
            stems.append(s)
            group = nm.by_original(m.original)
            rows[s] = sum(shapes[g.path + ".weight"][0] for g in group)
    ups, got = _lora_through_diffusers(stems, rows)
    for stem in stems:
        for m in nm.lookup_group(stem)[0]:
            # diffusers leaves the top-level modules without the transformer. component
            key = m.canonical if m.canonical in got else m.path
            assert torch.equal(got[key], flux.take_rows(m, ups[stem])), (stem, m.canonical)
    assert len(got) == len(nm.modules)


# ---------------------------------------------------------------------------------------- detection
def test_detect_checkpoints_sd_vs_flux():
    model = tiny_flux()
    st = flux.FluxStructure.from_diffusers_config(dict(model.config))
    bfl = to_bfl(model.state_dict(), flux.FluxNaming(FAMILIES["flux_dev"], st))
    comfy_ckpt = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    comfy_ckpt["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.zeros(1)
    assert detect_family(comfy_ckpt) == ("flux_dev", "original")
    assert detect_family({"diffusion_model." + k: v for k, v in bfl.items()}) == (
        "flux_dev",
        "original_unprefixed",
    )
    pipe = [f"transformer.{k}" for k in model.state_dict()] + [
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight",
        "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.weight",
    ]
    assert sd.detect(pipe) is not None  # SD's detector alone would take a Flux pipeline …
    assert detect_family(pipe) == ("flux_dev", "diffusers")  # … the registry does not
    no_guidance = [k for k in bfl if not k.startswith("guidance_in.")]
    assert detect_family(no_guidance) == ("flux_schnell", "original_unprefixed")
    for name, make in CHECKPOINTS.items():
        tiny = make()
        assert flux.detect(tiny.ckpt) is None and detect_family(tiny.ckpt) == (name, "original")
        assert flux.detect(tiny.unet.state_dict()) is None
    assert detect_family(["first_stage_model.x"]) is None
    assert get_family("flux_schnell").detect(no_guidance) == ("flux_schnell", "original_unprefixed")
    assert get_family("flux_dev").detect(no_guidance) is None


def test_detect_adapters_sd_vs_flux():
    nm = get_family("flux_dev").naming()
    some = [m.canonical for m in nm.modules][::5]
    assert detect_adapter([f"{nm.kohya_stem(c)}.lora_down.weight" for c in some]) == (
        "flux_dev",
        "kohya_original",
    )
    assert detect_adapter([f"{nm.comfy_key(c)}.lora_A.weight" for c in some]) == ("flux_dev", "comfy")
    assert detect_adapter([f"{c}.lora_A.weight" for c in some]) == ("flux_dev", "diffusers")
    keys = [f"{nm.kohya_stem(c, 'diffusers')}.alpha" for c in some]
    assert detect_adapter(keys) == ("flux_dev", "kohya_diffusers")
    # a Flux LoRA with its CLIP-L text encoder: lora_te1_ names also resolve in SD, the transformer's do not
    te = [f"lora_te1_text_model_encoder_layers_{i}_mlp_fc1.lora_up.weight" for i in range(12)]
    assert sd.detect_adapter(te + keys[:5]) is not None
    assert detect_adapter(te + [f"{nm.kohya_stem(c)}.lora_up.weight" for c in some[:5]])[0] == "flux_dev"
    # SD adapters never come out as Flux, and no SD name resolves in Flux
    for family in sd.SD_FAMILIES:
        snm = get_family(family).naming()
        for conv, names in (
            ("kohya_diffusers", [snm.kohya_stem(m.canonical) for m in snm.modules]),
            ("comfy", [snm.comfy_key(m.canonical) for m in snm.modules]),
            ("diffusers", [m.canonical for m in snm.modules]),
        ):
            got = detect_adapter([f"{n}.lora_down.weight" for n in names])
            assert got is not None and got[0] in sd.SD_FAMILIES, (family, conv, got)
            assert flux.detect_adapter(names) is None
        assert flux.detect_adapter([snm.kohya_stem(m.canonical, "original") for m in snm.modules]) is None
    for n in [m.canonical for m in nm.modules] + [nm.kohya_stem(m.canonical) for m in nm.modules]:
        assert all(get_family(f).naming().resolve(n) is None for f in sd.SD_FAMILIES)
    assert detect_adapter(["foo.lora_A.weight"]) is None
