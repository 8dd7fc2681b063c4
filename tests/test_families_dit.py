"""SD3/3.5, Wan 2.1/2.2, Qwen-Image and HunyuanVideo family maps, checked against the libraries that define
each layout.

* every Linear of the full-size models (diffusers classes with the real configs, built on the meta device)
  is exactly one mapped module, in model order, with the row slices of its fused original;
* a tiny model's diffusers state dict written in the original layout with our maps converts back through
  diffusers' own single-file converter to the identical tensors (so the original names and rows are the
  real ones); the structure inferred from that file is the model's;
* LoRA keys built from our kohya / ComfyUI / Tencent names go through diffusers' own LoRA converters to the
  diffusers modules and rows our maps name;
* ``detect`` tells each family and layout apart from the others, from Flux.1 and from SD; mangled kohya
  names are unique.
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from diffusers import (
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)
from diffusers.loaders import lora_conversion_utils as lcu
from diffusers.loaders import single_file_utils as sfu
from sd_models import CHECKPOINTS

from loratools.families import dit_registry, flux, hunyuan_video, qwen_image, sd, sd3, wan
from loratools.families.dit_keys import mangle, strip_prefix
from loratools.families.flux import FluxModuleMap, place_rows, take_rows

MODULES = {"sd3": sd3, "wan": wan, "qwen_image": qwen_image, "hunyuan_video": hunyuan_video}


def _adaptable(model: torch.nn.Module) -> list[str]:
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
    ]


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def _patched(fn: Callable, literal: str, replacement: str) -> Callable:
    """``fn`` with one hard-coded literal changed (diffusers' HunyuanVideo converters assume hidden 3072);
    the rest is the library's code, and the full-size row layout is checked against our maps unchanged."""
    src = inspect.getsource(fn)
    assert src.count(literal) == 1, literal
    ns = dict(fn.__globals__)
    exec(src.replace(literal, replacement), ns)  # noqa: S102
    return ns[fn.__name__]


def to_original(state: dict[str, torch.Tensor], maps: list[FluxModuleMap]) -> dict[str, torch.Tensor]:
    """Invert the single-file conversion with our maps: each module's weight and bias go to its rows of
    the original tensor (NaN-initialised, so a row nobody writes fails the check)."""
    groups: dict[str, list[FluxModuleMap]] = defaultdict(list)
    for m in maps:
        groups[m.original].append(m)
    out: dict[str, torch.Tensor] = {}
    for orig, group in groups.items():
        for end in ("weight", "bias"):
            srcs = [state.get(f"{m.path}.{end}") for m in group]
            if any(s is None for s in srcs):
                assert all(s is None for s in srcs), (orig, end)
                continue
            rows = max(m.rows[1] for m in group) if group[0].fused else srcs[0].shape[0]
            t = torch.full((rows, *srcs[0].shape[1:]), float("nan"))
            for m, s in zip(group, srcs, strict=True):
                place_rows(m, s, t)
            out[f"{orig}.{end}"] = t
    assert not any(t.isnan().any() for t in out.values())
    return out


def adaptable_state(model: torch.nn.Module, maps: list[FluxModuleMap]) -> dict[str, torch.Tensor]:
    paths = {m.path for m in maps}
    return {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in paths}


# ------------------------------------------------------------------------------------ tiny models
def tiny_sd3(dual: tuple[int, ...] = (), qk: bool = False, seed: int = 0) -> SD3Transformer2DModel:
    cfg = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=8,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if qk else None,
    )
    return _randomised(SD3Transformer2DModel(**cfg), seed)


def tiny_wan(image: bool = False, seed: int = 0) -> WanTransformer3DModel:
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=8,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
        image_dim=12 if image else None,
        added_kv_proj_dim=16 if image else None,
    )
    return _randomised(WanTransformer3DModel(**cfg), seed)


def tiny_qwen(seed: int = 0) -> QwenImageTransformer2DModel:
    cfg = dict(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(2, 2, 4),
    )
    return _randomised(QwenImageTransformer2DModel(**cfg), seed)


def tiny_hunyuan(guidance: bool = True, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    cfg = dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
        guidance_embeds=guidance,
    )
    return _randomised(HunyuanVideoTransformer3DModel(**cfg), seed)


