"""The diffusers adapter format against diffusers' own loader and writer (DESIGN.md §3, §8: truth is the real loader).

Tiny seeded ``UNet2DConditionModel`` / transformers ``CLIPTextModel`` get a PEFT LoRA (``init_lora_weights=False``);
its ΔW and the adapted models' outputs are the truth. Our diffusers file must load through
``StableDiffusionLoraLoaderMixin.load_lora_weights`` (what ``StableDiffusionPipeline`` runs) with no key warnings and
give the same outputs; a file written by diffusers' ``save_lora_weights`` (alpha in the ``lora_adapter_metadata``
header) must be read by loratools with diffusers' scale.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from loratools.formats import load_adapter

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
ATOL = 1e-5


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2,
        norm_num_groups=4, sample_size=8,
    )
    return unet.eval()


def tiny_text_encoder() -> CLIPTextModel:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=99, max_position_embeddings=16, eos_token_id=2, bos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def lora_config(targets, **kw) -> LoraConfig:
    return LoraConfig(r=kw.pop("r", 4), target_modules=targets, init_lora_weights=False, **kw)


def adapted(model, config: LoraConfig, seed: int):
    """``model`` with a PEFT LoRA injected (PEFT's own ``inject_adapter_in_model``: transformers 5's ``add_adapter``
    wants PEFT >= 0.22); the config is kept as ``model.lora_config``."""
    torch.manual_seed(seed)
    inject_adapter_in_model(config, model)
    model.lora_config = config
    return model


def unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    sample, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 8, generator=g)
    with torch.no_grad():
        return unet(sample, 3, encoder_hidden_states=ctx).sample


def te_out(te) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 17, 42, 98, 3, 2]])
    with torch.no_grad():
        return te(ids).last_hidden_state


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """module path → PEFT's own ΔW (scaling included) of every LoRA-wrapped module."""
    return {name: m.get_delta_weight("default").detach() for name, m in model.named_modules()
            if isinstance(m, PeftLoraLayer) and "default" in m.lora_A}


def peft_folder(model, path: Path) -> Path:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) of a model's default adapter."""
    from safetensors.torch import save_file

    path.mkdir()
    sd = {f"base_model.model.{k}": v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = model.lora_config.to_dict()
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
    (path / "adapter_config.json").write_text(json.dumps(cfg, default=str))
    return path


def base_file(path: Path) -> Path:
    """The base models as one .safetensors (``unet.*``, ``text_encoder.text_model.*``): resolves kohya stems."""
    from safetensors.torch import save_file

    sd = {f"unet.{k}": v for k, v in tiny_unet().state_dict().items()}
    sd |= {f"text_encoder.text_model.{k}": v for k, v in tiny_text_encoder().state_dict().items()}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


class MiniPipeline(StableDiffusionLoraLoaderMixin):
    """The two components and the attributes ``load_lora_weights`` touches: what StableDiffusionPipeline runs."""

    hf_device_map = None

    def __init__(self, unet, text_encoder):
        self.unet, self.text_encoder = unet, text_encoder

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


@contextmanager
def loader_messages():
    """Collect diffusers / transformers / PEFT log warnings and Python warnings raised while loading."""
    got: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            got.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield got
    for lg in loggers:
        lg.removeHandler(handler)
    got.extend(str(w.message) for w in caught)


def load_with_diffusers(path: Path):
    """Fresh base models with ``path`` loaded by diffusers' SD loader; asserts no key / config warnings."""
    pipe = MiniPipeline(tiny_unet(), tiny_text_encoder())
    with loader_messages() as msgs:
        pipe.load_lora_weights(str(path))
    bad = [m for m in msgs if any(w in m.lower() for w in ("missing keys", "unexpected keys", "inconsistency", "invalid lora"))]
    assert not bad, bad
    return pipe


# peft LoraConfig kwargs of the cases: alpha = r, alpha ≠ r, per-layer rank / alpha, rsLoRA
UNET_CASES = {
    "alpha_eq_r": dict(lora_alpha=4),
    "alpha_ne_r": dict(lora_alpha=8),
    "patterns": dict(lora_alpha=3, rank_pattern={"conv1": 2, "attn2.to_q": 3},
                     alpha_pattern={"to_k": 2.5, "down_blocks.0.attentions.0.proj_in": 7}),
    "rslora": dict(lora_alpha=6, use_rslora=True, rank_pattern={"to_v": 2}),
}
TE_CASES = {
    "alpha_eq_r": dict(lora_alpha=4),
    "alpha_ne_r": dict(lora_alpha=2),
    "patterns": dict(lora_alpha=5, rank_pattern={"fc1": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 1.5}),
}


# ------------------------------------------------------------------------ 1. our output loads in diffusers exactly
@pytest.mark.parametrize("case", list(UNET_CASES))
def test_unet_adapter_written_by_loratools_loads_in_diffusers_exactly(cli, tmp_path, case):
    src = adapted(tiny_unet(), lora_config(UNET_TARGETS, **UNET_CASES[case]), seed=1)
    want = unet_out(src)
    assert (want - unet_out(tiny_unet())).abs().max() > 1e-3  # the adapter does something
    out = tmp_path / "d.safetensors"
    cli.ok("convert", peft_folder(src, tmp_path / "peft"), "--to", "diffusers", "-o", out)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and "lora" in k for k in keys), keys  # no .alpha keys
    got = unet_out(load_with_diffusers(out).unet)
    assert (got - want).abs().max() <= ATOL


