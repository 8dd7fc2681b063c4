"""Flux.1 end to end: every convention, fused ↔ split, checked against diffusers' own loaders and converters.

A tiny real ``FluxTransformer2DModel`` (2 double + 2 single blocks, hidden 32) gets a PEFT LoRA on every Linear; its
forward output with the PEFT adapter is the truth. Our files must load into diffusers (``FluxPipeline.load_lora_weights``
for the diffusers file; diffusers' own kohya → diffusers converter for the sd-scripts file, its Flux.1 sizes scaled to
the tiny model) and give that output. Conversions between conventions must give back the same factors (split ones
bit-exact; through a fused convention: ΔW to float precision, bit-exact where the members share a scale).
Checkpoints: BFL single files (with and without ``model.diffusion_model.``) built from the tiny model with the
family's maps, and diffusers transformer folders, extract and bake alike.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.loaders import lora_conversion_utils, lora_pipeline
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from test_families_flux import to_bfl

from loratools.adapter import LoraLayer
from loratools.bake import bake
from loratools.errors import LoraToolsError
from loratools.extract import ExtractOptions, extract
from loratools.families import flux, get_family
from loratools.formats import load_adapter, save_adapter
from loratools.linalg import RankRule

TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
HIDDEN, MLP = 32, 128
#: (format, kohya style, file name): every convention loratools writes for Flux
CONVENTIONS = [("kohya", "original", "k.safetensors"), ("kohya", "diffusers", "kd.safetensors"),
               ("comfy", None, "c.safetensors"), ("lycoris", None, "l.safetensors"), ("peft", None, "p"),
               ("diffusers", None, "d")]


def tiny(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY).eval()


def forward(model: FluxTransformer2DModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    hs, enc = torch.randn(1, 8, 16, generator=g), torch.randn(1, 4, 32, generator=g)
    pooled = torch.randn(1, 32, generator=g)
    img_ids = torch.zeros(8, 3)
    img_ids[:, 1] = torch.arange(8)
    with torch.no_grad():
        return model(hidden_states=hs, encoder_hidden_states=enc, pooled_projections=pooled,
                     timestep=torch.tensor([0.5]), img_ids=img_ids, txt_ids=torch.zeros(4, 3),
                     guidance=torch.tensor([3.5]), return_dict=False)[0]


def linears(model: torch.nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def in_blocks(name: str) -> bool:
    """A module of a double or single block: the ones diffusers' kohya path loads (it drops sd-scripts' top-level
    modules: its converter leaves them without the ``transformer.`` prefix that ``load_lora_weights`` filters on)."""
    return "transformer_blocks." in name


def peft_lora(model: FluxTransformer2DModel, mixed: bool, seed: int = 3, blocks_only: bool = False) -> LoraConfig:
    """A PEFT LoRA (random A and B) on every Linear of ``model`` (of its blocks), injected in place; ``mixed``: to_k
    with another alpha (q, k, v of one fused tensor then have different scales)."""
    targets = [n for n in linears(model) if in_blocks(n) or not blocks_only]
    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False,
                     alpha_pattern={"attn.to_k": 8.0} if mixed else {})
    torch.manual_seed(seed)
    inject_adapter_in_model(cfg, model)
    return cfg


@pytest.fixture(scope="module", params=[False, True], ids=["one-scale", "mixed-scales"])
def source(request, tmp_path_factory):
    """(diffusers LoRA file written by diffusers, forward output with the PEFT adapter, mixed)."""
    folder = tmp_path_factory.mktemp("flux")
    model = tiny()
    cfg = peft_lora(model, request.param)
    FluxPipeline.save_lora_weights(folder / "src", transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    return folder / "src" / "pytorch_lora_weights.safetensors", forward(model), request.param


@pytest.fixture(scope="module", params=[False, True], ids=["one-scale", "mixed-scales"])
def block_source(request, tmp_path_factory):
    """As ``source``, with LoRAs on the blocks' Linears only (what diffusers' kohya loading path covers)."""
    folder = tmp_path_factory.mktemp("flux_blocks")
    model = tiny()
    cfg = peft_lora(model, request.param, blocks_only=True)
    FluxPipeline.save_lora_weights(folder / "src", transformer_lora_layers=get_peft_model_state_dict(model),
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    return folder / "src" / "pytorch_lora_weights.safetensors", forward(model), request.param


def write(path: Path, fmt: str, style: str | None, src, **kw) -> Path:
    save_adapter(load_adapter(src, **kw), path, fmt, kohya_style=style)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def same_factors(a: LoraLayer, b: LoraLayer) -> bool:
    return torch.equal(a.up, b.up) and torch.equal(a.down, b.down) and a.scale == b.scale


# ------------------------------------------------------------------------------------------- conventions
def test_source_is_read_as_flux_split_modules(source):
    ad = load_adapter(source[0])
    assert ad.family == "flux_dev" and len(ad.layers) == len(linears(tiny())) == 50
    assert all(n.startswith("transformer.") for n in ad.layers)


@pytest.mark.parametrize("fmt,style,name", CONVENTIONS, ids=[f"{c[0]}-{c[1]}" for c in CONVENTIONS])
def test_every_convention_and_back(source, fmt, style, name, tmp_path):
    """Split conventions give back the same factors; fused ones the same ΔW per module (bit-exact factors where the
    members of a fused tensor share a scale), and back to diffusers the same again."""
    src, _, mixed = source
    ad = load_adapter(src)
    out = write(tmp_path / name, fmt, style, src)
    back = load_adapter(out)
    assert back.family == "flux_dev" and set(back.layers) == set(ad.layers)
    fused = fmt == "comfy" or (fmt in ("kohya", "lycoris") and style != "diffusers")
    for n, la in ad.layers.items():
        if mixed and fused and n.split(".")[-1] in ("to_q", "to_k", "to_v"):  # q, k, v: to_k's scale differs
            assert rel(back.layers[n].delta(torch.float64), la.delta(torch.float64)) <= 1e-6, n
        else:
            assert same_factors(back.layers[n], la), n
    again = write(tmp_path / "again", "diffusers", None, out)
    for n, la in load_adapter(again).layers.items():
        assert rel(la.delta(torch.float64), ad.layers[n].delta(torch.float64)) <= 1e-6, n


def test_fused_files_name_fused_tensors(source, tmp_path):
    src = source[0]
    k = load_file(str(write(tmp_path / "k.safetensors", "kohya", None, src)))  # Flux's default kohya style: sd-scripts
    c = load_file(str(write(tmp_path / "c.safetensors", "comfy", None, src)))
    assert k["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].shape == (3 * HIDDEN, 12)
    assert k["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape == (16, HIDDEN)
    assert c["diffusion_model.single_blocks.1.linear1.lora_up.weight"].shape == (3 * HIDDEN + MLP, 16)
    assert not any("to_q" in key or "transformer_blocks" in key for key in [*k, *c])
    kd = load_file(str(write(tmp_path / "kd.safetensors", "kohya", "diffusers", src)))
    assert "lora_transformer_single_transformer_blocks_0_proj_mlp.lora_up.weight" in kd


def test_convert_reports_the_summed_rank(source, tmp_path, cli):
    res = cli.ok("convert", source[0], "--to", "comfy", "-o", tmp_path / "c.safetensors", "--json")
    warnings = json.loads(res.stdout)["warnings"]
    assert any("6 fused tensor(s)" in w and "rank" in w for w in warnings), warnings


# ----------------------------------------------------------------------------------- the real loaders
def _load_into_diffusers(path: Path) -> torch.Tensor:
    path = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    model = tiny()
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pipe.load_lora_weights(str(path))
    return forward(model)


def kohya_converter():
    """diffusers' ``_convert_kohya_flux_lora_to_diffusers`` for the tiny model: its linear1 row sizes are Flux.1's
    literals (3072 ×3, 12288); only those are changed, the rest is the library's code."""
    fn = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers
    src = inspect.getsource(fn)
    assert src.count("dims=[3072, 3072, 3072, 12288]") == 1
    ns = dict(fn.__globals__)
    exec(src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{HIDDEN}, {HIDDEN}, {HIDDEN}, {MLP}]"), ns)
    return ns[fn.__name__]


