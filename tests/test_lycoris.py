"""Reading LyCORIS files and PEFT LoHa/LoKr folders: deltas equal the real libraries' forward, exact spectra."""

from __future__ import annotations

import json

import pytest
import torch
from lyco_models import SHAPES, Net, effective, lycoris_net, probe, save_lycoris
from safetensors.torch import load_file, save_file

from loratools import dora
from loratools.formats import load_adapter
from loratools.layers import LohaLayer, LokrLayer, TuckerLoraLayer
from loratools.linalg import kron_svd, svd
from loratools.stats import layer_spectrum

CASES = {
    "loha": ("loha", {}),
    "loha_tucker": ("loha", {"use_tucker": True}),
    "loha_dim2": ("loha", {"dim": 2, "alpha": 3}),  # r² = 4 < min(m, n): the Gram (Cholesky–QR) path
    "loha_scalar": ("loha", {"use_scalar": True}),
    "lokr": ("lokr", {"dim": 2, "alpha": 1}),
    "lokr_factor2": ("lokr", {"dim": 2, "alpha": 1, "factor": 2}),
    "lokr_decompose_both": ("lokr", {"dim": 1, "alpha": 3, "decompose_both": True}),
    "lokr_tucker": ("lokr", {"dim": 2, "alpha": 1, "use_tucker": True}),
    "lokr_full": ("lokr", {"dim": 2, "alpha": 5, "full_matrix": True}),
    "lokr_unbalanced": ("lokr", {"dim": 2, "alpha": 1, "unbalanced_factorization": True}),
    "locon_tucker": ("lora", {"use_tucker": True}),
    "dora_out": ("lora", {"dora_wd": True}),
    "dora_in": ("lora", {"dora_wd": True, "wd_on_output": False}),
    "loha_dora_in": ("loha", {"dora_wd": True, "wd_on_output": False}),
    "lokr_dora": ("lokr", {"dim": 2, "alpha": 1, "dora_wd": True}),
    "full": ("full", {}),
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every case built once: (adapter loaded with --base, LyCORIS forward deltas, base weights, paths)."""
    out = {}
    for case, (algo, kw) in CASES.items():
        model, net, base = lycoris_net(algo, **kw)
        d = tmp_path_factory.mktemp(case)
        f, b = save_lycoris(net, base, d)
        out[case] = (load_adapter(f, base=b), effective(model, base), base, f, b)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_delta_equals_lycoris_forward(built, case):
    ad, eff, base, _, _ = built[case]
    assert set(ad.layers) == set(SHAPES)
    for name, layer in ad.layers.items():
        assert tuple(layer.shape) == SHAPES[name]
        ours = dora.effective_delta(layer, base[name])
        assert rel(ours, eff[name]) < 2e-6, (case, name)


@pytest.mark.parametrize("case", list(CASES))
def test_factors_reproduce_forward_delta(built, case):
    """``L @ R.T`` (what resize / merge / bake use) equals the library's low-rank ΔW, for every kind."""
    ad, eff, base, _, _ = built[case]
    for name, layer in ad.layers.items():
        left, right = layer.factors(torch.float64)
        assert left.shape[1] == right.shape[1] >= layer.rank
        dense = (left @ right.T).reshape(layer.shape)
        if layer.magnitude is None:
            assert rel(dense, eff[name]) < 2e-6, (case, name)
        assert rel(dense, layer.delta(torch.float64)) < 1e-12, (case, name)


@pytest.mark.parametrize("case", [c for c in CASES if "dora" not in c])
def test_spectra_equal_dense_float64_svd(built, case):
    ad, eff, _, _, _ = built[case]
    for name, layer in ad.layers.items():
        ref = torch.linalg.svdvals(eff[name].reshape(eff[name].shape[0], -1).double())
        s = layer_spectrum(layer).double()
        k = min(s.numel(), ref.numel())
        assert float((s[:k] - ref[:k]).abs().max()) < 2e-6 * float(ref[0]), (case, name)
        assert float(ref[k:].norm()) < 2e-6 * float(ref[0])  # nothing beyond the structural rank


def test_kinds_scales_and_structural_rank(built):
    ad = built["loha"][0]
    assert all(isinstance(la, LohaLayer) and la.rank == 16 and la.dim == 4 for la in ad.layers.values())
    assert ad.layers["lin"].scale == pytest.approx(0.5)
    lokr = built["lokr_full"][0].layers["lin"]
    assert isinstance(lokr, LokrLayer) and lokr.w1 is not None and lokr.w2 is not None
    assert lokr.scale == 1.0  # both factors full: LyCORIS ignores alpha
    assert built["lokr"][0].layers["lin"].scale == pytest.approx(0.5)
    assert isinstance(built["locon_tucker"][0].layers["conv"], TuckerLoraLayer)
    assert built["dora_in"][0].layers["conv"].magnitude_axis == "in"
    assert built["dora_out"][0].layers["conv"].magnitude_axis == "out"


def test_kron_svd_matches_dense():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    u, s, vh = kron_svd(svd(a), svd(b))
    dense = torch.kron(a, b)
    assert torch.allclose((u * s) @ vh, dense, atol=1e-12)
    assert torch.allclose(s, torch.linalg.svdvals(dense)[: s.numel()], atol=1e-12)
    u2, s2, vh2 = kron_svd(svd(a), svd(b), keep=4)
    assert u2.shape == (20, 4) and torch.allclose(s2, s[:4])


@pytest.mark.parametrize("symmetric", [False, True])
def test_gram_svd_loha_exact(symmetric):
    """LoHa factored SVD vs float64 dense SVD, incl. a rank-deficient Khatri–Rao product (eigh fallback)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(60, 3, generator=g), torch.randn(3, 50, generator=g)
    c, d = (a, b) if symmetric else (torch.randn(60, 3, generator=g), torch.randn(3, 50, generator=g))
    layer = LohaLayer(w1a=a, w1b=b, w2a=c, w2b=d, out_shape=(60, 50), scale=0.7)
    dense = (0.7 * (a @ b) * (c @ d)).double()
    ref = torch.linalg.svdvals(dense)
    u, s, vh = layer.svd()
    assert torch.allclose(s.double(), ref[: s.numel()], atol=2e-6 * float(ref[0]))
    keep = int((ref > 1e-6 * ref[0]).sum())
    assert keep == (6 if symmetric else 9)
    approx = (u[:, :keep] * s[:keep]) @ vh[:keep]
    assert float((approx.double() - dense).norm() / dense.norm()) < 2e-6
    assert torch.allclose(layer.singular_values().double()[:keep], ref[:keep], atol=2e-6 * float(ref[0]))


def test_inspect_json_types(built, cli):
    _, _, _, f, b = built["dora_out"]
    rows = json.loads(cli.ok("inspect", f, "--base", b, "--json").stdout)["layers"]
    assert {r["name"]: r["type"] for r in rows} == {"lin": "dora", "conv": "dora", "pw": "dora"}
    _, _, _, f, b = built["loha_dora_in"]
    rows = json.loads(cli.ok("inspect", f, "--base", b, "--json").stdout)["layers"]
    assert {r["type"] for r in rows} == {"loha+dora"} and {r["magnitude_axis"] for r in rows} == {"in"}
    _, eff, _, f, b = built["lokr"]
    rows = {r["name"]: r for r in json.loads(cli.ok("inspect", f, "--base", b, "--json").stdout)["layers"]}
    assert rows["lin"]["type"] == "lokr" and rows["conv"]["shape"] == [32, 16, 3, 3]
    ref = torch.linalg.svdvals(eff["lin"].double())
    sv = torch.tensor(rows["lin"]["singular_values"], dtype=torch.float64)
    assert torch.allclose(sv, ref[: sv.numel()], rtol=1e-5, atol=1e-6 * float(ref[0]))


def test_without_base_names_stay_stems(built):
    f = built["loha"][3]
    ad = load_adapter(f)
    assert set(ad.layers) == {"lycoris_lin", "lycoris_conv", "lycoris_pw"} and not ad.resolved
    assert ad.layers["lycoris_conv"].shape == (32, 144)  # flattened until --base gives the kernel


def test_kohya_prefixes_and_low_precision(built, tmp_path):
    model, net, base = lycoris_net("loha")
    f, b = save_lycoris(net, base, tmp_path, dtype=torch.bfloat16, rename="lora_unet_")
    ad = load_adapter(f, base=b)
    assert set(ad.layers) == set(SHAPES) and ad.layers["lin"].dtype == torch.bfloat16
    eff = effective(model, base)
    for name, layer in ad.layers.items():
        assert rel(layer.delta(), eff[name]) < 3e-2


def test_peft_loha_lokr_folders(tmp_path):
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    for i, cfg in enumerate([
        LoHaConfig(r=4, alpha=6, target_modules=list(SHAPES), use_effective_conv2d=True),
        LoHaConfig(r=3, alpha=2, target_modules=list(SHAPES)),
        LoKrConfig(r=2, alpha=3, target_modules=list(SHAPES), decompose_both=True, use_effective_conv2d=True),
        LoKrConfig(r=64, alpha=5, target_modules=list(SHAPES)),  # both factors full: PEFT keeps alpha/r
    ]):
        torch.manual_seed(i)
        model = Net()
        base = {n: getattr(model, n).weight.detach().clone() for n in SHAPES}
        pm = get_peft_model(model, cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "hada_" in n or "lokr_" in n:
                    p.copy_(torch.randn_like(p) * 0.3)
        pm.eval()
        out = tmp_path / f"a{i}"
        pm.save_pretrained(str(out))
        ad = load_adapter(out)
        assert set(ad.layers) == set(SHAPES)
        for name, layer in ad.layers.items():
            ref = probe(getattr(pm.base_model.model, name), SHAPES[name]) - base[name]
            assert rel(layer.delta().reshape(SHAPES[name]), ref) < 2e-6, (i, name)
            s = layer_spectrum(layer).double()
            sref = torch.linalg.svdvals(ref.reshape(ref.shape[0], -1).double())
            k = min(s.numel(), sref.numel())
            assert float((s[:k] - sref[:k]).abs().max()) < 2e-6 * float(sref[0])


# ---- bad input ---------------------------------------------------------------------------------------


def _write(tmp_path, sd, name="bad.safetensors"):
    f = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return f


def _loha_sd(tmp_path):
    model, net, base = lycoris_net("loha")
    f, b = save_lycoris(net, base, tmp_path)
    return load_file(str(f)), b


def test_missing_factor(tmp_path, cli):
    sd, b = _loha_sd(tmp_path)
    del sd["lycoris_lin.hada_w2_b"]
    f = _write(tmp_path, sd)
    out = tmp_path / "out"
    cli.fails("convert", f, "--to", "peft", "-o", out, "--base", b, match="lycoris_lin: LoHa layer has no hada_w2_b")
    assert not out.exists()
    cli.fails("inspect", f, match="hada_w2_b")


def test_inner_dims_mismatch(tmp_path, cli):
    sd, b = _loha_sd(tmp_path)
    sd["lycoris_lin.hada_w1_b"] = torch.randn(3, 16)
    f = _write(tmp_path, sd)
    cli.fails("inspect", f, match="inner dimensions do not match: hada_w1_a (24, 4) @ hada_w1_b (3, 16)")


def test_tucker_core_wrong_order(tmp_path, cli):
    model, net, base = lycoris_net("loha", use_tucker=True)
    f, b = save_lycoris(net, base, tmp_path)
    sd = load_file(str(f))
    sd["lycoris_conv.hada_t1"] = torch.randn(4, 4)
    f = _write(tmp_path, sd)
    cli.fails("inspect", f, "--base", b, match="Tucker core hada_t1 (4, 4) has order 2")
    model, net, base = lycoris_net("lora", use_tucker=True)
    f, b = save_lycoris(net, base, tmp_path)
    sd = load_file(str(f))
    sd["lycoris_conv.lora_mid.weight"] = torch.randn(4, 4)
    cli.fails("inspect", _write(tmp_path, sd, "mid.safetensors"), match="lora_mid.weight (4, 4)")


def test_dora_scale_fits_no_axis(tmp_path, cli):
    model, net, base = lycoris_net("lora", dora_wd=True)
    f, b = save_lycoris(net, base, tmp_path)
    sd = load_file(str(f))
    sd["lycoris_lin.dora_scale"] = torch.ones(7, 1)
    cli.fails("inspect", _write(tmp_path, sd), match="dora_scale (7, 1) fits neither axis of the layer (24, 16)")


def test_unresolvable_key(tmp_path, cli):
    sd, b = _loha_sd(tmp_path)
    sd = {k.replace("lycoris_lin", "lycoris_nothere"): v for k, v in sd.items()}
    f = _write(tmp_path, sd)
    out = tmp_path / "o.safetensors"
    cli.fails("convert", f, "--to", "kohya", "-o", out, "--base", b, match="lycoris_nothere: no module of the base")
    assert not out.exists()
