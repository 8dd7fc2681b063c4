"""ComfyUI-native adapter format (``--to comfy``): keys ComfyUI's loader maps, round trips, refusals.

ComfyUI is not installed here, so its key map is rebuilt as an oracle from what ``comfy/lora.py`` does
(``model_lora_keys_unet``: ``diffusion_model.X`` for every ``diffusion_model.X.weight`` of the model;
``model_lora_keys_clip``: ``text_encoders.<k minus .weight>`` for every weight ``k`` of the CLIP model) applied to the
state dicts ComfyUI builds from an original single file (``supported_models.py`` ``process_clip_state_dict``:
``cond_stage_model.`` → ``clip_l.`` (SD1), ``cond_stage_model.model.`` → ``clip_h.`` (SD2), SDXL's
``conditioner.embedders.0.transformer.`` → ``clip_l.transformer.`` and ``embedders.1.model.`` → ``clip_g.``, OpenCLIP
turned into HF layout by ``utils.clip_text_transformers_convert``). The oracle is written from those facts, not from
loratools' family maps.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sd_models import CHECKPOINTS
from sd_models import kohya_lora as sd_kohya_lora

from loratools.adapter import Adapter, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats import REGISTRY, detect_format, load_adapter, save_adapter
from loratools.formats.comfy import is_comfy_key

SAMPLES_LLM = "samples/kohya_lora.safetensors"
LORA_SUFFIXES = (".lora_up.weight", ".lora_down.weight", ".alpha")

# ComfyUI's CLIP state-dict prefix for each text encoder of an original single file
CLIP_PREFIXES = {
    "sd15": {"cond_stage_model.transformer.": ("clip_l.transformer.", "clip")},
    "sd2": {"cond_stage_model.model.": ("clip_h.transformer.", "open_clip")},
    "sdxl": {"conditioner.embedders.0.transformer.": ("clip_l.transformer.", "clip"),
             "conditioner.embedders.1.model.": ("clip_g.transformer.", "open_clip")},
}
# comfy/utils.py transformers_convert: OpenCLIP resblock children → HF encoder-layer children
OPEN_CLIP_RENAMES = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def comfy_state_dict_shapes(tiny) -> dict[str, tuple[int, ...]]:
    """Weight shapes of ComfyUI's model + CLIP state dicts for an original single file, by ComfyUI key."""
    out: dict[str, tuple[int, ...]] = {}
    for k, v in tiny.ckpt.items():
        if k.startswith("model.diffusion_model."):
            out[k[len("model."):]] = tuple(v.shape)
            continue
        for src, (dst, kind) in CLIP_PREFIXES[tiny.family].items():
            if not k.startswith(src):
                continue
            rest = k[len(src):]
            if kind == "clip":
                out[dst + rest] = tuple(v.shape)
            elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", rest):
                for p in ("q_proj", "k_proj", "v_proj"):
                    out[f"{dst}text_model.encoder.layers.{m[1]}.self_attn.{p}.weight"] = (v.shape[0] // 3, v.shape[1])
            elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.weight", rest):
                out[f"{dst}text_model.encoder.layers.{m[1]}.{OPEN_CLIP_RENAMES[m[2]]}.weight"] = tuple(v.shape)
            elif rest == "text_projection":  # stored transposed, becomes a Linear weight
                out[f"{dst}text_projection.weight"] = tuple(v.T.shape)
            elif rest == "token_embedding.weight":
                out[f"{dst}text_model.embeddings.token_embedding.weight"] = tuple(v.shape)
    return out


def comfy_lora_key_map(tiny) -> dict[str, tuple[int, ...]]:
    """The LoRA module keys ComfyUI's generic maps accept for this model (→ the weight's shape), .weight only."""
    out = {}
    for k, shape in comfy_state_dict_shapes(tiny).items():
        if not k.endswith(".weight"):
            continue
        mod = k[: -len(".weight")]
        out[mod if mod.startswith("diffusion_model.") else f"text_encoders.{mod}"] = shape
    return out


def adaptable(key_map: dict[str, tuple[int, ...]], family: str) -> set[str]:
    """Linear / Conv weights of the map, less embeddings and SD2's text_projection (diffusers drops it)."""
    return {k for k, s in key_map.items() if len(s) >= 2 and "embedding" not in k
            and not (family == "sd2" and k.endswith("text_projection"))}


def kohya_lora(tiny, rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya LoRA with diffusers-style stems on every module of the tiny model, random factors and alphas."""
    return sd_kohya_lora(tiny, seed, ranks=(rank,), alpha_cycle=5)


def tensors_of(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def modules_of(keys) -> set[str]:
    return {k[: -len(s)] for k in keys for s in LORA_SUFFIXES if k.endswith(s)}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def tiny(request):
    return CHECKPOINTS[request.param]()


@pytest.fixture
def files(tiny, tmp_path):
    """The tiny single file, a kohya LoRA on every module, and that LoRA converted --to comfy."""
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.ckpt.items()}, str(ckpt))
    kohya = tmp_path / "kohya.safetensors"
    save_file(kohya_lora(tiny), str(kohya), {"ss_network_dim": "2", "ss_output_name": "x"})
    comfy = tmp_path / "comfy.safetensors"
    return ckpt, kohya, comfy


# --------------------------------------------------------------------------------------------- keys
def test_every_written_key_is_one_comfyui_maps(tiny, files, cli):
    ckpt, kohya, comfy = files
    cli.ok("convert", kohya, "--to", "comfy", "-o", comfy, "--base", ckpt)
    tensors, _ = tensors_of(comfy)
    assert all(k.endswith(LORA_SUFFIXES) for k in tensors)
    mods = modules_of(tensors)
    key_map = comfy_lora_key_map(tiny)
    assert mods <= set(key_map), sorted(mods - set(key_map))[:5]
    # an adapter on every module covers exactly the map's adaptable modules
    assert mods == adaptable(key_map, tiny.family), sorted(adaptable(key_map, tiny.family) ^ mods)[:5]
    for mod in mods:  # up @ down has the weight's shape (ComfyUI reshapes the product to it), alpha always there
        up, down = tensors[f"{mod}.lora_up.weight"], tensors[f"{mod}.lora_down.weight"]
        assert (up.shape[0], *down.shape[1:]) == key_map[mod], mod
        assert tensors[f"{mod}.alpha"].dim() == 0
    assert detect_format(comfy) == "comfy"


def test_names_resolve_to_canonical_and_family(tiny, files, cli):
    ckpt, kohya, comfy = files
    cli.ok("convert", kohya, "--to", "comfy", "-o", comfy, "--base", ckpt)
    ad = load_adapter(comfy)
    assert ad.format == "comfy" and ad.family == tiny.family
    assert set(ad.layers) == {m.canonical for m in tiny.naming.modules}
    res = cli.ok("inspect", comfy, "--json")
    doc = json.loads(res.stdout)
    names = {la["name"] for la in doc["layers"]}
    assert names == set(ad.layers)
    assert all(n.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for n in names)
    assert doc["summary"]["format"] == "comfy"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_to_comfy_and_back_is_bit_exact(family, tmp_path, cli):
    tiny = CHECKPOINTS[family](1)
    src = kohya_lora(tiny, rank=3, seed=4)
    src.update({k: v.to(torch.bfloat16) for k, v in src.items() if k.endswith(".alpha") and "lora_te" in k})
    kohya, comfy, back = (tmp_path / n for n in ("k.safetensors", "c.safetensors", "b.safetensors"))
    save_file(src, str(kohya))
    # the tiny SD1.5's text encoder is 8 wide: its kohya names fit SD2 as well (clip_h), so the base tells
    ckpt = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.ckpt.items()}, str(ckpt))
    cli.ok("convert", kohya, "--to", "comfy", "-o", comfy, *(["--base", ckpt] if family == "sd15" else []))
    cli.ok("convert", comfy, "--to", "kohya", "-o", back)
    got, meta = tensors_of(back)
    assert set(got) == set(src)
    for k, v in src.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    # comfy → comfy is bit-exact too
    again = tmp_path / "c2.safetensors"
    cli.ok("convert", comfy, "--to", "comfy", "-o", again)
    assert comfy.read_bytes() == again.read_bytes()


def test_comfy_to_peft_and_diffusers_with_base(tiny, files, cli, tmp_path):
    ckpt, kohya, comfy = files
    cli.ok("convert", kohya, "--to", "comfy", "-o", comfy, "--base", ckpt)
    src, _ = tensors_of(comfy)
    diff = tmp_path / "diffusers.safetensors"
    cli.ok("convert", comfy, "--to", "diffusers", "-o", diff, "--base", ckpt)
    got, _ = tensors_of(diff)
    for m in tiny.naming.modules:
        key = tiny.naming.comfy_key(m.canonical)
        assert torch.equal(got[f"{m.canonical}.lora_A.weight"], src[f"{key}.lora_down.weight"])
        assert torch.equal(got[f"{m.canonical}.lora_B.weight"], src[f"{key}.lora_up.weight"])
    # a PEFT folder adapts one model: the whole-pipeline LoRA is refused, its UNet part goes through
    cli.fails("convert", comfy, "--to", "peft", "-o", tmp_path / "all", "--base", ckpt, match="adapts one model")
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in src.items() if k.startswith("diffusion_model.")}, str(unet_only))
    peft = tmp_path / "peft"
    cli.ok("convert", unet_only, "--to", "peft", "-o", peft, "--base", ckpt)
    ad = load_adapter(peft)
    unet_src = {k: v for k, v in src.items() if k.startswith("diffusion_model.")}
    assert len(ad.layers) == len(modules_of(unet_src))
    back = tmp_path / "back.safetensors"  # PEFT module paths carry no component: the family makes them UNet paths
    cli.ok("convert", peft, "--to", "comfy", "-o", back, "--base", ckpt)
    got, _ = tensors_of(back)
    assert modules_of(got) == modules_of(unet_src)
    for k, v in unet_src.items():
        assert torch.allclose(got[k].float(), v.float()), k


# --------------------------------------------------------------------------------------------- alpha
def test_alpha_always_written_with_the_scale_comfyui_applies(tmp_path):
    """ComfyUI: scale = alpha / rank, and 1 without an alpha (comfy/lora.py calculate_weight)."""
    c = "unet.down_blocks.0.attentions.0.proj_in"
    plain = LoraLayer(down=torch.randn(4, 8), up=torch.randn(8, 4))  # no alpha: scale 1
    rs = LoraLayer(down=torch.randn(4, 8), up=torch.randn(8, 4), alpha=8.0, rslora=True)  # scale 8 / 2
    ad = Adapter(layers={c: plain, "unet.conv_in": rs}, format="peft", family="sd15")
    out = tmp_path / "a.safetensors"
    save_adapter(ad, out, "comfy")
    t, _ = tensors_of(out)
    assert float(t["diffusion_model.input_blocks.1.1.proj_in.alpha"]) == 4.0
    assert float(t["diffusion_model.input_blocks.0.0.alpha"]) == pytest.approx(8.0 / 2 * 4)
    back = load_adapter(out)
    assert back.layers[c].scale == 1.0 and back.layers["unet.conv_in"].scale == pytest.approx(4.0)


def test_reads_lora_a_b_keys_and_warns_on_zero_alpha(tmp_path):
    key = "diffusion_model.input_blocks.1.1.proj_in"
    f = tmp_path / "ab.safetensors"
    save_file({f"{key}.lora_A.weight": torch.randn(2, 8), f"{key}.lora_B.weight": torch.randn(8, 2),
               f"{key}.alpha": torch.tensor(0.0)}, str(f))
    ad = load_adapter(f)
    assert ad.format == "comfy" and list(ad.layers) == ["unet.down_blocks.0.attentions.0.proj_in"]
    assert any("alpha = 0" in w for w in ad.warnings)


# ------------------------------------------------------------------------------------------- claims
def test_claims_do_not_clash_with_other_formats():
    ours = ["diffusion_model.input_blocks.1.1.proj_in.lora_up.weight",
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.alpha",
            "diffusion_model.out.2.lora_down.weight"]
    others = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight", "unet.conv_in.lora_A.weight",
              "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "diffusion_model.alpha",
              "diffusion_model.input_blocks.1.1.proj_in.weight", "text_encoders.lora_up.weight"]
    for k in ours:
        assert is_comfy_key(k)
        assert [n for n, f in REGISTRY.items() if f.claims and f.claims(k)] == ["comfy"], k
    for k in others:
        assert not is_comfy_key(k), k


# ----------------------------------------------------------------------------------------- refusals
def test_llm_adapter_to_comfy_is_one_line_error(cli, tmp_path):
    out = tmp_path / "x.safetensors"
    res = cli.fails("convert", SAMPLES_LLM, "--to", "comfy", "-o", out, "--base", "samples/base",
                    match="comfy output needs a Stable Diffusion family adapter")
    assert res.exit_code == 1 and not out.exists() and not list(tmp_path.iterdir())
    cli.fails("convert", SAMPLES_LLM, "--to", "comfy", "-o", out, match="Stable Diffusion family")
    assert not out.exists()


def test_dora_and_unknown_names_refused(tmp_path):
    c = "unet.down_blocks.0.attentions.0.proj_in"
    dora = LoraLayer(down=torch.randn(2, 8), up=torch.randn(8, 2), magnitude=torch.ones(8))
    with pytest.raises(LoraToolsError, match="DoRA"):
        save_adapter(Adapter(layers={c: dora}, format="peft", family="sd15"), tmp_path / "d.safetensors", "comfy")
    ok = LoraLayer(down=torch.randn(2, 8), up=torch.randn(8, 2))
    with pytest.raises(LoraToolsError, match="Stable Diffusion family"):
        save_adapter(Adapter(layers={"unet.no.such.module": ok}, format="peft"), tmp_path / "u.safetensors", "comfy")
    assert not list(tmp_path.iterdir())


def test_family_from_names_and_sd1_sd2_ambiguity(tmp_path):
    """Without adapter.family (merge, extract output) the family comes from the canonical names, unless SD1 and SD2
    (same names, clip_l vs clip_h) both fit a text-encoder layer."""
    ok = LoraLayer(down=torch.randn(2, 8), up=torch.randn(8, 2))
    out = tmp_path / "u.safetensors"
    save_adapter(Adapter(layers={"unet.down_blocks.0.attentions.0.proj_in": ok}, format="peft"), out, "comfy")
    assert modules_of(tensors_of(out)[0]) == {"diffusion_model.input_blocks.1.1.proj_in"}
    te = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    with pytest.raises(LoraToolsError, match="several model families"):
        save_adapter(Adapter(layers={te: ok}, format="peft"), tmp_path / "t.safetensors", "comfy")
    save_adapter(Adapter(layers={te: ok}, format="peft", family="sd2"), tmp_path / "t2.safetensors", "comfy")
    assert modules_of(tensors_of(tmp_path / "t2.safetensors")[0]) == {
        "text_encoders.clip_h.transformer.text_model.encoder.layers.0.mlp.fc1"}


def test_unknown_comfy_keys_pass_through(tmp_path):
    """A ComfyUI key no family describes (another ComfyUI model) is read and written as it is."""
    key = "diffusion_model.unknown_blocks.0.img_attn.qkv"
    f, out = tmp_path / "flux.safetensors", tmp_path / "out.safetensors"
    src = {f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(24, 2),
           f"{key}.alpha": torch.tensor(2.0)}
    save_file(src, str(f))
    ad = load_adapter(f)
    assert ad.family is None and list(ad.layers) == [key]
    save_adapter(ad, out, "comfy")
    got, _ = tensors_of(out)
    assert set(got) == set(src) and all(torch.equal(got[k], v) for k, v in src.items())


@pytest.mark.parametrize(("width", "clip"), [(768, "clip_l"), (1024, "clip_h")])
def test_sd1_or_sd2_by_width_without_base(width, clip, tmp_path, cli):
    """A kohya text-encoder LoRA without --base: SD1's CLIP-L is 768 wide, SD2's OpenCLIP-H 1024."""
    src = tmp_path / "k.safetensors"
    stem = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{stem}.lora_down.weight": torch.randn(2, width), f"{stem}.lora_up.weight": torch.randn(width, 2),
               f"{stem}.alpha": torch.tensor(1.0),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 320),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(320, 2)}, str(src))
    out = tmp_path / "c.safetensors"
    cli.ok("convert", src, "--to", "comfy", "-o", out)
    assert modules_of(tensors_of(out)[0]) == {f"text_encoders.{clip}.transformer.text_model.encoder.layers.0.self_attn.q_proj",
                                             "diffusion_model.input_blocks.1.1.proj_in"}


def test_tiny_sd2_kohya_without_base_is_ambiguous(tmp_path, cli):
    tiny = CHECKPOINTS["sd2"]()
    src, out = tmp_path / "k.safetensors", tmp_path / "c.safetensors"
    save_file(kohya_lora(tiny), str(src))
    cli.fails("convert", src, "--to", "comfy", "-o", out, match="pass --base")
    assert not out.exists()
