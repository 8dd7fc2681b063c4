"""Wan 2.2 A14B: a pipeline folder with two expert transformers extracts in one run into two adapters."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratools.errors import LoraToolsError
from loratools.extract import ExtractOptions, extract
from loratools.formats import load_adapter
from loratools.linalg import RankRule
from loratools.noise_experts import expert_output, expert_pairs
from tests.test_dit_wired import model_of

INDEX = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
         "transformer_2": ["diffusers", "WanTransformer3DModel"]}


def _pipeline(path: Path, seeds: tuple[int, int], tuned: bool) -> Path:
    for comp, seed in zip(("transformer", "transformer_2"), seeds, strict=True):
        model = model_of("wan_t2v", seed)
        if tuned:
            g = torch.Generator().manual_seed(seed + 10)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        p.add_(torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p.shape[1], generator=g) * .05)
        model.save_pretrained(path / comp)
    (path / "model_index.json").write_text(json.dumps(INDEX))
    return path


def test_two_experts_give_two_adapters(tmp_path, cli):
    base = _pipeline(tmp_path / "base", (0, 1), tuned=False)
    tuned = _pipeline(tmp_path / "tuned", (0, 1), tuned=True)
    assert [p[0] for p in expert_pairs(base, tuned)] == ["high_noise", "low_noise"]
    res = json.loads(cli.ok("extract", "--base", base, "--tuned", tuned, "--rank", "4", "--to", "diffusers",
                            "-o", tmp_path / "out", "--json").stdout)
    assert [(e["summary"]["expert"], e["summary"]["component"]) for e in res["experts"]] == [
        ("high_noise", "transformer"), ("low_noise", "transformer_2")]
    opts = ExtractOptions(rule=RankRule("rank", 4))
    deltas = {}
    for label, comp in (("high_noise", "transformer"), ("low_noise", "transformer_2")):
        got = load_adapter(expert_output(tmp_path / "out", label))
        ref = extract(base / comp, tuned / comp, opts).adapter
        assert got.family == "wan21" and set(got.layers) == set(ref.layers) and len(ref.layers) > 20
        for n, la in ref.layers.items():
            want = la.delta(torch.float64)
            assert float((got.layers[n].delta(torch.float64) - want).norm() / want.norm()) <= 1e-5, n
        deltas[label] = got.layers["transformer.blocks.0.attn1.to_q"].delta(torch.float64)
    assert not torch.allclose(deltas["high_noise"], deltas["low_noise"])  # each expert against its own base


def test_tuned_without_the_second_expert_is_one_line_error(tmp_path, cli):
    base = _pipeline(tmp_path / "base", (0, 1), tuned=False)
    (tmp_path / "tuned").mkdir()
    model_of("wan_t2v").save_pretrained(tmp_path / "tuned" / "transformer")
    (tmp_path / "tuned" / "model_index.json").write_text(json.dumps({k: v for k, v in INDEX.items()
                                                                      if k != "transformer_2"}))
    try:
        expert_pairs(base, tmp_path / "tuned")
    except LoraToolsError as exc:
        assert "transformer_2" in str(exc) and "\n" not in str(exc)
    else:
        raise AssertionError("no error")
    cli.fails("extract", "--base", base, "--tuned", tmp_path / "tuned", "-o", tmp_path / "o.safetensors",
              match="transformer_2")