@pytest.fixture
def kohya_into_diffusers(monkeypatch):
    """Forward output after ``FluxPipeline.load_lora_weights`` of a kohya file (diffusers' whole kohya path, with
    :func:`kohya_converter`'s tiny sizes)."""
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", kohya_converter())
    return _load_into_diffusers


def test_diffusers_output_loads_in_diffusers_like_the_source(source, tmp_path):
    src, truth, _ = source
    out = write(tmp_path / "d", "diffusers", None, src)
    assert rel(_load_into_diffusers(out), truth) <= 1e-5


@pytest.mark.parametrize("via", ["kohya", "comfy"])
def test_kohya_output_through_diffusers_kohya_converter(block_source, via, tmp_path, kohya_into_diffusers):
    """Our sd-scripts file (fused, block-diagonal) read by diffusers' own kohya converter: same outputs. (Read back by
    loratools from ComfyUI keys first, so the comfy → kohya path is covered too.)"""
    src, truth, _ = block_source
    if via == "comfy":
        src = write(tmp_path / "c.safetensors", "comfy", None, src)
    out = write(tmp_path / "k.safetensors", "kohya", "original", src)
    assert rel(kohya_into_diffusers(out), truth) <= 1e-5


def _sd_scripts_lora(seed: int = 5, blocks_only: bool = False) -> dict[str, torch.Tensor]:
    """A kohya Flux LoRA as sd-scripts trains it: one LoRA per BFL tensor (fused qkv/linear1: shared down, full up)."""
    model = tiny()
    nm = get_family("flux_dev").naming(model.state_dict())
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for m in nm.modules:
        stem = nm.kohya_stem(m.canonical, "original")
        if stem + ".alpha" in out or (blocks_only and not in_blocks(m.canonical)):
            continue
        rows = sum(shapes[g2.path + ".weight"][0] for g2 in nm.by_original(m.original))
        cols = shapes[m.path + ".weight"][1]
        out[stem + ".lora_down.weight"] = torch.randn(4, cols, generator=g) * 0.1
        out[stem + ".lora_up.weight"] = torch.randn(rows, 4, generator=g) * 0.1
        out[stem + ".alpha"] = torch.tensor(2.0)
    return out


