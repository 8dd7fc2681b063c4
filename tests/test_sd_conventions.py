"""Stable Diffusion LoRAs between name conventions: kohya (diffusers-style and original-style stems), diffusers,
PEFT, resolved against original-layout single files; bit-exact per module."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_models import CHECKPOINTS, kohya_lora

from loratools.formats import load_adapter


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def sd(request, tmp_path_factory):
    """A tiny original-layout single file and a kohya LoRA (diffusers-style stems) on every adaptable module."""
    root = tmp_path_factory.mktemp(request.param)
    tiny = CHECKPOINTS[request.param](0)
    base = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.ckpt.items()}, str(base))
    src = root / "lora.safetensors"
    save_file(kohya_lora(tiny, seed=1, ranks=(2, 3, 4), alpha_cycle=4), str(src))
    return {"root": root, "base": base, "src": src, "tiny": tiny, "family": request.param}


def same_layers(a, b) -> None:
    assert set(a.layers) == set(b.layers)
    for name, la in a.layers.items():
        lb = b.layers[name]
        assert torch.equal(la.down, lb.down) and torch.equal(la.up, lb.up), name
        assert la.scale == lb.scale, name


def test_kohya_names_resolve_without_base_and_against_the_single_file(sd):
    plain = load_adapter(sd["src"])
    against = load_adapter(sd["src"], base=sd["base"])
    assert plain.family == against.family == sd["family"] and plain.resolved
    assert set(plain.layers) == {m.canonical for m in sd["tiny"].naming.modules}
    same_layers(plain, against)


@pytest.mark.parametrize("style", ["original", "diffusers"])
def test_kohya_styles_round_trip_bit_exact(cli, sd, tmp_path, style):
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    cli.ok("convert", sd["src"], "--to", "kohya", "--kohya-style", style, "-o", mid)
    keys = load_file(str(mid))
    unet = [k for k in keys if k.startswith("lora_unet_")]
    if style == "original":
        assert all(not k.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks")) for k in unet)
        assert any(k.startswith("lora_unet_input_blocks_") for k in unet)
    cli.ok("convert", mid, "--to", "kohya", "--kohya-style", "diffusers", "-o", back, "--base", sd["base"])
    src, out = load_file(str(sd["src"])), load_file(str(back))
    assert src.keys() == out.keys() and all(torch.equal(v, out[k]) for k, v in src.items())
    same_layers(load_adapter(sd["src"]), load_adapter(mid))


def test_diffusers_round_trip_bit_exact(cli, sd, tmp_path):
    mid, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    cli.ok("convert", sd["src"], "--to", "diffusers", "-o", mid)
    assert all(k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") for k in load_file(str(mid)))
    cli.ok("convert", mid, "--to", "kohya", "-o", back)
    same_layers(load_adapter(sd["src"]), load_adapter(back))
    src, out = load_file(str(sd["src"])), load_file(str(back))
    assert src.keys() == out.keys() and all(torch.equal(v, out[k]) for k, v in src.items())


def test_peft_holds_one_component(cli, sd, tmp_path):
    cli.fails("convert", sd["src"], "--to", "peft", "-o", tmp_path / "p", match="a PEFT folder adapts one model")
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(str(sd["src"])).items() if k.startswith("lora_unet_")}, str(unet_only))
    cli.ok("convert", unet_only, "--to", "peft", "-o", tmp_path / "p")
    back = tmp_path / "back.safetensors"
    cli.ok("convert", tmp_path / "p", "--to", "kohya", "-o", back)
    same_layers(load_adapter(unet_only), load_adapter(back))


def test_sdxl_first_text_encoder_is_te1_and_metadata_says_sdxl(cli, sd, tmp_path):
    out = tmp_path / "o.safetensors"
    # a rewrite: stems come from the family (the base says which: SD1 and SD2 share every name)
    cli.ok("convert", sd["src"], "--to", "kohya", "-o", out, "--rank", "1", "--base", sd["base"])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    te = {k.split("_text_model")[0] for k in keys if "_text_model_" in k}
    if sd["family"] == "sdxl":
        assert te == {"lora_te1", "lora_te2"}
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    else:
        assert te == {"lora_te"} and meta["ss_base_model_version"] == "sd_v1"


def test_adapter_for_another_family_is_an_error_naming_it(cli, sd, tmp_path):
    other = CHECKPOINTS["sdxl" if sd["family"] == "sd15" else "sd15"](0)
    base = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.ckpt.items()}, str(base))
    other_family = "sdxl" if sd["family"] == "sd15" else "sd15"
    cli.fails("inspect", sd["src"], "--base", base, match=f"a {sd['family']} adapter (")
    cli.fails("convert", sd["src"], "--to", "kohya", "-o", tmp_path / "x.safetensors", "--base", base,
              match=f"is a {other_family} checkpoint")
    assert not (tmp_path / "x.safetensors").exists()
    cli.fails("inspect", sd["src"], "--family", "sd2" if sd["family"] == "sd15" else "sd15", "--base", sd["base"],
              match="but the base")


@pytest.mark.parametrize("command", ["extract", "spectrum"])
def test_family_option_checked_against_the_checkpoints(cli, samples, tmp_path, command):
    args = [command, "--base", samples / "sd15_base.safetensors", "--tuned", samples / "sd15_tuned.safetensors"]
    out = ["-o", tmp_path / "o.safetensors", "--to", "kohya"] if command == "extract" else []
    cli.fails(*args, *out, "--family", "sdxl", match="but the base")
    assert not (tmp_path / "o.safetensors").exists()
    cli.ok(*args, *out, "--family", "sd15", "-q")
