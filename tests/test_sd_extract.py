"""``extract`` / ``spectrum`` between Stable Diffusion original-layout single files, checked end to end.

BASE is a tiny SD1.5 / SDXL single file (``tests/sd_models.py``); TUNED adds a known rank-2 delta to a few UNet and
text-encoder modules (SDXL: the q and v rows of OpenCLIP's fused ``in_proj_weight``) and changes a VAE tensor. The
kohya file ``extract`` writes is loaded with diffusers' own kohya loader into the diffusers models BASE was written
from, and their outputs must equal those of the TUNED models (converted from the TUNED file by diffusers' single-file
converters); ``bake`` must give TUNED back.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_models import CHECKPOINTS, TinyCheckpoint, sd15_checkpoint, sdxl_checkpoint, text_state_dict

from loratools.checkpoint import ModuleRef
from loratools.errors import LoraToolsError
from loratools.extract import ExtractOptions, extract, spectrum
from loratools.formats import load_adapter
from loratools.linalg import RankRule

RANK = 2
VAE_KEY = "first_stage_model.encoder.conv_in.weight"
IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
TE2_ATTN = "text_encoder_2.text_model.encoder.layers.0.self_attn."

#: modules given a delta: the first canonical name matching each pattern
UNET_PATTERNS = [
    r"unet\.down_blocks\.\d\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q",
    r"unet\.down_blocks\.\d\.attentions\.0\.transformer_blocks\.0\.attn1\.to_k",
    r"unet\.down_blocks\.\d\.attentions\.0\.transformer_blocks\.0\.attn2\.to_v",
    r"unet\.down_blocks\.\d\.attentions\.0\.transformer_blocks\.0\.attn1\.to_out\.0",
    r"unet\.down_blocks\.\d\.attentions\.0\.proj_in",
    r"unet\.down_blocks\.1\.resnets\.0\.conv1",
    r"unet\.mid_block\.attentions\.0\.transformer_blocks\.0\.ff\.net\.0\.proj",
    r"unet\.up_blocks\.\d\.attentions\.1\.transformer_blocks\.0\.ff\.net\.2",
    r"unet\.up_blocks\.\d\.resnets\.2\.conv_shortcut",
]
# diffusers' kohya loader reads a text encoder's attention LoRAs only when an ``out_proj`` is among them (it tells
# its old attention-processor key style from the MLP's by the presence of ``to_out_lora``): every trained LoRA has
# one, so the deltas do too.
TE_PATTERNS = [
    r"text_encoder\.text_model\.encoder\.layers\.0\.self_attn\.q_proj",
    r"text_encoder\.text_model\.encoder\.layers\.0\.self_attn\.out_proj",
    r"text_encoder\.text_model\.encoder\.layers\.1\.mlp\.fc1",
]
TE2_PATTERNS = [
    re.escape(TE2_ATTN + "q_proj"),
    re.escape(TE2_ATTN + "v_proj"),
    re.escape(TE2_ATTN + "out_proj"),
    r"text_encoder_2\.text_model\.encoder\.layers\.2\.mlp\.fc2",
    r"text_encoder_2\.text_projection",  # stored transposed in the single file
]


class Case:
    """BASE and TUNED files of one family, the deltas, and the extracted kohya file."""

    def __init__(self, tiny: TinyCheckpoint, root: Path) -> None:
        self.tiny, self.root = tiny, root
        nm = tiny.naming
        patterns = UNET_PATTERNS + TE_PATTERNS + (TE2_PATTERNS if tiny.family == "sdxl" else [])
        names = [m.canonical for m in nm.modules]
        self.targets = [next(n for n in names if re.fullmatch(p, n)) for p in patterns]
        g = torch.Generator().manual_seed(7)
        self.base = tiny.ckpt
        self.tuned = {k: v.clone() for k, v in self.base.items()}
        self.deltas: dict[str, torch.Tensor] = {}
        self.refs: dict[str, ModuleRef] = {}
        for name in self.targets:
            m = nm.module(name)
            ref = ModuleRef(m.weight_key, m.rows, m.transpose)
            w = ref.take(self.tuned[m.weight_key])
            up = torch.randn(w.shape[0], RANK, generator=g)
            down = torch.randn(RANK, w[0].numel(), generator=g)
            delta = (0.05 * up @ down).reshape(w.shape)
            ref.put(self.tuned[m.weight_key], w + delta)
            self.deltas[name], self.refs[name] = delta, ref
        self.tuned[VAE_KEY] = self.tuned[VAE_KEY] + 0.5
        self.base_path, self.tuned_path = root / "base.safetensors", root / "tuned.safetensors"
        save_file(self.base, self.base_path)
        save_file(self.tuned, self.tuned_path)
        self.lora = root / "lora.safetensors"
        self.report_file = root / "report.json"

    @property
    def adapted_keys(self) -> set[str]:
        return {r.key for r in self.refs.values()}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def case(request, tmp_path_factory):
    from click.testing import CliRunner

    from loratools.cli import main

    c = Case(CHECKPOINTS[request.param](0), tmp_path_factory.mktemp(request.param))
    res = CliRunner().invoke(main, ["extract", "--base", str(c.base_path), "--tuned", str(c.tuned_path),
                                    "-o", str(c.lora), "--to", "kohya", "--rank", str(RANK), "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    c.report = json.loads(res.stdout)
    return c


def _kohya_stem(c: Case, name: str) -> str:
    comp, _, path = name.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if c.tiny.family == "sdxl" else "lora_te",
              "text_encoder_2": "lora_te2"}[comp]
    return f"{prefix}_{path.replace('.', '_')}"


# ------------------------------------------------------------------------------------------ the file
def test_kohya_keys_metadata_and_report(case):
    with safe_open(str(case.lora), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    stems = {k.split(".")[0] for k in keys}
    assert stems == {_kohya_stem(case, n) for n in case.targets}
    assert all(s.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_",
                             "lora_te_", "lora_te1_", "lora_te2_")) for s in stems)
    if case.tiny.family == "sdxl":
        assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj" in stems
        assert "lora_te2_text_model_encoder_layers_0_self_attn_v_proj" in stems
        assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj" not in stems
        assert not any(s.startswith("lora_te_") for s in stems)
    else:
        assert not any(s.startswith(("lora_te1_", "lora_te2_")) for s in stems)
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[case.tiny.family]
    assert meta["modelspec.architecture"].endswith("/lora")

    rep = case.report
    assert rep["summary"]["family"] == case.tiny.family
    rows = {r["name"]: r for r in rep["layers"]}
    assert set(rows) == set(case.targets)
    for name, r in rows.items():
        assert r["key"] == case.refs[name].key and r["rank"] == RANK
        assert r.get("rows") == (list(case.refs[name].rows) if case.refs[name].rows else None)
    skipped = {s["name"]: s["reason"] for s in rep["skipped"]}
    assert skipped[VAE_KEY] == "VAE: not part of a LoRA"
    if case.tiny.family == "sdxl":  # the k rows of the fused in_proj did not change
        k = next(s for s in rep["skipped"] if s["name"] == TE2_ATTN + "k_proj")
        assert k["key"] == IN_PROJ and k["rows"] == [12, 24] and k["reason"].startswith("unchanged")
    assert not any(r["name"].startswith("model.diffusion_model") for r in rep["layers"])


# ------------------------------------------------------------------------------------- the real loader
class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _tuned_models(c: Case):
    """The diffusers / transformers models of the TUNED file, through diffusers' own single-file converters."""
    tuned = dict(c.tuned)
    unet = copy.deepcopy(c.tiny.unet)
    unet.load_state_dict(convert_ldm_unet_checkpoint(tuned, dict(unet.config)))
    tes = {}
    for spec in c.tiny.naming.structure.text_encoders:
        model = copy.deepcopy(c.tiny.text_encoders[spec.component])
        if spec.kind == "clip":
            conv = convert_ldm_clip_checkpoint(tuned)
        else:
            conv = convert_open_clip_checkpoint(model, tuned, prefix=spec.prefix)
        own = dict(zip(text_state_dict(model), model.state_dict()))  # text_model.… → the model's own keys
        model.load_state_dict({own[k]: v for k, v in conv.items()})
        tes[spec.component] = model
    return unet, tes