def test_sd_scripts_file_splits_exactly(tmp_path, kohya_into_diffusers):
    """A real sd-scripts-style fused file: loratools' diffusers output loads in diffusers exactly like diffusers' own
    conversion of the kohya file (rank unchanged: ``up`` sliced, ``down`` shared; norm_out's halves swapped), and
    converting it back to kohya gives the file's tensors bit for bit."""
    f, blocks = tmp_path / "sds.safetensors", tmp_path / "blocks.safetensors"
    state = _sd_scripts_lora()
    save_file(state, str(f))
    save_file(_sd_scripts_lora(blocks_only=True), str(blocks))
    ad = load_adapter(f)
    assert ad.family == "flux_dev" and len(ad.layers) == 50 and {la.rank for la in ad.layers.values()} == {4}
    out = write(tmp_path / "d", "diffusers", None, blocks)
    assert rel(_load_into_diffusers(out), kohya_into_diffusers(blocks)) <= 1e-5
    back = load_file(str(write(tmp_path / "k.safetensors", "kohya", None, f)))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    nm = flux.naming()
    up = state["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    assert torch.equal(ad.layers["transformer.norm_out.linear"].up, torch.cat([up[HIDDEN:], up[:HIDDEN]]))
    assert nm.module("transformer.norm_out.linear").permuted


def test_loha_on_a_fused_name_splits_through_its_factors(tmp_path):
    """A LoHa on ``single_blocks.0.linear1`` becomes exact LoRAs on q, k, v and proj_mlp (rows of its ΔW)."""
    g = torch.Generator().manual_seed(0)
    rows = 3 * HIDDEN + MLP
    w = {"hada_w1_a": (rows, 2), "hada_w1_b": (2, HIDDEN), "hada_w2_a": (rows, 2), "hada_w2_b": (2, HIDDEN)}
    t = {k: torch.randn(*s, generator=g, dtype=torch.float64).float() for k, s in w.items()}
    src = tmp_path / "loha.safetensors"
    save_file({**{f"lora_unet_single_blocks_0_linear1.{k}": v for k, v in t.items()},
               "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(2.0)}, str(src))  # alpha / rank 2: scale 1
    ad = load_adapter(src, family="flux")
    full = (t["hada_w1_a"].double() @ t["hada_w1_b"].double()) * (t["hada_w2_a"].double() @ t["hada_w2_b"].double())
    nm = get_family("flux_dev").naming(tiny().state_dict())
    assert len(ad.layers) == 4 and all(isinstance(la, LoraLayer) for la in ad.layers.values())
    for m in nm.by_original("single_blocks.0.linear1"):
        a, b = m.rows
        assert rel(ad.layers[m.canonical].delta(torch.float64), full[a:b]) <= 1e-6, m.canonical


def test_dora_magnitude_is_sliced_and_stacked(tmp_path):
    """A kohya/LyCORIS ``dora_scale`` per output row on a fused tensor: sliced with ``up``; written back fused."""
    f = tmp_path / "sds.safetensors"
    state = {k: v for k, v in _sd_scripts_lora().items() if "double_blocks_0_img_attn_qkv" in k}
    state["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"] = torch.rand(3 * HIDDEN, 1) + 0.5
    save_file(state, str(f))
    ad = load_adapter(f)
    q = ad.layers["transformer.transformer_blocks.0.attn.to_k"]
    assert torch.equal(q.magnitude.reshape(-1), state["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"][HIDDEN:2 * HIDDEN, 0])
    back = load_file(str(write(tmp_path / "k.safetensors", "kohya", None, f)))
    assert all(torch.equal(back[k], v) for k, v in state.items())


# -------------------------------------------------------------------------------------------- checkpoints
def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    """The tiny model and a fine-tune of it, as diffusers transformer folders and BFL single files (bare and with
    ``model.diffusion_model.``)."""
    base, tuned = tiny(), tiny()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _name, p in tuned.named_parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) * 0.05)
    nm = get_family("flux_dev").naming(base.state_dict())
    out = {}
    for label, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(tmp_path / f"{label}_diffusers")
        out[f"{label}_diffusers"] = tmp_path / f"{label}_diffusers"
        for prefix in ("", "model.diffusion_model."):
            f = tmp_path / f"{label}_bfl{'_prefixed' if prefix else ''}.safetensors"
            save_file({k: v.contiguous() for k, v in to_bfl(model.state_dict(), nm, prefix).items()}, str(f))
            out[f.stem] = f
    return out


@pytest.mark.parametrize("base_file", ["base_bfl", "base_bfl_prefixed"])
def test_extraction_across_layouts_equals_diffusers_extraction(base_file, tmp_path):
    ck = _checkpoints(tmp_path)
    opts = ExtractOptions(rule=RankRule("rank", 4))
    ref = extract(ck["base_diffusers"], ck["tuned_diffusers"], opts)
    got = extract(ck[base_file], ck["tuned_diffusers"], opts)
    assert ref.adapter.family == got.adapter.family == "flux_dev"
    assert set(got.adapter.layers) == set(ref.adapter.layers) and len(ref.adapter.layers) == 50
    for n, la in ref.adapter.layers.items():
        assert rel(got.adapter.layers[n].delta(torch.float64), la.delta(torch.float64)) <= 1e-5, n
    back = extract(ck["base_diffusers"], ck[base_file.replace("base", "tuned")], opts)  # and the other way round
    for n, la in ref.adapter.layers.items():
        assert rel(back.adapter.layers[n].delta(torch.float64), la.delta(torch.float64)) <= 1e-5, n
    # the prefixed-BFL extraction written for ComfyUI names every layer by a BFL tensor
    out = tmp_path / "c.safetensors"
    save_adapter(got.adapter, out, "comfy")
    assert all(k.startswith("diffusion_model.") for k in load_file(str(out)))
    assert len(load_adapter(out, base=ck[base_file]).layers) == 50


@pytest.mark.parametrize("base_file", ["base_bfl", "base_bfl_prefixed"])
def test_bake_into_bfl_equals_merging_in_diffusers(source, base_file, tmp_path):
    src, truth, _ = source
    ck = _checkpoints(tmp_path)
    out = tmp_path / "baked.safetensors"
    bake(ck[base_file], [(str(src), 1.0)], out)
    nm = get_family("flux_dev").naming(load_file(str(out)))
    baked = load_file(str(out))
    model = tiny()
    state = model.state_dict()
    for m in nm.modules:
        state[f"{m.path}.weight"] = flux.take_rows(m, baked[m.weight_key])
    model.load_state_dict(state)
    assert rel(forward(model), truth) <= 1e-5


def test_kohya_lora_against_a_bfl_base_and_a_diffusers_folder(tmp_path):
    """--base of either layout resolves the same sd-scripts file to the same split layers."""
    ck = _checkpoints(tmp_path)
    f = tmp_path / "sds.safetensors"
    save_file(_sd_scripts_lora(), str(f))
    a = load_adapter(f, base=ck["base_bfl_prefixed"])
    b = load_adapter(f, base=ck["base_diffusers"])
    assert set(a.layers) == set(b.layers) and len(a.layers) == 50
    assert all(same_factors(a.layers[n], b.layers[n]) for n in a.layers)


def test_wrong_shape_fused_layer_is_one_line_error(tmp_path):
    f = tmp_path / "bad.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, HIDDEN),
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(HIDDEN, 4),
               "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(4, HIDDEN),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(HIDDEN, 4)}, str(f))
    with pytest.raises(LoraToolsError, match="img_attn_qkv.*rows"):
        load_adapter(f)


# ----------------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("fmt,style,name,convention,trainer", [
    ("kohya", "original", "k.safetensors", "kohya_original", "sd-scripts style (kohya)"),
    ("kohya", "diffusers", "kd.safetensors", "kohya_diffusers", "OneTrainer"),
    ("comfy", None, "c.safetensors", "comfy", "ComfyUI-native"),
    ("diffusers", None, "d", "diffusers", "diffusers / PEFT"),
])
def test_inspect_reports_family_convention_and_trainer(source, fmt, style, name, convention, trainer, tmp_path, cli):
    out = write(tmp_path / name, fmt, style, source[0])
    s = json.loads(cli.ok("inspect", out, "--json").stdout)["summary"]
    assert (s["family"], s["convention"], s["trainer"]) == ("flux_dev", convention, trainer)
    assert s["layers"] == 50