@pytest.mark.parametrize("case", list(TE_CASES))
def test_text_encoder_adapter_written_by_loratools_loads_in_diffusers_exactly(cli, tmp_path, case):
    """transformers 5's CLIPTextModel has no ``text_model`` level: PEFT names its modules ``encoder.layers.N…``.
    Our file says ``text_encoder.text_model.encoder…`` (what every diffusers loads; this one strips text_model.
    for a flat CLIPTextModel) and its metadata patterns match both layouts."""
    src = adapted(tiny_text_encoder(), lora_config(TE_TARGETS, **TE_CASES[case]), seed=2)
    assert not hasattr(src, "text_model")  # the layout this test is about
    want = te_out(src)
    assert (want - te_out(tiny_text_encoder())).abs().max() > 1e-3
    out = tmp_path / "d.safetensors"
    cli.ok("convert", peft_folder(src, tmp_path / "peft"), "--to", "diffusers", "-o", out)
    with safe_open(str(out), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys), keys
    got = te_out(load_with_diffusers(out).text_encoder)
    assert (got - want).abs().max() <= ATOL


def test_kohya_file_to_diffusers_loads_exactly(cli, tmp_path):
    """kohya (``.alpha`` tensors, ≠ rank) → diffusers: the alphas move into the metadata header."""
    src = adapted(tiny_unet(), lora_config(UNET_TARGETS, **UNET_CASES["patterns"]), seed=3)
    want = unet_out(src)
    kohya = tmp_path / "k.safetensors"
    cli.ok("convert", peft_folder(src, tmp_path / "peft"), "--to", "kohya", "-o", kohya)
    out = tmp_path / "d.safetensors"
    cli.ok("convert", kohya, "--to", "diffusers", "-o", out, "--base", base_file(tmp_path / "base.safetensors"))
    got = unet_out(load_with_diffusers(out).unet)
    assert (got - want).abs().max() <= ATOL


# ------------------------------------------------------------- 2. diffusers' own files: alpha from the metadata
def diffusers_saved(tmp_path: Path, unet_kw: dict, te_kw: dict):
    unet = adapted(tiny_unet(), lora_config(UNET_TARGETS, **unet_kw), seed=4)
    te = adapted(tiny_text_encoder(), lora_config(TE_TARGETS, **te_kw), seed=5)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "saved", unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet.lora_config.to_dict(),
        text_encoder_lora_adapter_metadata=te.lora_config.to_dict(),
    )
    return tmp_path / "saved" / "pytorch_lora_weights.safetensors", unet, te


def test_diffusers_saved_file_read_with_metadata_scale(tmp_path):
    path, unet, te = diffusers_saved(tmp_path, UNET_CASES["patterns"], TE_CASES["patterns"])
    # diffusers itself applies the metadata's scale: its load gives the source outputs
    pipe = load_with_diffusers(path)
    assert (unet_out(pipe.unet) - unet_out(unet)).abs().max() <= ATOL
    assert (te_out(pipe.text_encoder) - te_out(te)).abs().max() <= ATOL
    ad = load_adapter(path)
    want = {f"unet.{k}": v for k, v in peft_deltas(unet).items()}
    want |= {f"text_encoder.text_model.{k}": v for k, v in peft_deltas(te).items()}  # canonical CLIP paths
    assert set(ad.layers) == set(want)
    for name, delta in want.items():
        torch.testing.assert_close(ad.layers[name].delta(), delta, atol=1e-6, rtol=1e-5, msg=name)
    assert "lora_adapter_metadata" not in ad.metadata  # regenerated by the writer, never carried stale


