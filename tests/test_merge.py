"""merge: exact factored svd/cat against float64 dense references, mixed inputs, bad inputs, spec parsing."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import Adapter, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats import load_adapter, save_adapter
from loratools.merge import combine, merge_adapters, parse_weighted_spec


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def rand_adapter(shapes: dict[str, tuple[int, int]], r: int, seed: int, alpha: float, rslora: bool = False) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    layers = {n: LoraLayer(down=torch.randn(r, i, generator=g), up=torch.randn(o, r, generator=g) * 0.1,
                           alpha=alpha, rslora=rslora) for n, (o, i) in shapes.items()}
    return Adapter(layers=layers, format="peft", source=f"rand{seed}")


def test_parse_weighted_spec(tmp_path):
    assert parse_weighted_spec("a/b") == ("a/b", 1.0)
    assert parse_weighted_spec("a/b:0.5") == ("a/b", 0.5)
    assert parse_weighted_spec("a/b:-1e-1") == ("a/b", -0.1)
    odd = tmp_path / "x:2"
    odd.mkdir()
    assert parse_weighted_spec(str(odd)) == (str(odd), 1.0)  # an existing path wins
    assert parse_weighted_spec(f"{odd}:3") == (str(odd), 3.0)
    for bad in ("a:abc", "a:", ":2", "a:nan"):
        with pytest.raises(LoraToolsError):
            parse_weighted_spec(bad)


def test_svd_merge_different_ranks_targets_negative_weights_rslora():
    a = rand_adapter({"q": (40, 30), "k": (20, 30)}, 8, 0, 16.0)
    b = rand_adapter({"q": (40, 30), "v": (20, 30)}, 4, 1, 4.0, rslora=True)
    c = rand_adapter({"q": (40, 30)}, 2, 2, 1.0)
    weights = [0.5, -1.3, 2.0]
    inputs = list(zip([a, b, c], weights))
    merged, report = merge_adapters(inputs, method="svd", rank=14)
    assert list(merged.layers) == ["q", "k", "v"]
    for name, layer in merged.layers.items():
        exact = sum(w * ad.layers[name].delta(torch.float64) for ad, w in inputs if name in ad.layers)
        assert rel(layer.delta(torch.float64), exact) < 1e-5
        assert layer.scale == 1.0
    assert report.exact and report.totals()["relative_error"] < 1e-5
    # truncated: equals the float64 dense Eckart–Young truncation, and the reported error is its error
    merged, report = merge_adapters(inputs, method="svd", rank=5)
    exact = sum(w * ad.layers["q"].delta(torch.float64) for ad, w in inputs)
    u, s, vh = torch.linalg.svd(exact, full_matrices=False)
    assert rel(merged.layers["q"].delta(torch.float64), (u[:, :5] * s[:5]) @ vh[:5]) < 1e-5
    row = next(r for r in report.layers if r.name == "q")
    assert row.relative_error == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-4)


def test_cat_and_cat_rank(monkeypatch):
    a = rand_adapter({"q": (300, 200)}, 8, 0, 16.0)
    b = rand_adapter({"q": (300, 200)}, 4, 1, 4.0)
    merged, _ = merge_adapters([(a, 1.0), (b, -0.5)], method="cat")
    assert merged.layers["q"].rank == 12
    exact = a.layers["q"].delta(torch.float64) - 0.5 * b.layers["q"].delta(torch.float64)
    assert rel(merged.layers["q"].delta(torch.float64), exact) < 1e-6
    # cat + --rank and svd never decompose anything bigger than Σrᵢ × Σrᵢ
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda m, *x, **k: calls.append(tuple(m.shape)) or real(m, *x, **k))
    merged, _ = merge_adapters([(a, 1.0), (b, -0.5)], method="cat", rank=6)
    assert merged.layers["q"].rank == 6 and calls and max(max(c) for c in calls) <= 12


def test_conv_locon_svd_merge(samples):
    ad = load_adapter(samples / "locon.safetensors")
    merged, _ = merge_adapters([(ad, 0.6), (load_adapter(samples / "locon.safetensors"), 0.4)], method="svd")
    for name, layer in ad.layers.items():
        assert merged.layers[name].shape == layer.shape and merged.layers[name].dtype == torch.float16
        assert rel(merged.layers[name].delta(torch.float64), layer.delta(torch.float64)) < 2e-3  # fp16 storage


def test_mixed_kohya_and_peft_inputs(cli, samples, tmp_path):
    out = tmp_path / "m"
    res = cli.ok("merge", f"{samples / 'peft_lora'}:0.7", f"{samples / 'kohya_lora.safetensors'}:-0.2", "-o", out,
                 "--rank", "16", "--json")
    doc = json.loads(res.stdout)
    assert doc["totals"]["relative_error"] < 1e-5 and doc["format"] == "peft"
    assert any("kohya stem(s) paired" in w and "--base" in w for w in doc["warnings"])  # as verify says it
    peft, kohya, merged = load_adapter(samples / "peft_lora"), load_adapter(samples / "kohya_lora.safetensors"), load_adapter(out)
    assert set(merged.layers) == set(peft.layers)
    for name, layer in peft.layers.items():
        stem = "lora_unet_" + name.replace(".", "_")
        exact = 0.7 * layer.delta(torch.float64) - 0.2 * kohya.layers[stem].delta(torch.float64)
        assert rel(merged.layers[name].delta(torch.float64), exact) < 1e-5
    # kohya output keeps kohya naming and metadata
    out_k = tmp_path / "m.safetensors"
    cli.ok("merge", samples / "kohya_lora.safetensors", f"{samples / 'kohya_lora.safetensors'}:0.5", "-o", out_k)
    back = load_adapter(out_k)
    assert set(back.layers) == set(kohya.layers) and back.metadata["ss_output_name"] == "kohya_lora"


def test_combine_semantics_small():
    t1 = torch.tensor([[3.0, -1.0], [0.5, -2.0]])
    t2 = torch.tensor([[-1.0, 2.0], [1.0, -0.1]])
    # ties, density 1: sign per entry from the unweighted sum, mean of the agreeing weighted entries
    got = combine("ties", [t1, t2], [1.0, 2.0], 1.0, "total", None)
    assert torch.allclose(got, torch.tensor([[3.0, 4.0], [(0.5 + 2.0) / 2, (-2.0 - 0.2) / 2]]))
    got = combine("magnitude_prune", [t1, t2], [1.0, 1.0], 0.5, "total", None)
    assert torch.allclose(got, torch.tensor([[3.0, 2.0], [1.0, -2.0]]))  # top-2 |x| of each, summed


def test_dense_methods_run_on_device_cpu_and_report_error():
    a = rand_adapter({"q": (64, 48)}, 4, 0, 4.0)
    b = rand_adapter({"q": (64, 48)}, 4, 1, 8.0)
    for method in ("ties_svd", "dare_ties_svd", "magnitude_prune_svd", "dare_linear_svd"):
        merged, report = merge_adapters([(a, 1.0), (b, 0.5)], method=method, density=0.9, rank=8, seed=1)
        assert merged.layers["q"].rank == 8 and not report.exact
        assert 0 < report.layers[0].relative_error < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu():
    a = rand_adapter({"q": (64, 48)}, 4, 0, 4.0)
    b = rand_adapter({"q": (64, 48)}, 4, 1, 8.0)
    cpu, _ = merge_adapters([(a, 1.0), (b, 0.5)], method="ties_svd", density=0.5, rank=8, exact_svd=True)
    gpu, _ = merge_adapters([(a, 1.0), (b, 0.5)], method="ties_svd", density=0.5, rank=8, exact_svd=True, device="cuda")
    assert rel(gpu.layers["q"].delta(), cpu.layers["q"].delta()) < 1e-4


def test_merge_refuses_dora(cli, samples, tmp_path):
    cli.fails("merge", samples / "peft_dora", samples / "peft_dora", "-o", tmp_path / "o", match="DoRA")
    assert not (tmp_path / "o").exists()


def test_merge_bad_inputs(cli, samples, tmp_path):
    lora = samples / "peft_lora"
    out = tmp_path / "o"
    cli.fails("merge", f"{lora}:abc", lora, "-o", out, match="not a number")
    cli.fails("merge", lora, lora, "-o", out, "--rank", "17", match="combined rank")
    cli.fails("merge", lora, samples / "locon.safetensors", "-o", out, match="different base models")
    cli.fails("merge", lora, lora, "-o", out, "--method", "ties", match="--density")
    cli.fails("merge", lora, lora, "-o", out, "--method", "ties", "--density", "1.5", match="--density")
    cli.fails("merge", lora, samples / "nope", "-o", out, match="no such file")
    assert not out.exists()
    # shape conflict: same module names, other shapes
    other = rand_adapter({"model.layers.0.self_attn.q_proj": (32, 64)}, 4, 0, 4.0)
    save_adapter(other, tmp_path / "other", "peft")
    cli.fails("merge", lora, tmp_path / "other", "-o", out, match="shape 64×64")
    # linear-family methods need equal ranks (v_proj has rank 4 in peft_lora, 8 here)
    v = rand_adapter({"model.layers.0.self_attn.v_proj": (32, 64)}, 8, 0, 4.0)
    save_adapter(v, tmp_path / "v", "peft")
    cli.fails("merge", lora, tmp_path / "v", "-o", out, "--method", "linear", match="equal ranks")
    out.mkdir()
    cli.fails("merge", lora, lora, "-o", out, match="already exists")
    assert not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "other", "v"]


def test_merge_help_names_exact_methods(cli):
    text = cli.ok("merge", "--help").output
    assert "Exact methods" in text and "Approximations" in text and "svd (default)" in text


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 30), n=st.integers(2, 30), r1=st.integers(1, 6), r2=st.integers(1, 6),
       w1=st.floats(-3, 3), w2=st.floats(-3, 3), seed=st.integers(0, 1000))
def test_svd_merge_property_full_rank_is_exact(m, n, r1, r2, w1, w2, seed):
    a = rand_adapter({"x": (m, n)}, r1, seed, float(r1 * 2))
    b = rand_adapter({"x": (m, n)}, r2, seed + 1, 1.0, rslora=True)
    exact = w1 * a.layers["x"].delta(torch.float64) + w2 * b.layers["x"].delta(torch.float64)
    for method in ("svd", "cat"):
        merged, report = merge_adapters([(a, w1), (b, w2)], method=method, rank=r1 + r2 if method == "svd" else None)
        if w1 == w2 == 0:  # Σ wᵢΔWᵢ = 0: the layer is left out rather than written as noise
            assert merged.layers == {} and "cancel out" in report.warnings[-1]
            continue
        if "x" not in merged.layers:  # only when the delta underflows float32 (weights like 1e-266)
            assert float(exact.norm()) < 1e-30
            continue
        got = merged.layers["x"].delta(torch.float64)
        assert float((got - exact).norm()) <= 1e-5 * max(float(exact.norm()), 1e-6)
        assert report.layers[0].relative_error < 1e-4 or float(exact.norm()) < 1e-6


def test_svd_merge_lycoris_kinds(samples):
    ad = load_adapter(samples / "lycoris.safetensors")
    ad.layers = {n: la for n, la in ad.layers.items() if la.magnitude is None}
    other = rand_adapter({}, 1, 0, 1.0)
    other.layers = {n: LoraLayer(down=torch.randn(2, *la.shape[1:]), up=torch.randn(la.shape[0], 2, *([1] * (len(la.shape) - 2))),
                                 alpha=2.0) for n, la in ad.layers.items()}
    merged, report = merge_adapters([(ad, 0.8), (other, -0.5)], method="cat")
    for name, layer in ad.layers.items():
        exact = 0.8 * layer.delta(torch.float64) - 0.5 * other.layers[name].delta(torch.float64)
        assert rel(merged.layers[name].delta(torch.float64), exact) < 2e-3, name
    with pytest.raises(LoraToolsError, match="plain LoRA"):
        merge_adapters([(ad, 0.8), (other, -0.5)], method="linear")
