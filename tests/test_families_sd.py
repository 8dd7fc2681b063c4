"""SD1.5 / SD2 / SDXL family maps, checked against the libraries that define each layout.

The original single-file layout is diffusers' (its converters must turn our file back into the models
exactly); kohya stems must be what diffusers' kohya loader maps back to the same modules; module
counts must match full-size diffusers / transformers models built on the meta device.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.utils.state_dict_utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from sd_models import CHECKPOINTS, text_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from loratools.families import ModuleMap, detect_family, get_family, sd


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def tiny(request):
    return CHECKPOINTS[request.param]()


def _adaptable(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


# ------------------------------------------------------------------- original layout = diffusers'
def test_original_file_converts_back_exactly_with_diffusers(tiny):
    ckpt = tiny.ckpt
    conv = convert_ldm_unet_checkpoint(dict(ckpt), dict(tiny.unet.config))
    ref = tiny.unet.state_dict()
    assert conv.keys() == ref.keys()
    assert all(torch.equal(conv[k], ref[k]) for k in ref)
    for te in tiny.naming.structure.text_encoders:
        model = tiny.text_encoders[te.component]
        if te.kind == "clip":
            conv = convert_ldm_clip_checkpoint(ckpt)
        else:
            conv = convert_open_clip_checkpoint(model, ckpt, prefix=te.prefix)
        ref = text_state_dict(model)
        assert conv.keys() == ref.keys(), te.component
        assert all(torch.equal(conv[k], ref[k]) for k in ref), te.component


def test_module_maps_infer_the_structure_from_the_file(tiny):
    assert sd.detect(tiny.ckpt) == (tiny.family, "original")
    assert detect_family(tiny.ckpt) == (tiny.family, "original")
    assert sd.module_maps(tiny.ckpt) == tiny.naming.modules
    # every mapped weight exists and is a matrix/conv kernel; every model Linear/Conv2d is mapped
    for m in tiny.naming.modules:
        assert tiny.ckpt[m.weight_key].dim() >= 2, m
    unet = {m.path for m in tiny.naming.modules if m.component == "unet"}
    assert unet == _adaptable(tiny.unet)
    for comp, model in tiny.text_encoders.items():
        got = {m.path for m in tiny.naming.modules if m.component == comp}
        assert got == {sd.normalise_text_model(n) for n in _adaptable(model)}, comp


def test_unprefixed_layout_without_leading_model(tiny):
    ckpt = {k.removeprefix("model."): v for k, v in tiny.ckpt.items()}
    assert sd.detect(ckpt) == (tiny.family, "original_unprefixed")
    maps = sd.module_maps(ckpt)
    assert [m.canonical for m in maps] == [m.canonical for m in tiny.naming.modules]
    assert all(m.weight_key in ckpt for m in maps)
    nm = get_family(tiny.family).naming(ckpt)
    for m in maps[:40]:
        assert nm.resolve(m.original) == m.canonical
        assert nm.resolve("model." + m.original) == m.canonical


def test_fused_in_proj_rows_are_diffusers_q_k_v(tiny):
    for te in tiny.naming.structure.text_encoders:
        if te.kind != "open_clip":
            continue
        conv = convert_open_clip_checkpoint(tiny.text_encoders[te.component], tiny.ckpt, prefix=te.prefix)
        fused = [m for m in tiny.naming.modules if m.rows is not None]
        assert fused and all(m.weight_key.endswith("attn.in_proj_weight") for m in fused)
        for m in fused:
            a, b = m.rows
            assert torch.equal(tiny.ckpt[m.weight_key][a:b], conv[m.path + ".weight"])
            group = tiny.naming.by_original(m.original)
            assert [g.canonical.rsplit(".", 1)[1] for g in group] == ["q_proj", "k_proj", "v_proj"]
            assert tiny.naming.resolve(m.original) is None  # three modules, not one


def test_unmapped_keys_have_reasons(tiny):
    reasons = sd.unmapped(tiny.ckpt)
    mapped = {m.weight_key for m in tiny.naming.modules}
    assert set(reasons) == set(tiny.ckpt) - mapped
    assert reasons["first_stage_model.encoder.conv_in.weight"] == "VAE"
    assert set(reasons.values()) <= {"VAE", "not a weight matrix", "embedding"} | (
        {"text_projection unused by this family's text encoder"} if tiny.family == "sd2" else set()
    )
    assert all(
        reasons[k] == "not a weight matrix" for k in reasons if k.endswith("bias") and "first_stage" not in k
    )


# -------------------------------------------------------------------- full-size default structures
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280))
SDXL_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
REFINER_UNET = dict(
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(384, 768, 1536, 1536),
    transformer_layers_per_block=4,
    attention_head_dim=(6, 12, 24, 24),
    cross_attention_dim=1280,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
BIGG = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
)


def _meta(cls, **kw):
    with torch.device("meta"):
        if cls is UNet2DConditionModel:
            return cls(**kw)
        return cls(CLIPTextConfig(**kw))


@pytest.mark.parametrize(
    "family,unet_cfg,tes",
    [
        ("sd15", SD15_UNET, {"text_encoder": (CLIPTextModel, CLIP_L)}),
        ("sd2", SD15_UNET, {"text_encoder": (CLIPTextModel, OPENCLIP_H)}),
        (
            "sdxl",
            SDXL_UNET,
            {"text_encoder": (CLIPTextModel, CLIP_L), "text_encoder_2": (CLIPTextModelWithProjection, BIGG)},
        ),
        ("sdxl_refiner", REFINER_UNET, {"text_encoder_2": (CLIPTextModelWithProjection, BIGG)}),
    ],
)
def test_default_structures_match_full_size_models(family, unet_cfg, tes):
    nm = get_family(family).naming()
    unet = _meta(UNet2DConditionModel, **unet_cfg)
    got = [m.path for m in nm.modules if m.component == "unet"]
    assert len(got) == len(set(got)) == len(_adaptable(unet))
    assert set(got) == _adaptable(unet)
    assert sd.UNetStructure.from_diffusers_config(dict(unet.config)) == nm.structure.unet
    for comp, (cls, cfg) in tes.items():
        model = _meta(cls, **cfg)
        got = {m.path for m in nm.modules if m.component == comp}
        assert got == {sd.normalise_text_model(n) for n in _adaptable(model)}, comp
    if family == "sd15":
        assert len(got) == 72 and len(nm.modules) - len(got) == 282


# ----------------------------------------------------------------------------------- name round trips
def _namings():
    out = [(name, f.naming()) for name, f in sd.SD_FAMILIES.items()]
    for name, make in CHECKPOINTS.items():
        out.append((f"tiny-{name}", get_family(name).naming(make().ckpt)))
    return out


@pytest.mark.parametrize("label,nm", _namings(), ids=lambda x: x if isinstance(x, str) else "")
def test_every_name_resolves_back_to_its_canonical(label, nm):
    first_te = nm.structure.text_encoders[0].component if nm.structure.text_encoders else None
    for m in nm.modules:
        c = m.canonical
        names = [c, nm.kohya_stem(c, "diffusers"), nm.kohya_stem(c, "original"), nm.comfy_key(c)]
        if m.rows is None:
            names.append(m.original)
        if m.component in ("unet", first_te):
            names.append(m.path)
        if m.component != "unet":
            names.append(sd.flatten_text_model(c))
            assert nm.kohya_stem(c, "original") == nm.kohya_stem(c, "diffusers")
        for n in names:
            assert nm.resolve(n) == c, (n, c)
    assert nm.resolve("lora_unet_nothing_here") is None


def test_name_examples():
    xl = get_family("sdxl").naming()
    c = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert xl.kohya_stem(c) == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"
    assert xl.kohya_stem(c, "original") == "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"
    assert xl.comfy_key(c) == "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    assert xl.module(c).original == "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k"
    assert xl.resolve("lora_unet_output_blocks_2_2_conv") == "unet.up_blocks.0.upsamplers.0.conv"
    assert xl.resolve("lora_unet_label_emb_0_0") == "unet.add_embedding.linear_1"
    q = xl.module("text_encoder_2.text_model.encoder.layers.3.self_attn.k_proj")
    assert q.rows == (1280, 2560) and q.weight_key.endswith("resblocks.3.attn.in_proj_weight")
    assert xl.kohya_stem(q.canonical) == "lora_te2_text_model_encoder_layers_3_self_attn_k_proj"
    assert (
        xl.comfy_key(q.canonical)
        == "text_encoders.clip_g.transformer.text_model.encoder.layers.3.self_attn.k_proj"
    )
    assert (
        xl.resolve("lora_te_text_model_encoder_layers_0_mlp_fc1")
        == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    )
    assert xl.module("text_encoder_2.text_projection").transpose
    s15 = get_family("sd15").naming()
    assert (
        sd.kohya_stem("unet.up_blocks.0.upsamplers.0.conv", "original") == "lora_unet_output_blocks_2_1_conv"
    )
    assert s15.comfy_key("text_encoder.text_model.encoder.layers.0.self_attn.q_proj").startswith(
        "text_encoders.clip_l."
    )
    assert sd.comfy_key("text_encoder.text_model.encoder.layers.0.mlp.fc2", "sd2").startswith(
        "text_encoders.clip_h."
    )
    assert (
        sd.resolve("lora_te1_text_model_encoder_layers_0_mlp_fc1")
        == "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    )
    # SD2: diffusers drops OpenCLIP-H's last layer (23 of 24 are mapped)
    s2 = get_family("sd2").naming()
    assert s2.resolve("lora_te_text_model_encoder_layers_22_mlp_fc1") is not None
    assert s2.resolve("lora_te_text_model_encoder_layers_23_mlp_fc1") is None
    assert get_family("sdxl_refiner").naming().resolve("lora_te_text_model_encoder_layers_0_mlp_fc1") == (
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"
    )


def test_old_sd1_text_encoder_layout_without_text_model():
    ckpt = CHECKPOINTS["sd15"]().ckpt
    old = {
        k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
        for k, v in ckpt.items()
    }
    maps = [m for m in sd.module_maps(old) if m.component == "text_encoder"]
    assert maps and all(m.weight_key in old and ".text_model." not in m.original for m in maps)
    assert all(".text_model." in m.canonical for m in maps)


# --------------------------------------------------------------------------- diffusers' kohya loader
def _kohya_through_diffusers(nm, stems: dict[str, str], sgm: bool) -> dict[str, str]:
    """Feed one lora_down/lora_up/alpha triple per stem to diffusers; return stem → module it loads into."""
    state = {}
    for i, stem in enumerate(stems):
        state[f"{stem}.lora_down.weight"] = torch.full((1, 1), float(i))
        state[f"{stem}.lora_up.weight"] = torch.zeros(1, 1)
        state[f"{stem}.alpha"] = torch.tensor(1.0)
    if sgm:
        cfg = SimpleNamespace(layers_per_block=nm.structure.unet.layers_per_block)
        state = _maybe_map_sgm_blocks_to_diffusers(state, cfg)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)
    unet = convert_unet_state_dict_to_peft({k: v for k, v in converted.items() if k.startswith("unet.")})
    tes = {k: v for k, v in converted.items() if not k.startswith("unet.")}
    if tes:
        tes = convert_state_dict_to_peft(convert_state_dict_to_diffusers(tes))
    names = list(stems)
    return {
        names[int(v.item())]: k.removesuffix(".lora_A.weight")
        for k, v in {**unet, **tes}.items()
        if k.endswith("lora_A.weight")
    }


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_diffusers_style_stems_load_into_the_same_modules_in_diffusers(family):
    tiny = CHECKPOINTS[family]()
    nm = tiny.naming
    stems = {
        nm.kohya_stem(m.canonical, "diffusers"): m.canonical
        for m in nm.modules
        if m.path != "text_projection"
    }
    got = _kohya_through_diffusers(nm, stems, sgm=False)
    wrong = {s: got.get(s) for s, c in stems.items() if got.get(s) != c}
    # diffusers' _convert_unet_lora_key has no rule for diffusers-spelt add_embedding (only sgm label_emb):
    # its SDXL index-strip turns add_embedding.linear_1 into add_embedding.linear.
    assert set(wrong) == {s for s in stems if "add_embedding" in s}
    modules = {f"unet.{n}" for n in _adaptable(tiny.unet)}
    for comp, model in tiny.text_encoders.items():
        modules |= {f"{comp}.{sd.normalise_text_model(n)}" for n in _adaptable(model)}
    assert all(got[s] in modules for s in stems if s not in wrong)


def test_kohya_original_style_stems_map_through_sgm_blocks_in_diffusers():
    tiny = CHECKPOINTS["sdxl"]()
    nm = tiny.naming
    stems = {
        nm.kohya_stem(m.canonical, "original"): m.canonical for m in nm.modules if m.path != "text_projection"
    }
    got = _kohya_through_diffusers(nm, stems, sgm=True)
    assert got == stems


def test_sd1_original_style_stems_through_sgm_blocks_where_diffusers_can():
    # _maybe_map_sgm_blocks_to_diffusers matches block ids by substring (input_blocks_1 also takes
    # input_blocks_10/11) and reads output_blocks_N_1_conv as an attention: SD1's 12-block layout and
    # its attention-less up block 0 upsampler only work outside those cases.
    nm = CHECKPOINTS["sd15"]().naming
    stems = {}
    for m in nm.modules:
        if m.component != "unet":
            continue
        stem = nm.kohya_stem(m.canonical, "original")
        if any(f"_blocks_{n}_" in stem for n in (1, 10, 11)) or stem.endswith("output_blocks_2_1_conv"):
            continue
        stems[stem] = m.canonical
    assert len(stems) > 100
    assert _kohya_through_diffusers(nm, stems, sgm=True) == stems


# ---------------------------------------------------------------------------------------- detection
def test_detect_checkpoint_layouts_and_families():
    xl = CHECKPOINTS["sdxl"]().ckpt
    assert sd.detect({k: v for k, v in xl.items() if k.startswith("model.")}) == ("sdxl", "original")
    assert sd.detect(["unet.down_blocks.0.resnets.0.conv1.weight", "text_encoder_2.x"]) == (
        "sdxl",
        "diffusers",
    )
    assert sd.detect(["conditioner.embedders.0.model.text_projection"]) == ("sdxl_refiner", "original")
    assert sd.detect(["cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"]) == (
        "sd15",
        "original",
    )
    assert sd.detect(["first_stage_model.x"]) is None
    assert get_family("sd2").detect(CHECKPOINTS["sd2"]().ckpt) == ("sd2", "original")
    with pytest.raises(ValueError, match="unknown model family"):
        get_family("sd4")


def test_detect_adapter_family_and_convention():
    xl = get_family("sdxl").naming()
    s15 = get_family("sd15").naming()
    some_xl = [m.canonical for m in xl.modules][::7]
    keys = [f"{xl.kohya_stem(c, 'original')}.lora_down.weight" for c in some_xl]
    assert sd.detect_adapter(keys) == ("sdxl", "kohya_original")
    keys = [f"{s15.kohya_stem(m.canonical)}.lora_up.weight" for m in s15.modules]
    assert sd.detect_adapter(keys) == ("sd15", "kohya_diffusers")
    keys = [f"{xl.comfy_key(c)}.lora_B.weight" for c in some_xl]
    assert sd.detect_adapter(keys) == ("sdxl", "comfy")
    keys = [f"{c}.lora_A.weight" for c in some_xl]
    assert sd.detect_adapter(keys) == ("sdxl", "diffusers")
    s2 = get_family("sd2").naming()
    keys = [f"{s2.kohya_stem(m.canonical)}.alpha" for m in s2.modules]
    assert sd.detect_adapter(keys) == ("sd2", "kohya_diffusers")
    assert sd.detect_adapter(["foo.lora_A.weight"]) is None
    assert sd.adapter_module("lora_unet_x_y.hada_w1_a") == "lora_unet_x_y"


def test_module_map_fields():
    m = ModuleMap(
        "unet.conv_in",
        "model.diffusion_model.input_blocks.0.0",
        None,
        "model.diffusion_model.input_blocks.0.0.weight",
    )
    assert (m.component, m.path) == ("unet", "conv_in")
    assert (
        sd.flatten_text_model("text_encoder.text_model.encoder.layers.0.mlp.fc1")
        == "text_encoder.encoder.layers.0.mlp.fc1"
    )
    assert sd.normalise_text_model("encoder.layers.0.mlp.fc1") == "text_model.encoder.layers.0.mlp.fc1"