def test_family_option_alias(source, tmp_path, cli):
    s = json.loads(cli.ok("inspect", source[0], "--family", "flux", "--json").stdout)["summary"]
    assert s["family"] == "flux_dev"


def _fused_deltas(path: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(path))
    out = {}
    for k in t:
        if k.endswith(".lora_up.weight"):
            stem = k.removesuffix(".lora_up.weight")
            up, down = t[k].double(), t[stem + ".lora_down.weight"].double()
            out[stem] = up @ down * (float(t[stem + ".alpha"]) / down.shape[0])
    return out


@pytest.mark.parametrize("fmt", ["comfy", "kohya"])
def test_rank_rule_on_a_fused_output_is_the_optimal_truncation_of_the_fused_delta(source, fmt, tmp_path, cli):
    full = write(tmp_path / "full.safetensors", fmt, None, source[0])
    res = cli.ok("convert", source[0], "--to", fmt, "--rank", "6", "-o", tmp_path / "r.safetensors", "--json")
    rows = {r["name"]: r for r in json.loads(res.stdout)["per_layer"]}
    want, got = _fused_deltas(full), _fused_deltas(tmp_path / "r.safetensors")
    assert want.keys() == got.keys()
    fused = [k for k in want if k.endswith(("qkv", "linear1"))]
    assert len(fused) == 6
    for k in fused:
        s = torch.linalg.svdvals(want[k])
        optimum = float(s[6:].norm() / s.norm())
        err = float((got[k] - want[k]).norm() / want[k].norm())
        assert abs(err - optimum) <= 1e-5, k
    truncated = [r for r in rows.values() if r["action"] == "truncated" and r["source_rank"] > 6]
    assert len(truncated) == 6 and all(r["rank"] == 6 for r in truncated)


