"""convert: LoHa / LoKr / Tucker / full → plain LoRA, exact or optimally truncated, loaded by PEFT and LyCORIS."""

from __future__ import annotations

import json

import pytest
import torch
from lyco_models import SHAPES, Net, effective, lycoris_loaded_effective, lycoris_net, probe, save_lycoris
from safetensors.torch import load_file, save_file

from loratools.adapter import LoraLayer
from loratools.formats import load_adapter

EXACT_CASES = {
    "loha": ("loha", {}),
    "loha_tucker": ("loha", {"use_tucker": True}),
    "lokr": ("lokr", {"dim": 2, "alpha": 1}),
    "lokr_full": ("lokr", {"dim": 2, "alpha": 1, "full_matrix": True}),
    "lokr_tucker": ("lokr", {"dim": 2, "alpha": 1, "use_tucker": True}),
    "locon_tucker": ("lora", {"use_tucker": True}),
    "full": ("full", {}),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def peft_deltas(folder, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load ``folder`` with PeftModel.from_pretrained on a Net holding ``base`` and probe each module."""
    from peft import PeftModel

    model = Net()
    with torch.no_grad():
        for n, w in base.items():
            getattr(model, n).weight.copy_(w)
    pm = PeftModel.from_pretrained(model, str(folder))
    pm.eval()
    return {n: probe(getattr(pm.base_model.model, n), SHAPES[n]) - base[n] for n in base}


@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_conversion_loads_in_peft(case, tmp_path, cli):
    algo, kw = EXACT_CASES[case]
    model, net, base = lycoris_net(algo, **kw)
    eff = effective(model, base)
    f, b = save_lycoris(net, base, tmp_path)
    out = tmp_path / "peft"
    doc = json.loads(cli.ok("convert", f, "--to", "peft", "-o", out, "--base", b, "--json").stdout)
    assert doc["rule"] == "exact"
    for row in doc["per_layer"]:
        assert row["action"] in ("exact", "copied") and row["relative_error"] == pytest.approx(0.0, abs=1e-6)
    got = peft_deltas(out, base)
    for n in SHAPES:
        assert rel(got[n], eff[n]) < 3e-6, n
    conv = load_adapter(out).layers["conv"]
    assert isinstance(conv, LoraLayer) and conv.down.shape[1:] == (16, 3, 3)


def test_rank_rule_is_eckart_young_optimal(tmp_path, cli):
    model, net, base = lycoris_net("loha", dim=3)
    eff = effective(model, base)
    f, b = save_lycoris(net, base, tmp_path)
    out = tmp_path / "k.safetensors"
    doc = json.loads(cli.ok("convert", f, "--to", "kohya", "-o", out, "--base", b, "--rank", "3", "--json").stdout)
    rows = {r["name"]: r for r in doc["per_layer"]}
    ad = load_adapter(out, base=b)
    for n in SHAPES:
        d = eff[n].reshape(eff[n].shape[0], -1).double()
        s = torch.linalg.svdvals(d)
        opt = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert rows[n]["rank"] == 3 and rows[n]["action"] == "truncated"
        assert rows[n]["relative_error"] == pytest.approx(opt, rel=1e-4)
        assert rows[n]["retained_energy"] == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-5)
        achieved = float((ad.layers[n].delta().reshape(d.shape).double() - d).norm() / d.norm())
        assert achieved == pytest.approx(opt, rel=1e-3)


def test_energy_rule_and_kohya_roundtrip_in_lycoris(tmp_path, cli):
    model, net, base = lycoris_net("lokr", dim=2, alpha=1)
    eff = effective(model, base)
    f, b = save_lycoris(net, base, tmp_path)
    out = tmp_path / "k.safetensors"
    res = cli.ok("convert", f, "--to", "kohya", "-o", out, "--base", b, "--kohya-prefix", "lycoris_")
    assert "wrote kohya adapter" in res.output
    sd = load_file(str(out))
    assert not any("lokr" in k for k in sd) and "lycoris_conv.lora_down.weight" in sd
    got = lycoris_loaded_effective(out, base)
    for n in SHAPES:
        assert rel(got[n], eff[n]) < 3e-6
    doc = json.loads(cli.ok("convert", f, "--to", "kohya", "-o", tmp_path / "e.safetensors", "--base", b,
                            "--energy", "0.9", "--json").stdout)
    assert all(r["retained_energy"] >= 0.9 - 1e-9 for r in doc["per_layer"])


def test_plain_lora_copied_bit_exactly(samples, tmp_path, cli):
    out = tmp_path / "o.safetensors"
    cli.ok("convert", samples / "locon.safetensors", "--to", "kohya", "-o", out)
    a, b = load_file(str(samples / "locon.safetensors")), load_file(str(out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_peft_loha_folder_to_peft_lora(tmp_path, cli):
    from peft import LoHaConfig, get_peft_model

    torch.manual_seed(3)
    model = Net()
    base = {n: getattr(model, n).weight.detach().clone() for n in SHAPES}
    pm = get_peft_model(model, LoHaConfig(r=2, alpha=3, target_modules=list(SHAPES), use_effective_conv2d=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "hada_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    pm.eval()
    ref = {n: probe(getattr(pm.base_model.model, n), SHAPES[n]) - base[n] for n in SHAPES}
    pm.save_pretrained(str(tmp_path / "loha"))
    out = tmp_path / "lora"
    b = tmp_path / "base.safetensors"
    save_file({f"{n}.weight": w.contiguous() for n, w in base.items()}, str(b))
    cli.ok("convert", tmp_path / "loha", "--to", "peft", "-o", out, "--base", b)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "alpha" not in cfg
    got = peft_deltas(out, base)
    for n in SHAPES:
        assert rel(got[n], ref[n]) < 3e-6


def test_bias_diff_refused(tmp_path, cli):
    model, net, base = lycoris_net("full", bias=True)
    f, b = save_lycoris(net, base, tmp_path)
    assert any(k.endswith("diff_b") for k in load_file(str(f)))
    out = tmp_path / "o"
    cli.fails("convert", f, "--to", "peft", "-o", out, "--base", b, match="bias difference diff_b")
    assert not out.exists()


def test_without_base_flattened_conv_warning(tmp_path, cli):
    model, net, base = lycoris_net("loha")
    f, _ = save_lycoris(net, base, tmp_path)
    out = tmp_path / "k.safetensors"
    res = cli.ok("convert", f, "--to", "kohya", "-o", out)
    assert "pass --base to get its kernel shape" in res.stderr
    sd = load_file(str(out))
    assert sd["lycoris_conv.lora_down.weight"].shape[1] == 144


@pytest.mark.parametrize("algo,kw", [("loha", {}), ("lokr", {"dim": 2, "alpha": 1}), ("lora", {"use_tucker": True})])
def test_bake_resize_merge_accept_lycoris(algo, kw, tmp_path, cli):
    """The other commands only ask for factors(): LyCORIS layers bake, resize and merge exactly."""
    model, net, base = lycoris_net(algo, **kw)
    eff = effective(model, base)
    f, b = save_lycoris(net, base, tmp_path)
    baked = tmp_path / "baked.safetensors"
    cli.ok("bake", f, "--base", b, "-o", baked)
    sd = load_file(str(baked))
    for n in SHAPES:
        assert rel(sd[f"{n}.weight"] - base[n], eff[n]) < 3e-6, n
    resized = tmp_path / "resized.safetensors"
    cli.ok("resize", f, "--base", b, "--rank", "64", "-o", resized)
    merged = tmp_path / "merged.safetensors"
    cli.ok("merge", f"{f}:0.5", f"{f}:0.5", "--base", b, "--method", "cat", "-o", merged)
    for out in (resized, merged):
        ad = load_adapter(out, base=b)
        for n in SHAPES:
            assert rel(ad.layers[n].delta().reshape(SHAPES[n]), eff[n]) < 3e-6, (out.name, n)


def test_reported_error_includes_fp16_storage(tmp_path, cli):
    """An exact conversion stored in fp16 reports its real (rounding) error; the optimum stays 0."""
    import json as _json

    from tests.conftest import SAMPLES

    res = cli.ok("convert", SAMPLES / "lycoris.safetensors", "--to", "kohya", "-o", tmp_path / "k.safetensors",
                 "--base", SAMPLES / "unet_base.safetensors", "--json")
    rows = {r["name"]: r for r in _json.loads(res.stdout)["per_layer"]}
    loha = rows["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert loha["action"] == "exact" and loha["optimal_error"] == 0
    assert 1e-5 < loha["relative_error"] < 1e-3
    ad = load_adapter(tmp_path / "k.safetensors", base=SAMPLES / "unet_base.safetensors")
    src = load_adapter(SAMPLES / "lycoris.safetensors", base=SAMPLES / "unet_base.safetensors")
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    ref = src.layers[name].delta(torch.float64)
    got = ad.layers[name].delta(torch.float64)
    assert float((got - ref).norm() / ref.norm()) == pytest.approx(loha["relative_error"], rel=1e-3)