def _run_unet(unet, family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    cross = unet.config.cross_attention_dim
    kw = {}
    if family == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 8, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]),
                    encoder_hidden_states=torch.randn(2, 7, cross, generator=g), **kw).sample


def _run_te(model) -> list[torch.Tensor]:
    ids = torch.randint(2, 40, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return [out.hidden_states[-2], out[0]]


def test_diffusers_kohya_loader_reproduces_the_tuned_models(case):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = case.tiny.family == "sdxl"
    pipe = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    unet = copy.deepcopy(case.tiny.unet)
    tes = {k: copy.deepcopy(v) for k, v in case.tiny.text_encoders.items()}
    ref_unet, ref_tes = _tuned_models(case)
    base_out = _run_unet(unet, case.tiny.family)
    handler = _Warnings()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers", "peft")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        state, alphas, metadata = pipe.lora_state_dict(str(case.lora), return_lora_metadata=True)
        assert {k.split(".")[0] for k in state} == {"unet", *tes}
        pipe.load_lora_into_unet(state, alphas, unet=unet, metadata=metadata)
        for comp, model in tes.items():
            pipe.load_lora_into_text_encoder(state, alphas, text_encoder=model, prefix=comp, metadata=metadata)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    bad = re.compile(r"unexpected|missing|no lora keys", re.I)
    assert not [m for m in handler.messages if bad.search(m)], handler.messages

    got = _run_unet(unet, case.tiny.family)
    want = _run_unet(ref_unet, case.tiny.family)
    assert (want - base_out).abs().max() > 1e-3  # the deltas change the output
    assert (got - want).abs().max() <= 1e-4
    for comp, model in tes.items():
        for g, w, b in zip(_run_te(model), _run_te(ref_tes[comp]), _run_te(case.tiny.text_encoders[comp])):
            assert (w - b).abs().max() > 1e-3, comp
            assert (g - w).abs().max() <= 1e-4, comp


# ---------------------------------------------------------------------------------------------- bake
def test_bake_gives_tuned_back(case, tmp_path):
    from click.testing import CliRunner

    from loratools.cli import main

    out = tmp_path / "baked.safetensors"
    res = CliRunner().invoke(main, ["bake", str(case.lora), "--base", str(case.base_path), "-o", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    baked = load_file(out)
    assert baked.keys() == case.base.keys()
    for key, b in case.base.items():
        if key in case.adapted_keys:
            assert (baked[key] - case.tuned[key]).abs().max() <= 1e-5, key
        else:  # VAE included: byte-identical to BASE (the VAE change was not extracted)
            got = baked[key]
            assert got.dtype == b.dtype and got.shape == b.shape
            assert got.contiguous().view(torch.uint8).equal(b.contiguous().view(torch.uint8)), key
    assert not torch.equal(baked[VAE_KEY], case.tuned[VAE_KEY])
    if case.tiny.family == "sdxl":  # the k rows of the fused tensor are BASE's bytes, untouched
        assert torch.equal(baked[IN_PROJ][12:24], case.base[IN_PROJ][12:24])


def test_sdxl_fused_in_proj_is_exact_both_ways(tmp_path):
    c = Case(sdxl_checkpoint(1), tmp_path)
    res = extract(c.base_path, c.tuned_path, ExtractOptions(rule=RankRule("rank", RANK), format="kohya", exact=True))
    diff = c.tuned[IN_PROJ] - c.base[IN_PROJ]
    layers = res.adapter.layers
    assert TE2_ATTN + "k_proj" not in layers
    for name, rows in (("q_proj", (0, 12)), ("v_proj", (24, 36))):
        left, right = layers[TE2_ATTN + name].factors(torch.float64)
        assert torch.allclose(left @ right.T, diff[rows[0]:rows[1]].double(), atol=1e-6, rtol=0)
    # the file read back against BASE patches exactly those rows
    out = tmp_path / "lora.safetensors"
    from loratools.formats import save_adapter

    save_adapter(res.adapter, out, "kohya")
    back = load_adapter(out, base=c.base_path)
    qkv = {TE2_ATTN + p for p in ("q_proj", "k_proj", "v_proj")}
    assert qkv & set(back.layers) == {TE2_ATTN + "q_proj", TE2_ATTN + "v_proj"}
    from loratools.bake import apply_layers, plan_bake
    from loratools.checkpoint import Checkpoint

    plan = plan_bake(Checkpoint(c.base_path), [(back, 1.0)], ["lora"])
    assert sorted(ref.rows for _, _, ref in plan[IN_PROJ]) == [(0, 12), (24, 36)]
    baked = apply_layers(c.base[IN_PROJ], plan[IN_PROJ])
    assert torch.allclose(baked, c.tuned[IN_PROJ], atol=1e-6, rtol=0)
    assert torch.equal(baked[12:24], c.base[IN_PROJ][12:24])


# --------------------------------------------------------------------------------- library details
def test_spectrum_names_family_modules(tmp_path):
    c = Case(sdxl_checkpoint(2), tmp_path)
    rep = spectrum(c.base_path, c.tuned_path, exact=True)
    assert rep["summary"]["family"] == "sdxl"
    rows = {r["name"]: r for r in rep["layers"]}
    assert set(rows) == set(c.targets)
    assert rows[TE2_ATTN + "v_proj"]["rows"] == [24, 36] and rows[TE2_ATTN + "v_proj"]["key"] == IN_PROJ
    for name, r in rows.items():
        s = r["singular_values"]
        assert len([x for x in s if x > 1e-4 * s[0]]) == RANK, name
    assert {s["name"]: s["reason"] for s in rep["skipped"]}[VAE_KEY] == "VAE: not part of a LoRA"


def test_save_full_and_include_match_canonical_names(tmp_path):
    c = Case(sd15_checkpoint(3), tmp_path)
    proj_in = next(n for n in c.targets if n.endswith("proj_in"))
    res = extract(c.base_path, c.tuned_path, ExtractOptions(rule=RankRule("rank", RANK), save_full=["unet.*proj_in"]))
    assert res.full == [proj_in] and proj_in not in res.adapter.layers
    assert torch.equal(res.adapter.extra_tensors[f"base_model.model.{proj_in}.weight"],
                       c.tuned[c.refs[proj_in].key])
    assert res.adapter.family == "sd15"
    res = extract(c.base_path, c.tuned_path,
                  ExtractOptions(rule=RankRule("rank", RANK), include=["text_encoder.*"]))
    assert set(res.adapter.layers) == {n for n in c.targets if n.startswith("text_encoder.")}


def test_tuned_of_another_family_is_a_one_line_error(tmp_path, cli):
    a, b = sd15_checkpoint(0), sdxl_checkpoint(0)
    save_file(a.ckpt, tmp_path / "a.safetensors")
    save_file(b.ckpt, tmp_path / "b.safetensors")
    cli.fails("extract", "--base", tmp_path / "a.safetensors", "--tuned", tmp_path / "b.safetensors",
              "-o", tmp_path / "out.safetensors", "--to", "kohya", match="is a sdxl checkpoint (original layout)")
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(LoraToolsError, match=r"base .* is a sd15 checkpoint .* same family and layout"):
        spectrum(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