def test_sd_scripts_file_through_diffusers_comes_back_at_its_rank(tmp_path):
    """sd-scripts → diffusers (each module gets the shared down) → kohya: the members' downs are equal, so the fused
    LoRA is their ups stacked at the file's rank, and equals the sd-scripts file bit for bit."""
    f = tmp_path / "sds.safetensors"
    state = _sd_scripts_lora()
    save_file(state, str(f))
    d = write(tmp_path / "d", "diffusers", None, f)
    back = load_file(str(write(tmp_path / "k.safetensors", "kohya", None, d)))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


def test_resize_of_an_sd_scripts_file_keeps_it_fused(tmp_path, cli):
    """resize writes back in the input's convention, truncating each fused tensor's ΔW (not a block-diagonal stack
    of per-module truncations, which would grow the rank)."""
    f = tmp_path / "sds.safetensors"
    state = _sd_scripts_lora()
    save_file(state, str(f))
    cli.ok("resize", f, "--rank", "2", "-o", tmp_path / "r.safetensors")
    got = load_file(str(tmp_path / "r.safetensors"))
    assert {k.split(".")[0] for k in got} == {k.split(".")[0] for k in state}
    assert all(v.shape[0] == 2 for k, v in got.items() if k.endswith("lora_down.weight"))
    want = _fused_deltas(f)
    for stem, d in _fused_deltas(tmp_path / "r.safetensors").items():
        s = torch.linalg.svdvals(want[stem])
        assert abs(float((d - want[stem]).norm() / want[stem].norm()) - float(s[2:].norm() / s.norm())) <= 1e-5, stem