@dataclass
class Case:
    """One tiny model, its structure from the config, and its family answer."""

    label: str
    family: str
    module: Any
    model: torch.nn.Module
    structure: Any

    @property
    def maps(self) -> list[FluxModuleMap]:
        return self.structure.module_maps()

    def original(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The model in the original layout: adaptable tensors through our maps, plus the few other
        tensors diffusers' converter needs or detection reads (``EXTRAS``)."""
        ckpt = to_original(self.model.state_dict(), self.maps)
        ckpt |= EXTRAS[self.module.__name__.rsplit(".", 1)[1]](self)
        return {prefix + k: v for k, v in ckpt.items()}


def _case(label: str) -> Case:
    if label.startswith("sd3"):
        dual, qk, fam = {
            "sd3": ((), False, "sd3"),
            "sd3_medium35": ((0, 1), True, "sd35_medium"),
            "sd3_qk": ((), True, "sd35_large"),
        }[label]
        m = tiny_sd3(dual, qk)
        return Case(label, fam, sd3, m, sd3.SD3Structure.from_diffusers_config(dict(m.config)))
    if label.startswith("wan"):
        m = tiny_wan(image=label == "wan_i2v")
        return Case(label, "wan21", wan, m, wan.WanStructure.from_diffusers_config(dict(m.config)))
    if label == "qwen_image":
        m = tiny_qwen()
        return Case(
            label,
            "qwen_image",
            qwen_image,
            m,
            qwen_image.QwenImageStructure.from_diffusers_config(dict(m.config)),
        )
    m = tiny_hunyuan(guidance=label == "hunyuan_video")
    return Case(
        label,
        "hunyuan_video",
        hunyuan_video,
        m,
        hunyuan_video.HunyuanVideoStructure.from_diffusers_config(dict(m.config)),
    )


LABELS = [
    "sd3",
    "sd3_medium35",
    "sd3_qk",
    "wan_t2v",
    "wan_i2v",
    "qwen_image",
    "hunyuan_video",
    "hunyuan_video_i2v",
]


# ------------------------------------------------------------------------- full-size key coverage
FULL: dict[str, tuple[type, dict[str, Any]]] = {
    "sd3": (
        SD3Transformer2DModel,
        dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    ),
    "sd35_medium": (
        SD3Transformer2DModel,
        dict(
            num_layers=24,
            num_attention_heads=24,
            caption_projection_dim=1536,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(13)),
            qk_norm="rms_norm",
        ),
    ),
    "sd35_large": (
        SD3Transformer2DModel,
        dict(
            num_layers=38,
            num_attention_heads=38,
            caption_projection_dim=2432,
            pos_embed_max_size=192,
            qk_norm="rms_norm",
        ),
    ),
    "wan21": (WanTransformer3DModel, {}),
    "wan21_i2v": (WanTransformer3DModel, dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)),
    "wan21_1.3b": (WanTransformer3DModel, dict(num_layers=30, num_attention_heads=12, ffn_dim=8960)),
    "wan22": (WanTransformer3DModel, {}),
    "wan22_i2v": (WanTransformer3DModel, dict(in_channels=36)),
    "wan22_5b": (
        WanTransformer3DModel,
        dict(num_layers=30, num_attention_heads=24, ffn_dim=14336, in_channels=48, out_channels=48),
    ),
    "qwen_image": (QwenImageTransformer2DModel, {}),
    "hunyuan_video": (HunyuanVideoTransformer3DModel, {}),
    "hunyuan_video_i2v": (
        HunyuanVideoTransformer3DModel,
        dict(in_channels=33, guidance_embeds=False, image_condition_type="latent_concat"),
    ),
}
# full-size variant → (family detect answers on its original key set with shapes, family whose default it is or None)
FULL_FAMILY = {
    "sd3": ("sd3", "sd3"),
    "sd35_medium": ("sd35_medium", "sd35_medium"),
    "sd35_large": ("sd35_large", "sd35_large"),
    "wan21": ("wan21", "wan21"),
    "wan21_i2v": ("wan21", None),
    "wan21_1.3b": ("wan21", None),
    "wan22": ("wan21", "wan22"),
    "wan22_i2v": ("wan22", None),
    "wan22_5b": ("wan22", None),
    "qwen_image": ("qwen_image", "qwen_image"),
    "hunyuan_video": ("hunyuan_video", "hunyuan_video"),
    "hunyuan_video_i2v": ("hunyuan_video", None),
}
STRUCTURE_OF = {
    SD3Transformer2DModel: sd3.SD3Structure,
    WanTransformer3DModel: wan.WanStructure,
    QwenImageTransformer2DModel: qwen_image.QwenImageStructure,
    HunyuanVideoTransformer3DModel: hunyuan_video.HunyuanVideoStructure,
}


