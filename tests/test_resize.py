"""resize: exact factored truncation vs float64 dense SVD (Eckart–Young), formats, pruning, DoRA, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from loratools.adapter import Adapter, LoraLayer
from loratools.formats import load_adapter, save_adapter
from loratools.linalg import RankRule
from loratools.resize import Prune, resize_adapter


def dense_truncation(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    m = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    trunc = (u[:, :k] * s[:k]) @ vh[:k]
    return trunc.reshape(delta.shape), float(s[k:].square().sum().sqrt() / s.square().sum().sqrt())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_resize_peft_matches_dense_eckart_young(cli, samples, tmp_path):
    out = tmp_path / "r3"
    res = cli.ok("resize", samples / "peft_lora", "-o", out, "--rank", "3", "--json")
    doc = json.loads(res.stdout)
    src, new = load_adapter(samples / "peft_lora"), load_adapter(out)
    assert list(new.layers) == list(src.layers)
    rows = {r["name"]: r for r in doc["layers"]}
    for name, layer in src.layers.items():
        ref, err = dense_truncation(layer.delta(torch.float64), 3)
        got = new.layers[name]
        assert got.rank == 3 and got.scale == 1.0
        assert rel(got.delta(torch.float64), ref) < 1e-5
        assert rows[name]["relative_error"] == pytest.approx(err, rel=1e-4)
        assert rows[name]["retained_energy"] == pytest.approx(1 - err**2, rel=1e-5)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 3 and not cfg["rank_pattern"] and not cfg["alpha_pattern"]
    assert cfg["task_type"] == "CAUSAL_LM"  # the rest of the config is kept
    assert doc["totals"]["params_after"] < doc["totals"]["params_before"]
    assert doc["totals"]["bytes_after"] < doc["totals"]["bytes_before"]


def test_resize_loads_in_peft_with_same_outputs(samples, tmp_path, cli):
    from peft import PeftModel

    from tests.conftest import sample_llama, tokens

    out = tmp_path / "e"
    cli.ok("resize", samples / "peft_lora", "-o", out, "--energy", "0.95")
    new = load_adapter(out)
    model = PeftModel.from_pretrained(sample_llama(), str(out)).eval()
    base = sample_llama()
    sd = base.state_dict()
    with torch.no_grad():
        for name, layer in new.layers.items():
            sd[name + ".weight"] += layer.delta()
        base.load_state_dict(sd)
        x = tokens(256)
        assert torch.allclose(model(x).logits, base(x).logits, atol=1e-5)


def test_resize_never_forms_dense_delta(samples, monkeypatch):
    ad = load_adapter(samples / "peft_lora")
    calls = []
    real = torch.linalg.svd

    def spy(a, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    monkeypatch.setattr(LoraLayer, "delta", lambda *a, **k: (_ for _ in ()).throw(AssertionError("dense delta")))
    resize_adapter(ad, RankRule("rank", 2))
    assert calls and all(max(s) <= 8 for s in calls)  # only the r×r core is decomposed


def test_resize_kohya_fp16_metadata_and_alpha(cli, samples, tmp_path):
    out = tmp_path / "k.safetensors"
    cli.ok("resize", samples / "kohya_lora.safetensors", "-o", out, "--rank", "3")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        down = f.get_tensor(next(k for k in keys if k.endswith("q_proj.lora_down.weight")))
        alpha = f.get_tensor(next(k for k in keys if k.endswith("q_proj.alpha")))
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3"
    assert meta["ss_training_comment"] == "loratools sample (synthetic)"  # other ss_* kept
    assert down.dtype == torch.float16 and down.shape[0] == 3 and alpha.dtype == torch.float16 and float(alpha) == 3
    src, new = load_adapter(samples / "kohya_lora.safetensors"), load_adapter(out)
    for name, layer in src.layers.items():
        ref, _ = dense_truncation(layer.delta(torch.float64), 3)
        assert rel(new.layers[name].delta(torch.float64), ref) < 2e-3  # fp16 storage


def test_resize_energy_rule_matches_dense_spectrum(samples):
    ad = load_adapter(samples / "peft_lora")
    new, report = resize_adapter(ad, RankRule("energy", 0.9))
    for row in report.layers:
        s = torch.linalg.svdvals(ad.layers[row.name].delta(torch.float64))
        cum = torch.cumsum(s.square(), 0) / s.square().sum()
        expect = int((cum < 0.9 - 1e-12).sum()) + 1
        assert row.new_rank == min(expect, row.old_rank)
        assert row.retained_energy >= 0.9


def test_resize_rslora_kept(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = {f"m{i}": LoraLayer(down=torch.randn(8, 20, generator=g), up=torch.randn(30, 8, generator=g),
                                 alpha=4.0, rslora=True) for i in range(2)}
    ad = Adapter(layers=layers, format="peft", config={"peft_type": "LORA", "r": 8, "lora_alpha": 4,
                                                       "use_rslora": True, "target_modules": ["m0", "m1"]})
    save_adapter(ad, tmp_path / "in", "peft")
    new, _ = resize_adapter(load_adapter(tmp_path / "in"), RankRule("rank", 5))
    save_adapter(new, tmp_path / "out", "peft")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 5 and cfg["lora_alpha"] == pytest.approx(math.sqrt(5))
    back = load_adapter(tmp_path / "out")
    for name, layer in layers.items():
        ref, _ = dense_truncation(layer.delta(torch.float64), 5)
        assert rel(back.layers[name].delta(torch.float64), ref) < 1e-5


def test_resize_conv_rank_locon(cli, samples, tmp_path):
    out = tmp_path / "c.safetensors"
    res = cli.ok("resize", samples / "locon.safetensors", "-o", out, "--conv-rank", "2", "--rank", "3", "--json")
    doc = json.loads(res.stdout)
    src, new = load_adapter(samples / "locon.safetensors"), load_adapter(out)
    for row in doc["layers"]:
        layer = src.layers[row["name"]]
        k = 2 if layer.is_conv else 3
        assert row["new_rank"] == k
        ref, _ = dense_truncation(layer.delta(torch.float64), k)
        assert new.layers[row["name"]].shape == layer.shape
        assert rel(new.layers[row["name"]].delta(torch.float64), ref) < 2e-3
    with safe_open(str(out), "pt") as f:
        args = json.loads(f.metadata()["ss_network_args"])
    assert args["conv_dim"] == "2"


def test_resize_prune_and_filters(samples):
    ad = load_adapter(samples / "peft_lora")
    norms = {n: float(layer.delta().norm()) for n, layer in ad.layers.items()}
    ordered = sorted(norms.values())
    cut = (ordered[5] + ordered[6]) / 2
    new, rep = resize_adapter(ad, None, prune=Prune.parse(str(cut)))
    assert set(new.layers) == {n for n, v in norms.items() if v >= cut}
    assert all(new.layers[n] is ad.layers[n] for n in new.layers)  # untouched layers are bit-exact copies
    top = max(norms.values())
    pct = 100 * (ordered[8] + ordered[9]) / 2 / top
    new, _ = resize_adapter(ad, None, prune=Prune.parse(f"{pct}%"))
    assert set(new.layers) == {n for n, v in norms.items() if v >= pct / 100 * top}
    assert len(new.layers) == len(norms) - 9
    assert Prune.parse("0.7", relative=True) == Prune(0.7, True)
    new, rep = resize_adapter(ad, RankRule("rank", 2), include=["*.self_attn.*"], exclude=["*.v_proj"])
    assert set(new.layers) == {n for n in ad.layers if "self_attn" in n and not n.endswith("v_proj")}
    assert {r.action for r in rep.layers} == {"resized", "excluded"}


def test_resize_dora_keeps_magnitude_with_warning(cli, samples, tmp_path):
    out = tmp_path / "d"
    res = cli.ok("resize", samples / "peft_dora", "-o", out, "--rank", "2")
    assert "DoRA" in res.stderr and "magnitude" in res.stderr
    src, new = load_adapter(samples / "peft_dora"), load_adapter(out)
    for name, layer in src.layers.items():
        assert torch.equal(new.layers[name].magnitude, layer.magnitude)
        assert new.layers[name].rank == 2
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True


def test_resize_bad_inputs(cli, samples, tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    cli.fails("resize", samples / "peft_lora", "-o", out, "--rank", "2", match="already exists")
    assert not any(out.iterdir())
    cli.fails("resize", samples / "peft_lora", "-o", tmp_path / "y", match="nothing to do")
    cli.fails("resize", samples / "peft_lora", "-o", tmp_path / "y", "--prune-below", "abc", match="prune-below")
    cli.fails("resize", samples / "peft_lora", "-o", tmp_path / "y", "--rank", "2", "--energy", "0.5",
              match="choose one rank rule")
    cli.fails("resize", samples / "peft_lora", "-o", tmp_path / "y", "--prune-below", "1e9", match="nothing left")
    cli.fails("resize", samples / "peft_lora", "-o", tmp_path / "y", "--rank", "0", match="--rank")
    assert not (tmp_path / "y").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp files left behind


def test_resize_lycoris_layers_loha_lokr_full(samples, tmp_path, cli):
    """Any layer kind (LoHa, LoKr, full, Tucker) is resized from its exact factors."""
    src = load_adapter(samples / "lycoris.safetensors")
    assert {layer.kind for layer in src.layers.values()} >= {"loha", "lokr", "full"}
    out = tmp_path / "ly.safetensors"
    cli.ok("resize", samples / "lycoris.safetensors", "-o", out, "--rank", "3")
    new = load_adapter(out)
    for name, layer in src.layers.items():
        ref, _ = dense_truncation(layer.delta(torch.float64), 3)
        assert new.layers[name].rank == 3 and new.layers[name].shape == layer.shape
        assert rel(new.layers[name].delta(torch.float64), ref) < 2e-3, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA only"))])
def test_resize_device(cli, samples, tmp_path, device):
    """--device runs the factored SVDs there: the same ranks and, to float32 precision, the same ΔW as the default
    CPU run (CPU: the same bytes); a CUDA device on a machine without one is a one-line error."""
    ref, out = tmp_path / "ref", tmp_path / device
    cli.ok("resize", samples / "peft_lora", "--rank", "4", "-o", ref, "-q")
    cli.ok("resize", samples / "peft_lora", "--rank", "4", "-o", out, "--device", device, "-q")
    a, b = load_adapter(ref), load_adapter(out)
    for name, la in a.layers.items():
        want, got = la.delta(torch.float64), b.layers[name].delta(torch.float64)
        assert b.layers[name].rank == la.rank and float((got - want).norm()) <= 1e-5 * float(want.norm())
    if device == "cpu":
        assert (ref / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    if not torch.cuda.is_available():
        cli.fails("resize", samples / "peft_lora", "--rank", "4", "-o", tmp_path / "x", "--device", "cuda",
                  match="CUDA is not available")