@pytest.mark.parametrize("prefix", ["diffusion_model.", "model.diffusion_model."])
def test_checkpoint_keyed_lora_splits(prefix, tmp_path):
    """LoRA keys named after the checkpoint tensors (ComfyUI's ``diffusion_model.``, the full state dict's
    ``model.diffusion_model.``) split like sd-scripts stems."""
    state = _sd_scripts_lora()
    nm = get_family("flux_dev").naming(tiny().state_dict())
    by_stem = {nm.kohya_stem(m.canonical, "original"): prefix + flux.strip_prefix(m.original) for m in nm.modules}
    f = tmp_path / "ckpt_keys.safetensors"
    save_file({by_stem[k.split(".")[0]] + "." + k.split(".", 1)[1]: v for k, v in state.items()}, str(f))
    sds = tmp_path / "sds.safetensors"
    save_file(state, str(sds))
    a, b = load_adapter(f), load_adapter(sds)
    assert a.family == "flux_dev" and set(a.layers) == set(b.layers) and len(a.layers) == 50
    assert all(same_factors(a.layers[n], b.layers[n]) for n in a.layers)


def test_clip_l_layers_of_a_flux_lora(tmp_path):
    """sd-scripts Flux LoRAs may train CLIP-L (``lora_te1_…``): those layers take SD1.x's CLIP-L names and every
    convention carries them (diffusers ``text_encoder.…``, ComfyUI ``text_encoders.clip_l.…``)."""
    state = _sd_scripts_lora()
    te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    g = torch.Generator().manual_seed(1)
    state.update({f"{te}.lora_down.weight": torch.randn(4, 768, generator=g),
                  f"{te}.lora_up.weight": torch.randn(768, 4, generator=g), f"{te}.alpha": torch.tensor(4.0)})
    f = tmp_path / "te.safetensors"
    save_file(state, str(f))
    ad = load_adapter(f)
    name = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert ad.family == "flux_dev" and len(ad.layers) == 51 and name in ad.layers
    keys = load_file(str(write(tmp_path / "c.safetensors", "comfy", None, f)))
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight" in keys
    d = write(tmp_path / "d", "diffusers", None, f)
    back = load_file(str(write(tmp_path / "k.safetensors", "kohya", None, d)))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


def test_untrained_fused_lora_keeps_every_module(tmp_path):
    """A freshly initialised sd-scripts file (every lora_up zero) splits into every member module with the shared
    down, and comes back bit for bit: nothing is dropped for having zero rows."""
    f = tmp_path / "zero.safetensors"
    state = {k: (torch.zeros_like(v) if "lora_up" in k else v) for k, v in _sd_scripts_lora().items()}
    save_file(state, str(f))
    ad = load_adapter(f)
    assert len(ad.layers) == 50
    back = load_file(str(write(tmp_path / "k.safetensors", "kohya", None, write(tmp_path / "d", "diffusers", None, f))))
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())


def test_merge_of_sd_scripts_files_keeps_their_convention(tmp_path, cli):
    """merge writes back in the inputs' convention: fused sd-scripts names, each fused ΔW the weighted sum."""
    f = tmp_path / "sds.safetensors"
    state = _sd_scripts_lora()
    save_file(state, str(f))
    cli.ok("merge", f"{f}:0.5", f"{f}:0.25", "-o", tmp_path / "m.safetensors", "-q")
    got = load_file(str(tmp_path / "m.safetensors"))
    assert {k.split(".")[0] for k in got} == {k.split(".")[0] for k in state}
    want = _fused_deltas(f)
    for stem, d in _fused_deltas(tmp_path / "m.safetensors").items():
        assert float((d - 0.75 * want[stem]).norm()) <= 1e-5 * float(want[stem].norm()), stem
    # --rank truncates each fused ΔW (rank 4 here: exact), not a block-diagonal stack of per-module merges
    cli.ok("merge", f"{f}:0.5", f"{f}:0.25", "--rank", "4", "-o", tmp_path / "r.safetensors", "-q")
    got = load_file(str(tmp_path / "r.safetensors"))
    assert all(v.shape[0] == 4 for k, v in got.items() if k.endswith("lora_down.weight"))
    for stem, d in _fused_deltas(tmp_path / "r.safetensors").items():
        assert float((d - 0.75 * want[stem]).norm()) <= 1e-5 * float(want[stem].norm()), stem