def _meta_original(maps: list[FluxModuleMap], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Meta tensors of the original layout, shaped as our maps say (fused originals: the stacked rows)."""
    out: dict[str, torch.Tensor] = {}
    for m in maps:
        w = state[m.path + ".weight"]
        rows = max(g.rows[1] for g in maps if g.original == m.original) if m.fused else w.shape[0]
        out[m.weight_key] = torch.empty((rows, *w.shape[1:]), device="meta")
    return out


@pytest.mark.parametrize("variant", list(FULL))
def test_full_size_models_are_covered_exactly(variant):
    cls, cfg = FULL[variant]
    with torch.device("meta"):
        model = cls(**cfg)
    st = STRUCTURE_OF[cls].from_diffusers_config(dict(model.config))
    detected, default_of = FULL_FAMILY[variant]
    module = dit_registry.DIT_MODULES[detected]
    if default_of is not None:
        assert dit_registry.DIT_DESCRIBED[default_of].default == st
    maps = st.module_maps()
    excluded = set(module.EXCLUDED)
    # every Linear / Conv exactly once, in model order, or deliberately excluded with a reason
    assert [m.path for m in maps] == [n for n in _adaptable(model) if n not in excluded]
    assert excluded <= set(_adaptable(model)) | {"time_text_embed.addition_t_embedding"}
    # Linear layers, and SD3's patch-embedding Conv2d (the Conv3d patch embeddings of Wan / HunyuanVideo are excluded)
    kinds = {type(model.get_submodule(m.path)) for m in maps}
    assert kinds == ({torch.nn.Linear, torch.nn.Conv2d} if module is sd3 else {torch.nn.Linear})
    state = model.state_dict()
    # fused originals: contiguous row slices covering the whole tensor, each the size of its module
    groups: dict[str, list[FluxModuleMap]] = defaultdict(list)
    for m in maps:
        groups[m.original].append(m)
    for orig, group in groups.items():
        if len(group) == 1:
            assert not group[0].fused
            continue
        spans = sorted(m.rows for m in group)
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), orig
        for m in group:
            assert m.rows[1] - m.rows[0] == state[m.path + ".weight"].shape[0], m.canonical
    for m in maps:
        if m.permuted:
            assert sorted(m.row_order) == [
                (0, state[m.path + ".weight"].shape[0] // 2),
                (state[m.path + ".weight"].shape[0] // 2, state[m.path + ".weight"].shape[0]),
            ]
    # full-size shapes: detect and from_keys read them back from an original-layout key set
    meta = _meta_original(maps, state)
    if cls is WanTransformer3DModel:
        meta["patch_embedding.weight"] = state["patch_embedding.weight"]
    for prefix in ("", "model.diffusion_model."):
        pre = {prefix + k: v for k, v in meta.items()}
        layout = "original" if prefix else ("diffusers" if module is qwen_image else "original_unprefixed")
        assert module.detect(pre) == (detected, layout)
        assert dit_registry.detect(pre) == (detected, layout)
        assert STRUCTURE_OF[cls].from_keys(pre) == (
            st if module is qwen_image and not prefix else type(st)(**{**st.__dict__, "prefix": prefix})
        )
    assert module.detect(state) == (detected, "diffusers")
    assert STRUCTURE_OF[cls].from_keys(state) == st


def test_family_names_and_defaults():
    assert list(dit_registry.DIT_DESCRIBED) == [
        "sd3",
        "sd35_medium",
        "sd35_large",
        "wan21",
        "wan22",
        "qwen_image",
        "hunyuan_video",
    ]
    for name, fam in dit_registry.DIT_DESCRIBED.items():
        assert fam.name == name and fam.description
        assert fam.structure() is fam.default
        assert all(m.canonical.startswith("transformer.") for m in fam.default.module_maps())
    assert not set(dit_registry.DIT_DESCRIBED) & (set(flux.FLUX_FAMILIES) | set(sd.SD_FAMILIES))
    expert = wan.WanStructure(component="transformer_2").module_maps()
    assert expert[0].canonical == "transformer_2.condition_embedder.time_embedder.linear_1"
    assert wan.EXPERT_COMPONENTS == ("transformer", "transformer_2")
    low = {"transformer_2." + k: v for k, v in tiny_wan().state_dict().items()}
    assert wan.detect(low) == ("wan21", "diffusers")
    st = wan.WanStructure.from_keys(low)
    assert st.component == "transformer_2" and st.module_maps()[-1].canonical == "transformer_2.proj_out"
    assert wan.WanStructure.from_keys(low, component="transformer").component == "transformer"


# ------------------------------------------------------- original layout = diffusers' single file
def _sd3_extras(case: Case) -> dict[str, torch.Tensor]:
    """What diffusers' SD3 converter needs beside the adaptable tensors: the positional embedding and (with
    q/k norms) the RMSNorm scales."""
    s = case.model.state_dict()
    out = {
        "pos_embed": s["pos_embed.pos_embed"],
    }
    for i in range(case.structure.num_layers):
        for attn, blk, d_q, d_k in (
            ("attn", "x_block", "norm_q", "norm_k"),
            ("attn", "context_block", "norm_added_q", "norm_added_k"),
            ("attn2", "x_block", "norm_q", "norm_k"),
        ):
            for o, d in (("ln_q", d_q), ("ln_k", d_k)):
                key = f"transformer_blocks.{i}.{attn}.{d}.weight"
                if key in s:
                    out[f"joint_blocks.{i}.{blk}.{attn}.{o}.weight"] = s[key]
    return out


def _renamed(case: Case, names: dict[str, str]) -> dict[str, torch.Tensor]:
    s = case.model.state_dict()
    return {o: s[d] for d, o in names.items()}


#: original-layout tensors beside the adaptable ones (patch embeddings; SD3's positions and q/k norms)
EXTRAS: dict[str, Callable[[Case], dict[str, torch.Tensor]]] = {
    "sd3": lambda c: _sd3_extras(c),
    "wan": lambda c: _renamed(
        c,
        {"patch_embedding.weight": "patch_embedding.weight", "patch_embedding.bias": "patch_embedding.bias"},
    ),
    "qwen_image": lambda c: {},
    "hunyuan_video": lambda c: _renamed(
        c, {"x_embedder.proj.weight": "img_in.proj.weight", "x_embedder.proj.bias": "img_in.proj.bias"}
    ),
}
#: diffusers' single-file mappings that take bare keys only (the loader strips ``model.diffusion_model.``)
BARE_ONLY = {"qwen_image", "hunyuan_video"}

CONVERTERS: dict[str, Callable[[Case], Callable]] = {
    "sd3": lambda c: sfu.convert_sd3_transformer_checkpoint_to_diffusers,
    "wan": lambda c: sfu.convert_wan_transformer_to_diffusers,
    "qwen_image": lambda c: (
        lambda ckpt, **kw: ckpt
    ),  # diffusers' single-file mapping for Qwen-Image is the identity
    "hunyuan_video": lambda c: _patched(
        sfu.convert_hunyuan_video_transformer_to_diffusers,
        "hidden_size = 3072",
        f"hidden_size = {c.structure.hidden}",
    ),
}


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_file_converts_back_exactly_with_diffusers(label, prefix):
    case = _case(label)
    name = case.module.__name__.rsplit(".", 1)[1]
    ckpt = case.original(prefix)
    if name in BARE_ONLY:
        ckpt = {strip_prefix(k): v for k, v in ckpt.items()}
    conv = CONVERTERS[name](case)(ckpt)
    ref = case.model.state_dict()
    want = adaptable_state(case.model, case.maps)
    assert set(conv) <= set(ref)
    assert want.keys() <= conv.keys()
    assert all(torch.equal(conv[k], v) for k, v in want.items())
    assert all(torch.equal(conv[k], ref[k]) for k in conv)


@pytest.mark.parametrize("label", LABELS)
def test_structure_inferred_from_the_file(label):
    case = _case(label)
    ckpt = case.original()
    st = case.structure
    layouts = {
        "": "original_unprefixed",
        "diffusion_model.": "original_unprefixed",
        "model.diffusion_model.": "original",
    }
    for prefix, layout in layouts.items():
        pre = {prefix + k: v for k, v in ckpt.items()}
        if case.module is qwen_image and not prefix:
            layout = "diffusers"
        assert case.module.detect(pre) == (case.family, layout), prefix
        assert dit_registry.detect(pre) == (case.family, layout)
        got = type(st).from_keys(pre)
        assert got == type(st)(**{**st.__dict__, "prefix": prefix})
        maps = got.module_maps()
        assert all(m.weight_key in pre for m in maps)
        assert [m.canonical for m in maps] == [m.canonical for m in case.maps]
        for m in maps:
            assert torch.equal(take_rows(m, pre[m.weight_key]), case.model.state_dict()[m.path + ".weight"])
    for pre in ("", "transformer."):
        state = {pre + k: v for k, v in case.model.state_dict().items()}
        assert case.module.detect(state) == (case.family, "diffusers")
        assert type(st).from_keys(state) == st
    assert case.module.claims(ckpt) and not case.module.claims(["vae.decoder.conv_in.weight"])
    fam = dit_registry.DIT_DESCRIBED[case.family]
    assert fam.detect(ckpt) is not None and fam.structure(ckpt) == st


def test_row_permutations_are_the_shift_scale_swaps():
    st = sd3.SD3Structure(num_layers=2, hidden=4, mlp_hidden=16)
    perm = {m.path: m.row_order for m in st.module_maps() if m.permuted}
    assert perm == {
        "norm_out.linear": ((4, 8), (0, 4)),
        "transformer_blocks.1.norm1_context.linear": ((4, 8), (0, 4)),
    }
    hv = hunyuan_video.HunyuanVideoStructure(
        num_double=1, num_single=1, num_refiner=1, hidden=4, mlp_hidden=16
    )
    assert {m.path: m.row_order for m in hv.module_maps() if m.permuted} == {
        "norm_out.linear": ((4, 8), (0, 4))
    }
    assert not any(m.permuted or m.fused for m in wan.WanStructure(num_layers=2).module_maps())
    assert not any(m.permuted or m.fused for m in qwen_image.QwenImageStructure(num_layers=2).module_maps())
    t = torch.arange(8.0)[:, None]
    nm = next(m for m in st.module_maps() if m.path == "norm_out.linear")
    assert torch.equal(take_rows(nm, t).flatten(), torch.tensor([4.0, 5, 6, 7, 0, 1, 2, 3]))


# ------------------------------------------------------------------ LoRA names = diffusers' readers
def _shaped_lora(case: Case, keep: Callable[[FluxModuleMap], bool] = lambda m: True):
    state = case.model.state_dict()
    maps = [m for m in case.maps if keep(m)]
    g = torch.Generator().manual_seed(3)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for m in maps:
        key = strip_prefix(m.original)
        if key in out:
            continue
        group = [x for x in maps if x.original == m.original]
        w = state[m.path + ".weight"]
        rows = max(x.rows[1] for x in group) if m.fused else w.shape[0]
        out[key] = (torch.randn(2, w.shape[1], generator=g), torch.randn(rows, 2, generator=g))
    return maps, out


def _check_converted(got: dict[str, torch.Tensor], maps: list[FluxModuleMap], lora: dict) -> None:
    want: dict[str, torch.Tensor] = {}
    for m in maps:
        down, up = lora[strip_prefix(m.original)]
        want[f"{m.canonical}.lora_A.weight"] = down
        want[f"{m.canonical}.lora_B.weight"] = take_rows(m, up)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], v) for k, v in want.items())


@pytest.mark.parametrize("label", ["wan_t2v", "wan_i2v"])
def test_wan_comfy_and_musubi_names_are_what_diffusers_reads(label):
    case = _case(label)
    maps, lora = _shaped_lora(case)
    comfy = {}
    for key, (down, up) in lora.items():
        comfy[f"{wan.COMFY_PREFIX}{key}.lora_down.weight"] = down
        comfy[f"{wan.COMFY_PREFIX}{key}.lora_up.weight"] = up
    _check_converted(lcu._convert_non_diffusers_wan_lora_to_diffusers(comfy), maps, lora)
    # musubi-tuner: kohya "original" stems with alpha (= rank: scale 1); its converter reads block modules only
    blocks = [m for m in maps if m.path.startswith("blocks.")]
    musubi = {}
    for m in blocks:
        stem = wan.MUSUBI_PREFIX + mangle(strip_prefix(m.original))
        down, up = lora[strip_prefix(m.original)]
        musubi |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": torch.tensor(2.0),
        }
    _check_converted(lcu._convert_musubi_wan_lora_to_diffusers(musubi), blocks, lora)


@pytest.mark.parametrize("prefix", [hunyuan_video.DIFFUSION_PIPE_PREFIX, hunyuan_video.COMFY_PREFIX])
def test_hunyuan_video_lora_names_are_what_diffusers_reads(prefix):
    case = _case("hunyuan_video")
    # diffusers' reader chunks the *down* factor too for the token refiner's self_attn_qkv and swaps the rows
    # of final_layer.adaLN_modulation.1's down factor (its rows are rank, not modulation): not checkable there
    maps, lora = _shaped_lora(
        case, lambda m: not m.original.startswith(("txt_in.individual_token_refiner", "final_layer.adaLN"))
    )
    keys = {}
    for key, (down, up) in lora.items():
        keys |= {f"{prefix}{key}.lora_A.weight": down, f"{prefix}{key}.lora_B.weight": up}
    conv = _patched(
        lcu._convert_hunyuan_video_lora_to_diffusers,
        "hidden_size = 3072",
        f"hidden_size = {case.structure.hidden}",
    )
    _check_converted(conv(keys), maps, lora)


@pytest.mark.parametrize("style", ["kohya", "comfy"])
def test_qwen_image_lora_names_are_what_diffusers_reads(style):
    case = _case("qwen_image")
    maps, lora = _shaped_lora(case)
    keys = {}
    for key, (down, up) in lora.items():
        stem = (
            qwen_image.KOHYA_ORIGINAL_PREFIX + mangle(key)
            if style == "kohya"
            else qwen_image.COMFY_PREFIX + key
        )
        keys |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": torch.tensor(2.0),
        }
    _check_converted(lcu._convert_non_diffusers_qwen_lora_to_diffusers(keys), maps, lora)


# ------------------------------------------------------------------------------- mangled names
@pytest.mark.parametrize(
    "variant", ["sd3", "sd35_medium", "sd35_large", "wan21", "wan21_i2v", "qwen_image", "hunyuan_video"]
)
def test_mangled_kohya_names_are_unique(variant):
    cls, cfg = FULL[variant]
    with torch.device("meta"):
        model = cls(**cfg)
    maps = STRUCTURE_OF[cls].from_diffusers_config(dict(model.config)).module_maps()
    module = dit_registry.DIT_MODULES[FULL_FAMILY[variant][0]]
    originals = {strip_prefix(m.original) for m in maps}
    stems = {module.KOHYA_ORIGINAL_PREFIX + mangle(o) for o in originals}
    assert len(stems) == len(originals)
    dstems = {module.KOHYA_DIFFUSERS_PREFIX + mangle(m.path) for m in maps}
    assert len(dstems) == len(maps) == len({m.canonical for m in maps})
    assert not stems & dstems


# ---------------------------------------------------------------------------------------- detection
def _flux_keys() -> dict[str, list[str]]:
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=16,
            pooled_projection_dim=8,
            in_channels=4,
            axes_dims_rope=(2, 2, 4),
        )
    st = flux.FluxStructure.from_diffusers_config(dict(model.config))
    bfl = [m.weight_key for m in st.module_maps()]
    return {
        "bfl": bfl,
        "bfl_comfy": ["model.diffusion_model." + k for k in bfl],
        "diffusers": list(model.state_dict()),
    }


def test_detect_tells_every_family_and_layout_apart():
    sets: dict[str, tuple[str, list[str], tuple[str, str]]] = {}
    for label in LABELS:
        case = _case(label)
        ckpt = list(case.original())
        diff = list(case.model.state_dict())
        orig_layout = "diffusers" if case.module is qwen_image else "original_unprefixed"
        sets[f"{label}/orig"] = (label, ckpt, (case.family, orig_layout))
        sets[f"{label}/comfy"] = (
            label,
            ["model.diffusion_model." + k for k in ckpt],
            (case.family, "original"),
        )
        sets[f"{label}/dm"] = (
            label,
            ["diffusion_model." + k for k in ckpt],
            (case.family, "original_unprefixed"),
        )
        sets[f"{label}/diffusers"] = (label, diff, (case.family, "diffusers"))
        sets[f"{label}/pipeline"] = (label, ["transformer." + k for k in diff], (case.family, "diffusers"))
    for name, (label, keys, want) in sets.items():
        own = _case(label).module
        assert own.detect(keys) == want, name
        assert dit_registry.detect(keys) == want, name
        for other in MODULES.values():
            if other is not own:
                assert other.detect(keys) is None, (name, other.__name__)
        assert sd.detect(keys) is None, name
        flux_claims = flux.detect(keys) is not None
        # Flux's detector also takes HunyuanVideo's diffusers key set: hence DETECT_ORDER (HunyuanVideo first)
        assert flux_claims == (own is hunyuan_video and want[1] == "diffusers"), name
    for name, keys in _flux_keys().items():
        assert dit_registry.detect(keys) is None, name
    for fam, make in CHECKPOINTS.items():
        tiny = make()
        assert dit_registry.detect(tiny.ckpt) is None, fam
        assert dit_registry.detect(tiny.unet.state_dict()) is None, fam
    assert dit_registry.detect([]) is None


def test_hunyuan_video_comfy_internal_names():
    assert hunyuan_video.comfy_internal("double_blocks.0.img_attn_qkv") == "double_blocks.0.img_attn.qkv"
    assert hunyuan_video.comfy_internal("double_blocks.0.txt_mod.linear") == "double_blocks.0.txt_mod.lin"
    assert hunyuan_video.comfy_internal("double_blocks.0.img_mlp.fc2") == "double_blocks.0.img_mlp.2"
    assert (
        hunyuan_video.comfy_internal("single_blocks.3.modulation.linear") == "single_blocks.3.modulation.lin"
    )
    assert hunyuan_video.comfy_internal("time_in.mlp.0") == "time_in.in_layer"
    assert hunyuan_video.comfy_internal("txt_in.c_embedder.linear_2") == "txt_in.c_embedder.out_layer"
    assert hunyuan_video.comfy_internal("txt_in.individual_token_refiner.blocks.0.self_attn_qkv") == (
        "txt_in.individual_token_refiner.blocks.0.self_attn.qkv"
    )


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_hunyuan_video_checkpoint_in_comfy_internal_names(prefix):
    case = _case("hunyuan_video")
    internal = {prefix + hunyuan_video.comfy_internal(k): v for k, v in case.original().items()}
    layout = "original" if prefix else "original_unprefixed"
    assert hunyuan_video.detect(internal) == ("hunyuan_video", layout)
    # Flux-style names: Flux's detector takes them too, the registry order answers HunyuanVideo
    assert flux.detect(internal) is not None
    assert dit_registry.detect(internal) == ("hunyuan_video", layout)
    st = hunyuan_video.HunyuanVideoStructure.from_keys(internal)
    assert st == hunyuan_video.HunyuanVideoStructure(
        **{**case.structure.__dict__, "prefix": prefix, "comfy_names": True}
    )
    maps = st.module_maps()
    assert [m.canonical for m in maps] == [m.canonical for m in case.maps]
    state = case.model.state_dict()
    assert all(torch.equal(take_rows(m, internal[m.weight_key]), state[m.path + ".weight"]) for m in maps)
    assert {m.weight_key for m in maps} | {prefix + "img_in.proj.weight"} == {
        k for k in internal if k.endswith(".weight")
    }
