"""DoRA across PEFT and LyCORIS: exact moves on the output axis, refusal on the input axis, --fold-dora."""

from __future__ import annotations

import json

import pytest
import torch
from lyco_models import SHAPES, Net, effective, lycoris_loaded_effective, lycoris_net, probe, save_lycoris
from safetensors.torch import load_file, save_file
from test_convert_lycoris import peft_deltas, rel

from loratools import dora
from loratools.formats import load_adapter


def peft_dora_model(tmp_path, seed: int = 0):
    """A PEFT DoRA adapter on Net (Linear, 3x3 conv, 1x1 conv), factors non-zero; returns (dir, base file, base, ref)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = Net()
    base = {n: getattr(model, n).weight.detach().clone() for n in SHAPES}
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(SHAPES), use_dora=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n and "magnitude" not in n:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "magnitude" in n:
                p.mul_(1 + 0.2 * torch.rand_like(p))
    pm.eval()
    ref = {n: probe(getattr(pm.base_model.model, n), SHAPES[n]) - base[n] for n in SHAPES}
    out = tmp_path / "peft_dora"
    pm.save_pretrained(str(out))
    b = tmp_path / "base.safetensors"
    save_file({f"{n}.weight": w.contiguous() for n, w in base.items()}, str(b))
    return out, b, base, ref


@pytest.mark.parametrize("algo,kw", [("lora", {}), ("loha", {}), ("lokr", {"dim": 2, "alpha": 1})])
def test_lycoris_output_axis_dora_to_peft(algo, kw, tmp_path, cli):
    model, net, base = lycoris_net(algo, dora_wd=True, **kw)
    eff = effective(model, base)
    f, b = save_lycoris(net, base, tmp_path)
    out = tmp_path / "peft"
    cli.ok("convert", f, "--to", "peft", "-o", out, "--base", b)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    got = peft_deltas(out, base)
    for n in SHAPES:
        assert rel(got[n], eff[n]) < 3e-6, n


def test_input_axis_dora_to_peft_refused(tmp_path, cli):
    model, net, base = lycoris_net("lora", dora_wd=True, wd_on_output=False)
    f, b = save_lycoris(net, base, tmp_path)
    out = tmp_path / "peft"
    cli.fails("convert", f, "--to", "peft", "-o", out, "--base", b, match="--fold-dora")
    assert not out.exists()
    cli.fails("convert", f, "--to", "diffusers", "-o", tmp_path / "d.safetensors", "--base", b, match="diffusers")
    assert not (tmp_path / "d.safetensors").exists()


def test_peft_dora_to_lycoris_exact(tmp_path, cli):
    folder, b, base, ref = peft_dora_model(tmp_path)
    out = tmp_path / "k.safetensors"
    cli.ok("convert", folder, "--to", "kohya", "-o", out, "--base", b, "--kohya-prefix", "lycoris_")
    sd = load_file(str(out))
    assert sd["lycoris_lin.dora_scale"].shape == (24, 1) and sd["lycoris_conv.dora_scale"].shape == (32, 1, 1, 1)
    got = lycoris_loaded_effective(out, base)
    for n in SHAPES:
        assert rel(got[n], ref[n]) < 3e-6, n
    # and back to PEFT: magnitudes equal the originals (eps removed again)
    back = tmp_path / "back"
    cli.ok("convert", out, "--to", "peft", "-o", back, "--base", b)
    a0, a1 = load_adapter(folder), load_adapter(back)
    for n in SHAPES:
        m0, m1 = a0.layers[n].magnitude, a1.layers[n].magnitude
        assert m0.shape == m1.shape and torch.allclose(m0, m1, rtol=1e-6, atol=0)


def test_peft_dora_to_lycoris_without_base_warns(tmp_path, cli):
    folder, b, base, ref = peft_dora_model(tmp_path, seed=1)
    out = tmp_path / "k.safetensors"
    res = cli.ok("convert", folder, "--to", "kohya", "-o", out)
    assert "eps" in res.stderr and "--base" in res.stderr
    ad = load_adapter(out)
    for stem, layer in ad.layers.items():
        n = stem.removeprefix("lora_unet_")
        assert rel(dora.effective_delta(layer, base[n]), ref[n]) < 1e-5  # eps/‖V‖ relative


def test_samples_dora_roundtrip(samples, tmp_path, cli):
    k = tmp_path / "k.safetensors"
    cli.ok("convert", samples / "peft_dora", "--to", "kohya", "-o", k, "--base", samples / "base")
    back = tmp_path / "back"
    cli.ok("convert", k, "--to", "peft", "-o", back, "--base", samples / "base")
    a0, a1 = load_adapter(samples / "peft_dora"), load_adapter(back)
    assert set(a0.layers) == set(a1.layers)
    for n, la in a0.layers.items():
        assert torch.equal(la.down, a1.layers[n].down) and torch.allclose(la.magnitude, a1.layers[n].magnitude, rtol=1e-6)


@pytest.mark.parametrize("kw", [{"wd_on_output": False}, {}])
def test_fold_dora(kw, tmp_path, cli):
    model, net, base = lycoris_net("lora", dora_wd=True, **kw)
    eff = effective(model, base)
    f, b = save_lycoris(net, base, tmp_path)
    out = tmp_path / "folded"
    doc = json.loads(cli.ok("convert", f, "--to", "peft", "-o", out, "--base", b, "--fold-dora", "--rank", "32",
                            "--json").stdout)
    assert all(r["action"] == "folded" for r in doc["per_layer"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is False
    got = peft_deltas(out, base)
    for n in SHAPES:  # rank 32 ≥ min(m, n) of every layer: the fold is exact
        assert rel(got[n], eff[n]) < 1e-5, n
    out2 = tmp_path / "folded2"
    doc = json.loads(cli.ok("convert", f, "--to", "peft", "-o", out2, "--base", b, "--fold-dora", "--rank", "4",
                            "--json").stdout)
    got = peft_deltas(out2, base)
    for r in doc["per_layer"]:
        n = r["name"]
        d = eff[n].reshape(eff[n].shape[0], -1).double()
        s = torch.linalg.svdvals(d)
        opt = float(s[4:].square().sum().sqrt() / d.norm())
        assert r["rank"] == 4 and r["optimal_error"] == pytest.approx(opt, rel=1e-3)
        assert r["relative_error"] == pytest.approx(opt, rel=1e-3)
        achieved = float((got[n].reshape(d.shape).double() - d).norm() / d.norm())
        assert achieved == pytest.approx(opt, rel=1e-3)


def test_fold_dora_needs_base(tmp_path, cli):
    model, net, base = lycoris_net("lora", dora_wd=True)
    f, _ = save_lycoris(net, base, tmp_path)
    out = tmp_path / "o"
    cli.fails("convert", f, "--to", "peft", "-o", out, "--fold-dora", match="--fold-dora needs --base")
    assert not out.exists()


def test_mixed_dora_and_plain_layers_to_peft(tmp_path, cli):
    """PEFT's use_dora is adapter-wide: plain layers get the identity magnitude ‖W+ΔW‖ (needs --base)."""
    m1, n1, base = lycoris_net("lora", dora_wd=True)
    m2, n2, base2 = lycoris_net("loha")
    assert all(torch.equal(base[k], base2[k]) for k in base)
    eff = {**effective(m2, base), "lin": effective(m1, base)["lin"]}
    sd = {k: v.detach().contiguous() for k, v in n2.state_dict().items() if not k.startswith("lycoris_lin.")}
    sd.update({k: v.detach().contiguous() for k, v in n1.state_dict().items() if k.startswith("lycoris_lin.")})
    f = tmp_path / "mixed.safetensors"
    save_file(sd, str(f))
    _, b = save_lycoris(n1, base, tmp_path)
    cli.fails("convert", f, "--to", "peft", "-o", tmp_path / "x", match="use_dora is adapter-wide")
    out = tmp_path / "peft"
    doc = json.loads(cli.ok("convert", f, "--to", "peft", "-o", out, "--base", b, "--json").stdout)
    assert {r["name"]: r["action"] for r in doc["per_layer"]}["conv"] == "exact+identity magnitude"
    got = peft_deltas(out, base)
    for n in SHAPES:
        assert rel(got[n], eff[n]) < 5e-6, n


@pytest.mark.parametrize("on_output", [True, False])
@pytest.mark.parametrize("mult", [1.0, 0.5, 1.7])
def test_bake_lycoris_dora_at_a_multiplier_matches_lycoris_forward(tmp_path, cli, on_output, mult):
    """bake A:w of a LyCORIS DoRA adapter equals LyCORIS's forward at multiplier w (rescale, not ΔW, is weighted)."""
    from lyco_models import effective, lycoris_net, save_lycoris
    from safetensors.torch import load_file

    model, net, base = lycoris_net("lora", dora_wd=True, wd_on_output=on_output)
    f, b = save_lycoris(net, base, tmp_path)
    net.set_multiplier(mult)
    eff = effective(model, base)
    baked = tmp_path / "baked.safetensors"
    cli.ok("bake", "--base", b, f"{f}:{mult}", "-o", baked)
    sd = load_file(str(baked))
    for n in base:  # a Linear, a 3x3 conv and a 1x1 conv
        got = sd[f"{n}.weight"] - base[n]
        assert float((got - eff[n]).norm() / eff[n].norm()) < 1e-5, n
