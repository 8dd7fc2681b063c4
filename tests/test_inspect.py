"""inspect: exact spectra from the factors, JSON contract, --base, --plot."""

from __future__ import annotations

import json

import pytest
import torch

from loratools.formats import load_adapter
from tests.conftest import SAMPLES

FIELDS = {"name", "shape", "rank", "alpha", "scale", "fro_norm", "spectral_norm", "stable_rank", "effective_rank",
          "energy_rank", "singular_values", "type"}


@pytest.mark.parametrize("src", ["peft_lora", "kohya_lora.safetensors", "locon.safetensors", "peft_dora"])
def test_json_contract_and_exact_spectra(cli, src):
    res = cli.ok("inspect", SAMPLES / src, "--json")
    doc = json.loads(res.stdout)
    assert doc["format"] in ("peft", "kohya")
    assert set(doc["summary"]) >= {"layers", "params", "format", "warnings"}
    ad = load_adapter(SAMPLES / src)
    assert len(doc["layers"]) == len(ad.layers)
    for row in doc["layers"]:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert set(row["energy_rank"]) == {"0.5", "0.9", "0.99"}
        layer = ad.layers[row["name"]]
        dense = layer.delta(torch.float64).reshape(layer.shape[0], -1)
        ref = torch.linalg.svdvals(dense)
        sv = torch.tensor(row["singular_values"], dtype=torch.float64)
        assert sv.numel() == layer.rank  # the full non-zero spectrum
        torch.testing.assert_close(sv, ref[: sv.numel()], rtol=1e-4, atol=1e-6 * float(ref[0]))
        assert row["fro_norm"] == pytest.approx(float(dense.norm()), rel=1e-5)
        assert row["spectral_norm"] == pytest.approx(float(ref[0]), rel=1e-5)
        assert row["stable_rank"] == pytest.approx(float(dense.norm() ** 2 / ref[0] ** 2), rel=1e-4)
        p = ref[ref > 1e-12 * ref[0]] / ref[ref > 1e-12 * ref[0]].sum()
        assert row["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-4)
        cum = torch.cumsum(ref**2, 0) / (ref**2).sum()
        assert row["energy_rank"]["0.9"] == int((cum < 0.9 - 1e-9).sum()) + 1
        assert row["scale"] == pytest.approx(layer.scale)


def test_effective_rank_known_values(cli, tmp_path):
    """A layer with k equal singular values has effective rank k and stable rank k."""
    from safetensors.torch import save_file

    q1, _ = torch.linalg.qr(torch.randn(20, 5, generator=torch.Generator().manual_seed(0)))
    q2, _ = torch.linalg.qr(torch.randn(12, 5, generator=torch.Generator().manual_seed(1)))
    save_file({"lora_unet_a.lora_down.weight": q2.T.contiguous() * 3, "lora_unet_a.lora_up.weight": q1.contiguous(),
               "lora_unet_a.alpha": torch.tensor(5.0)}, str(tmp_path / "x.safetensors"))
    row = json.loads(cli.ok("inspect", tmp_path / "x.safetensors", "--json").stdout)["layers"][0]
    assert row["effective_rank"] == pytest.approx(5, rel=1e-5)
    assert row["stable_rank"] == pytest.approx(5, rel=1e-5)
    assert row["spectral_norm"] == pytest.approx(3, rel=1e-5)
    assert row["energy_rank"] == {"0.5": 3, "0.9": 5, "0.99": 5}


def test_inspect_with_base(cli):
    res = cli.ok("inspect", SAMPLES / "kohya_lora.safetensors", "--base", SAMPLES / "base", "--json")
    doc = json.loads(res.stdout)
    from loratools.checkpoint import Checkpoint

    ck = Checkpoint(SAMPLES / "base")
    row = next(r for r in doc["layers"] if r["name"] == "model.layers.1.mlp.up_proj")
    w = ck.get("model.layers.1.mlp.up_proj.weight")
    assert row["relative_norm"] == pytest.approx(row["fro_norm"] / float(w.norm()), rel=1e-6)
    assert doc["summary"]["unmatched"] == []
    # an SD LoCon against a Llama base matches nothing: an error naming a few layers, never a silent no-op
    cli.fails("inspect", SAMPLES / "locon.safetensors", "--base", SAMPLES / "base", "--json",
              match="none of its 10 layer(s) matches a module of the base")


def test_table_output(cli):
    out = cli.ok("inspect", SAMPLES / "peft_lora", "--top", "2").stdout
    assert "model.layers.0.self_attn.q_proj" in out and "r@50/90/99%" in out and "params" in out


def test_plot_png(cli, tmp_path):
    png = tmp_path / "spectra.png"
    cli.ok("inspect", SAMPLES / "locon.safetensors", "--plot", png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    cli.fails("inspect", SAMPLES / "locon.safetensors", "--plot", png, match="already exists")