def test_diffusers_saved_single_component_rslora(tmp_path):
    unet = adapted(tiny_unet(), lora_config(UNET_TARGETS, **UNET_CASES["rslora"]), seed=6)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "s", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.lora_config.to_dict())
    ad = load_adapter(tmp_path / "s" / "pytorch_lora_weights.safetensors")
    want = peft_deltas(unet)
    assert ad.family == "sd15" and set(ad.layers) == {f"unet.{n}" for n in want}  # canonical: with the component
    for name, delta in want.items():
        torch.testing.assert_close(ad.layers[f"unet.{name}"].delta(), delta, atol=1e-6, rtol=1e-5, msg=name)


def test_diffusers_saved_file_round_trips_through_loratools_and_kohya(cli, tmp_path):
    """diffusers file → loratools diffusers output, and → kohya (alpha tensors = metadata alphas) → diffusers:
    both load in diffusers to the source outputs."""
    path, unet, te = diffusers_saved(tmp_path, UNET_CASES["alpha_ne_r"], TE_CASES["alpha_ne_r"])
    want_u, want_t = unet_out(unet), te_out(te)
    ours = tmp_path / "ours.safetensors"
    cli.ok("convert", path, "--to", "diffusers", "-o", ours)
    pipe = load_with_diffusers(ours)
    assert (unet_out(pipe.unet) - want_u).abs().max() <= ATOL
    assert (te_out(pipe.text_encoder) - want_t).abs().max() <= ATOL

    kohya = tmp_path / "k.safetensors"
    cli.ok("convert", path, "--to", "kohya", "-o", kohya)
    with safe_open(str(kohya), "pt") as f:
        alphas = {k: float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert alphas and all(a == (8.0 if k.startswith("lora_unet_") else 2.0) for k, a in alphas.items()), alphas
    back = tmp_path / "back.safetensors"
    cli.ok("convert", kohya, "--to", "diffusers", "-o", back, "--base", base_file(tmp_path / "base.safetensors"))
    pipe = load_with_diffusers(back)
    assert (unet_out(pipe.unet) - want_u).abs().max() <= ATOL
    assert (te_out(pipe.text_encoder) - want_t).abs().max() <= ATOL


def test_inspect_norm_uses_metadata_alpha(cli, tmp_path):
    """``inspect`` of a diffusers-saved file (lora_alpha 8, r 4) reports PEFT's ‖ΔW‖ (it reported half of it)."""
    path, unet, _ = diffusers_saved(tmp_path, UNET_CASES["alpha_ne_r"], TE_CASES["alpha_eq_r"])
    layers = {la["name"]: la for la in json.loads(cli.ok("inspect", path, "--json", "-q").stdout)["layers"]}
    for name, delta in peft_deltas(unet).items():
        got = layers[f"unet.{name}"]
        assert got["scale"] == 2.0 and got["alpha"] == 8.0
        assert got["fro_norm"] == pytest.approx(float(delta.flatten(1).norm()), rel=1e-5), name


# ----------------------------------------------------------------------------------------------- 3. edge cases
def _tiny_file(path: Path, extra: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    t = {"unet.a.to_q.lora_A.weight": torch.randn(4, 8, generator=g), "unet.a.to_q.lora_B.weight": torch.randn(8, 4, generator=g),
         "unet.a.to_k.lora_A.weight": torch.randn(2, 8, generator=g), "unet.a.to_k.lora_B.weight": torch.randn(8, 2, generator=g),
         **extra}
    save_file(t, str(path), metadata=metadata)
    return path


def test_metadata_patterns_and_alpha_tensors(tmp_path):
    """rank / alpha patterns as PEFT matches them; an ``.alpha`` tensor (older tools) wins over the metadata, with a
    warning when they disagree."""
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern": {"to_k": 2},
                                                 "unet.alpha_pattern": {"a.to_k": 1}})}
    ad = load_adapter(_tiny_file(tmp_path / "a.safetensors", {}, meta))
    assert ad.layers["a.to_q"].scale == 2.0 and ad.layers["a.to_k"].scale == 0.5 and not ad.warnings
    ad = load_adapter(_tiny_file(tmp_path / "b.safetensors", {"unet.a.to_q.alpha": torch.tensor(2.0)}, meta))
    assert ad.layers["a.to_q"].scale == 0.5 and any("disagrees" in w for w in ad.warnings)


@pytest.mark.parametrize("bad,match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"unet.r": "four"}), "unet.r must be a positive integer"),
    (json.dumps({"unet.alpha_pattern": {"(": 1}}), "not a valid regex"),
])
def test_bad_metadata_is_one_line_error(cli, tmp_path, bad, match):
    f = _tiny_file(tmp_path / "x.safetensors", {}, {"lora_adapter_metadata": bad})
    cli.fails("inspect", f, match=match)
