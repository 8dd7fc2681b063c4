"""MoE expert adapters (issue 14): PEFT target_parameters on fused 3-D experts ↔ canonical per-expert layers.

A tiny real transformers-5 Qwen3-MoE (4 experts, random weights) with a real PEFT ``target_parameters`` LoRA (random
non-zero B); the truth is real PEFT loading each file, and float64 ΔW applied to the fused weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loratools.formats import load_adapter
from loratools.formats.experts import coverage, parse

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

E, H, I_ = 4, 32, 16  # experts, hidden, moe_intermediate


def qwen3_moe(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=H, intermediate_size=64, moe_intermediate_size=I_, num_experts=E, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64,
        decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():  # the router is zero-initialised: give it weights so every expert gets tokens
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def randomize_lora(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def ids(n: int = 24) -> torch.Tensor:
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(7))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits.double()


TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(base folder, fused target_parameters adapter folder, attention-only adapter folder)."""
    root = tmp_path_factory.mktemp("moe")
    base = root / "base"
    qwen3_moe().save_pretrained(base)
    pm = peft.get_peft_model(qwen3_moe(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                          target_parameters=TARGETS))
    randomize_lora(pm, 1)
    pm.save_pretrained(root / "fused")
    attn = peft.get_peft_model(qwen3_moe(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"]))
    randomize_lora(attn, 2)
    attn.save_pretrained(root / "attn")
    return base, root / "fused", root / "attn"


@pytest.fixture(scope="module")
def fused_patterns(tmp_path_factory):
    """A fused adapter with PEFT's per-parameter rank / alpha bookkeeping (rank_pattern, alpha_pattern, rsLoRA)."""
    root = tmp_path_factory.mktemp("moe_rp")
    lc = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=TARGETS, use_rslora=True,
                         rank_pattern={"layers.1.mlp.experts.down_proj": 3}, alpha_pattern={"layers.0.mlp.experts.gate_up_proj": 5})
    pm = peft.get_peft_model(qwen3_moe(), lc)
    randomize_lora(pm, 3)
    pm.save_pretrained(root / "fused")
    return root / "fused"


@pytest.fixture(scope="module")
def fused_other(tmp_path_factory):
    """A second fused adapter at the first one's ranks (for the A/B-combining merge methods)."""
    root = tmp_path_factory.mktemp("moe_b")
    pm = peft.get_peft_model(qwen3_moe(), peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                          target_parameters=TARGETS))
    randomize_lora(pm, 5)
    pm.save_pretrained(root / "fused")
    return root / "fused"


def peft_logits(adapter: Path) -> torch.Tensor:
    """Logits of the base with ``adapter`` loaded by real PEFT (PeftModel.from_pretrained)."""
    model = peft.PeftModel.from_pretrained(qwen3_moe(), str(adapter)).eval()
    return logits(model)


def applied_logits(adapter: Path, base: Path) -> torch.Tensor:
    """Logits of the base with every per-expert ΔW (float64, from loratools' canonical layers) added to its fused
    3-D expert tensor, and every other ΔW to its module's weight: the adapter applied without PEFT."""
    model = qwen3_moe()
    ad = load_adapter(adapter, base=base)
    with torch.no_grad():
        for name, layer in ad.layers.items():
            delta = layer.delta(torch.float64)
            p = parse(name)
            if p is None:
                w = model.get_submodule(name).weight
                w.copy_((w.double() + delta).float())
                continue
            module, e, proj = p
            experts = model.get_submodule(module)
            if proj == "down_proj":
                w = experts.down_proj
                w[e] = (w[e].double() + delta).float()
            else:
                rows = slice(0, I_) if proj == "gate_proj" else slice(I_, 2 * I_)
                w = experts.gate_up_proj
                w[e, rows] = (w[e, rows].double() + delta).float()
    return logits(model)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


# --------------------------------------------------------------------------- reading
def test_fused_read_gives_peft_delta_per_expert(fused_patterns):
    """Each canonical per-expert layer is PEFT's own get_delta_weight of that expert (gate rows, up rows, down), with
    PEFT's per-expert rank and alpha bookkeeping (rank_pattern / alpha_pattern keyed by the parameter, rsLoRA)."""
    fused = fused_patterns
    ad = load_adapter(fused)
    assert ad.provenance["expert_layout"] == "fused"
    pm = peft.PeftModel.from_pretrained(qwen3_moe(), str(fused))
    names = [n for n in ad.layers if parse(n)]
    assert len(names) == 2 * E * 3 and not ad.warnings
    for li in range(2):
        outer = pm.base_model.model.model.layers[li].mlp.experts  # ParamWrapper(down_proj) around (gate_up_proj)
        assert outer.parameter_name == "down_proj" and outer.base_layer.parameter_name == "gate_up_proj"
        down = outer.get_delta_weight("default").double()  # [E, H, I]
        gate_up = outer.base_layer.get_delta_weight("default").double()  # [E, 2I, H]
        for e in range(E):
            m = f"model.layers.{li}.mlp.experts.{e}"
            torch.testing.assert_close(ad.layers[f"{m}.gate_proj"].delta(torch.float64), gate_up[e, :I_], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ad.layers[f"{m}.up_proj"].delta(torch.float64), gate_up[e, I_:], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ad.layers[f"{m}.down_proj"].delta(torch.float64), down[e], rtol=1e-6, atol=1e-7)
    assert ad.layers["model.layers.1.mlp.experts.2.down_proj"].rank == 3  # rank_pattern is per expert
    assert ad.layers["model.layers.0.mlp.experts.2.down_proj"].rank == 2
    assert ad.layers["model.layers.0.mlp.experts.1.up_proj"].scale == pytest.approx(5 / math.sqrt(2))


def test_pattern_round_trip_and_applied_logits(fused_patterns, moe, cli, tmp_path):
    """rank_pattern / alpha_pattern / rsLoRA survive fused → per-expert → fused bit-exactly; the per-expert file,
    applied exactly, gives PEFT's logits of the fused one. (PEFT's own v4→v5 conversion cannot load this per-expert
    file: it gives every fused parameter the config's r and ignores per-expert rank_pattern entries.)"""
    base = moe[0]
    per, back = tmp_path / "per", tmp_path / "back"
    doc = json.loads(cli.ok("convert", fused_patterns, "--to", "peft", "--expert-layout", "per-expert", "-o", per,
                            "--json").stdout)
    assert any("not at the config's r=2" in w for w in doc["warnings"])  # said, since PEFT would refuse it
    assert any("rsLoRA per-expert gate/up" in w for w in doc["warnings"])
    cli.ok("convert", per, "--to", "peft", "--expert-layout", "fused", "--base", base, "-o", back)
    a, b = tensors(fused_patterns), tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    ref = peft_logits(fused_patterns)
    torch.testing.assert_close(peft_logits(back), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(applied_logits(per, base), ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- converting
def test_fused_to_per_expert_and_back_bit_exact_same_logits(moe, cli, tmp_path):
    base, fused, _ = moe
    per = tmp_path / "per"
    res = cli.ok("convert", fused, "--to", "peft", "--expert-layout", "per-expert", "-o", per, "--json")
    doc = json.loads(res.stdout)
    assert doc["expert_layout"]["layout"] == "per-expert" and doc["expert_layout"]["source_layout"] == "fused"
    assert doc["warnings"] == []
    cfg = config(per)
    assert cfg.get("target_parameters") is None
    assert "model.layers.0.mlp.experts.3.up_proj" in cfg["target_modules"]
    back = tmp_path / "back"
    res = cli.ok("convert", per, "--to", "peft", "--expert-layout", "fused", "--base", base, "-o", back, "--json")
    rows = json.loads(res.stdout)["expert_layout"]["parameters"]
    assert len(rows) == 4 and not any(r["rank_changed"] for r in rows)
    a, b = tensors(fused), tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg = config(back)
    assert sorted(cfg["target_parameters"]) == sorted(
        f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj"))
    assert not any(parse(t) for t in cfg["target_modules"])

    ref = peft_logits(fused)
    assert (ref - logits(qwen3_moe())).abs().max() > 1e-2  # the adapter changes the output
    # PEFT loads the per-expert file onto transformers-5 fused experts through its own v4→v5 conversion
    torch.testing.assert_close(peft_logits(per), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(peft_logits(back), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(applied_logits(per, base), ref, rtol=0, atol=1e-5)


def test_direct_fused_round_trip_keeps_config(moe, cli, tmp_path):
    _, fused, _ = moe
    out = tmp_path / "same"
    cli.ok("convert", fused, "--to", "peft", "-o", out)
    assert config(out) == config(fused)
    a, b = tensors(fused), tensors(out)
    assert all(torch.equal(a[k], b[k]) for k in a) and sorted(a) == sorted(b)


def test_unequal_ranks_pad_and_stack_exactly(moe, cli, tmp_path):
    """Per-expert layers at different ranks (and gate/up with different downs) → fused: exact, rank changes, said."""
    base, fused, _ = moe
    per = tmp_path / "per"
    cli.ok("convert", fused, "--to", "peft", "--expert-layout", "per-expert", "-o", per)
    small = tmp_path / "small"
    cli.ok("resize", per, "--energy", "0.75", "-o", small)  # each expert's own rank, gate/up downs differ
    out = tmp_path / "fused2"
    res = cli.ok("convert", small, "--to", "peft", "--expert-layout", "fused", "--base", base, "-o", out, "--json")
    doc = json.loads(res.stdout)
    rows = {r["parameter"]: r for r in doc["expert_layout"]["parameters"]}
    gu = rows["model.layers.0.mlp.experts.gate_up_proj"]
    assert gu["rank_changed"] and gu["rank"] >= max(gu["source_ranks"])
    assert any("stacked" in w for w in doc["warnings"])
    src, got = load_adapter(small, base=base), load_adapter(out, base=base)
    for name, layer in src.layers.items():
        torch.testing.assert_close(got.layers[name].delta(torch.float64), layer.delta(torch.float64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(peft_logits(out), applied_logits(small, base), rtol=0, atol=1e-5)


def test_expert_layout_needs_peft_for_fused(moe, cli, tmp_path):
    _, fused, _ = moe
    cli.fails("convert", fused, "--to", "kohya", "--expert-layout", "fused", "-o", tmp_path / "x.safetensors",
              match="--to peft")


def test_bad_fused_rows_one_line_error(moe, cli, tmp_path):
    _, fused, _ = moe
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = config(fused)
    cfg["r"] = 3  # 8 rows of layer 0's lora_A are not 3·E
    cfg["rank_pattern"] = {}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    (bad / "adapter_model.safetensors").write_bytes((fused / "adapter_model.safetensors").read_bytes())
    cli.fails("inspect", bad, match="lora_A (8, 32)")
    cfg = config(fused)
    cfg["target_parameters"] = [*TARGETS, "mlp.experts.up_proj"]  # three nested wrappers expected, two stored
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    cli.fails("inspect", bad, match="make 3 nested PEFT wrapper(s), but the file holds 2")


# --------------------------------------------------------------------------- resize / merge
def test_resize_keeps_per_expert_optimum_and_layout(moe, cli, tmp_path):
    base, fused, _ = moe
    out = tmp_path / "r1"
    cli.ok("resize", fused, "--rank", "1", "-o", out)
    assert config(out)["target_parameters"]  # the input's layout
    src, got = load_adapter(fused), load_adapter(out)
    for name, layer in src.layers.items():
        if parse(name) is None:
            continue
        d = layer.delta(torch.float64)
        s = torch.linalg.svdvals(d)
        optimum = math.sqrt(float(s[1:].square().sum())) / float(d.norm())
        err = float((got.layers[name].delta(torch.float64) - d).norm() / d.norm())
        assert err == pytest.approx(optimum, rel=5e-3, abs=1e-7), name


EXACT = ("cat", "svd")


@pytest.mark.parametrize("method", ["svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                    "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_merge_per_expert_with_fused(moe, fused_patterns, fused_other, cli, tmp_path, method):
    """A per-expert and a fused adapter of one model merge; exact methods give Σ wᵢΔWᵢ per expert; the output keeps
    the first input's layout."""
    base, fused, attn = moe
    per = tmp_path / "per"
    cli.ok("convert", fused, "--to", "peft", "--expert-layout", "per-expert", "-o", per)
    out = tmp_path / "m"
    second = fused_patterns if method in EXACT or method.endswith("_svd") else fused_other  # A/B methods: equal ranks
    args = ["merge", f"{per}:0.7", f"{second}:0.4", "--method", method]
    if method not in EXACT and method not in ("linear",):
        args += ["--density", "0.7"]
    if method == "svd":
        args += ["--rank", "5"]  # = Σ ranks: exact
    doc = json.loads(cli.ok(*args, "-o", out, "--json").stdout)
    assert config(out).get("target_parameters") is None  # first input per-expert → per-expert
    merged = load_adapter(out)
    src, other = load_adapter(fused), load_adapter(second)
    names = [n for n in src.layers if parse(n)]
    assert all(n in merged.layers for n in names)
    if method in EXACT:
        assert doc["totals"]["relative_error"] < 1e-5
        for n in names:
            want = 0.7 * src.layers[n].delta(torch.float64) + 0.4 * other.layers[n].delta(torch.float64)
            torch.testing.assert_close(merged.layers[n].delta(torch.float64), want, rtol=1e-5, atol=1e-6)
    if method in ("svd", "dare_ties"):  # same merge written fused (--expert-layout): PEFT gives the same logits
        fused_out = tmp_path / "mf"
        cli.ok(*args, "-o", fused_out, "--expert-layout", "fused", "--base", base)
        assert config(fused_out)["target_parameters"]
        torch.testing.assert_close(peft_logits(fused_out), applied_logits(out, base), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- inspect coverage
def test_inspect_coverage(moe, cli, tmp_path):
    base, fused, attn = moe
    doc = json.loads(cli.ok("inspect", attn, "--base", base, "--json").stdout)
    ex = doc["summary"]["experts"]
    assert [(m["experts_touched"], m["experts_total"], m["param_fraction"]) for m in ex["modules"]] == [(0, E, 0.0)] * 2
    assert any("touches none of the 8 routed experts" in w for w in doc["summary"]["warnings"])
    doc = json.loads(cli.ok("inspect", fused, "--json").stdout)
    ex = doc["summary"]["experts"]
    assert ex["experts_touched"] == 2 * E and ex["experts_total"] == 2 * E and ex["param_fraction"] == 1.0
    assert all(m["total_from"] == "adapter" for m in ex["modules"])
    # a partial adapter: gate_proj of experts 0 and 1 of layer 0 only
    ad = load_adapter(fused)
    keep = {n: la for n, la in ad.layers.items() if n.startswith(("model.layers.0.mlp.experts.0.gate", "model.layers.0.mlp.experts.1.gate"))}
    ad.layers = keep
    from loratools.checkpoint import Checkpoint

    ex = coverage(ad, Checkpoint(base))
    rows = {m["module"]: m for m in ex["modules"]}
    assert rows["model.layers.0.mlp.experts"]["experts_touched"] == 2
    assert rows["model.layers.0.mlp.experts"]["param_fraction"] == pytest.approx(2 / (3 * E))
    assert rows["model.layers.1.mlp.experts"]["param_fraction"] == 0.0
    assert ex["param_fraction"] == pytest.approx(2 / (2 * 3 * E))
    text = cli.ok("inspect", attn, "--base", base).output
    assert "experts touched" in text and "0 of 8" in text


# --------------------------------------------------------------------------- GPT-OSS: [E, in, out], gate/up interleaved
def gpt_oss():
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=E, num_experts_per_tok=2,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    vocab_size=64, layer_types=["sliding_attention", "full_attention"], sliding_window=8)
    return transformers.GptOssForCausalLM(cfg).eval()


def test_gpt_oss_interleaved_transposed(cli, tmp_path):
    """GPT-OSS stores experts [E, in, out] (is_transposed) with gate/up rows alternating; hidden = 2·intermediate makes
    gate_up_proj square, so nothing can be told from shapes: the order comes from the architecture."""
    base = tmp_path / "base"
    gpt_oss().save_pretrained(base)
    pm = peft.get_peft_model(gpt_oss(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                        target_parameters=TARGETS))
    randomize_lora(pm, 4)
    fused = tmp_path / "fused"
    pm.save_pretrained(fused)
    cfg = config(fused)
    assert cfg["auto_mapping"]["base_model_class"] == "GptOssForCausalLM"
    anonymous = tmp_path / "anonymous"  # the same adapter without the config's architecture hint
    anonymous.mkdir()
    del cfg["auto_mapping"]
    (anonymous / "adapter_config.json").write_text(json.dumps(cfg))
    (anonymous / "adapter_model.safetensors").write_bytes((fused / "adapter_model.safetensors").read_bytes())
    guessed = load_adapter(anonymous)
    assert any("gate rows then up rows" in w for w in guessed.warnings)
    for ad in (load_adapter(fused), load_adapter(anonymous, base=base)):
        assert not any("gate rows then up rows" in w for w in ad.warnings)
        for li in range(2):
            outer = pm.base_model.model.model.layers[li].mlp.experts
            gate_up = outer.base_layer.get_delta_weight("default").double()  # [E, H, 2I] as stored
            down = outer.get_delta_weight("default").double()  # [E, I, H]
            for e in range(E):
                m = f"model.layers.{li}.mlp.experts.{e}"
                torch.testing.assert_close(ad.layers[f"{m}.gate_proj"].delta(torch.float64), gate_up[e].T[0::2],
                                           rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(ad.layers[f"{m}.up_proj"].delta(torch.float64), gate_up[e].T[1::2],
                                           rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(ad.layers[f"{m}.down_proj"].delta(torch.float64), down[e].T,
                                           rtol=1e-6, atol=1e-7)
    per, back = tmp_path / "per", tmp_path / "back"
    cli.ok("convert", fused, "--to", "peft", "--expert-layout", "per-expert", "-o", per)
    cli.ok("convert", per, "--to", "peft", "--expert-layout", "fused", "--base", base, "-o", back)
    a, b = tensors(fused), tensors(back)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # without --base the per-expert file's config still names GPT-OSS (auto_mapping is kept): same bits
    cli.ok("convert", per, "--to", "peft", "--expert-layout", "fused", "-o", tmp_path / "back2")
    c = tensors(tmp_path / "back2")
    assert all(torch.equal(a[k], c[k]) for k in a)
    # forcing the other order is exact too, and reads back to the same per-expert deltas with fused-concat
    cli.ok("convert", per, "--to", "peft", "--expert-layout", "fused-concat", "-o", tmp_path / "concat")
    d = tensors(tmp_path / "concat")
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"
    assert not torch.equal(a[key], d[key]) and torch.equal(a[key].reshape(16, 2, -1)[:, 0], d[key][:16])


# --------------------------------------------------------------------------- Mixtral: transformers-4 per-expert names
def mixtral():
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=I_, num_local_experts=E, num_experts_per_tok=2,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     vocab_size=64)
    model = transformers.MixtralForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def test_mixtral_v4_per_expert_to_fused_matches_peft_conversion(cli, tmp_path):
    """A transformers-4 Mixtral expert LoRA (block_sparse_moe.experts.N.w1/w3/w2) written fused loads in PEFT with the
    logits PEFT's own v4→v5 conversion gives the per-expert file."""
    from loratools.adapter import Adapter, LoraLayer
    from loratools.formats import save_adapter

    base = tmp_path / "base"
    mixtral().save_pretrained(base)
    gen = torch.Generator().manual_seed(9)
    layers = {}
    for li in range(2):
        layers[f"model.layers.{li}.self_attn.q_proj"] = LoraLayer(down=torch.randn(2, H, generator=gen) * .3,
                                                                 up=torch.randn(32, 2, generator=gen) * .3, alpha=4.0)
        for e in range(E):
            for proj, (o, i) in {"w1": (I_, H), "w3": (I_, H), "w2": (H, I_)}.items():
                layers[f"model.layers.{li}.block_sparse_moe.experts.{e}.{proj}"] = LoraLayer(
                    down=torch.randn(2, i, generator=gen) * .3, up=torch.randn(o, 2, generator=gen) * .3, alpha=4.0)
    per = tmp_path / "per"
    save_adapter(Adapter(layers=layers, format="peft"), per, "peft")
    fused = tmp_path / "fused"
    res = cli.ok("convert", per, "--to", "peft", "--expert-layout", "fused", "--base", base, "-o", fused, "--json")
    rows = json.loads(res.stdout)["expert_layout"]["parameters"]
    gu = next(r for r in rows if r["parameter"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert gu["rank"] == 4 and gu["rank_changed"]  # w1 and w3 have their own downs: stacked, rank 2 + 2
    assert sorted(config(fused)["target_parameters"])[0] == "model.layers.0.mlp.experts.down_proj"
    ref = logits(peft.PeftModel.from_pretrained(mixtral(), str(per)).eval())
    assert (ref - logits(mixtral())).abs().max() > 1e-2
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(mixtral(), str(fused)).eval()), ref, rtol=0, atol=1e-5)
    cov = json.loads(cli.ok("inspect", per, "--base", base, "--json").stdout)["summary"]["experts"]
    assert [m["module"] for m in cov["modules"]] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert cov["param_fraction"] == 1.0


def test_missing_experts_written_as_zero(moe, cli, tmp_path):
    """An adapter that touches only some experts, written fused: the others are zero (ΔW unchanged), and said."""
    from loratools.formats import save_adapter

    base, fused, _ = moe
    ad = load_adapter(fused, base=base)
    ad.layers = {n: la for n, la in ad.layers.items() if not (parse(n) and parse(n)[1] in (1, 3))}
    partial = tmp_path / "partial"
    ad.provenance["expert_layout"] = "per-expert"
    save_adapter(ad, partial, "peft")
    out = tmp_path / "out"
    doc = json.loads(cli.ok("convert", partial, "--to", "peft", "--expert-layout", "fused", "--base", base, "-o", out,
                            "--json").stdout)
    assert any("2 of 4 expert(s) (e.g. 1) have no layers: written as zero" in w for w in doc["warnings"])
    b = tensors(out)["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]  # down_proj, rank-major columns
    assert b.reshape(H, 2, E)[:, :, [1, 3]].abs().max() == 0
    torch.testing.assert_close(peft_logits(out), applied_logits(partial, base), rtol=0, atol=1e-5)


def test_fused_refuses_dora(tmp_path):
    from loratools.adapter import Adapter, LoraLayer
    from loratools.errors import LoraToolsError
    from loratools.formats import save_adapter
    from loratools.formats.experts import set_layout

    layer = LoraLayer(down=torch.ones(1, H), up=torch.ones(I_, 1), magnitude=torch.ones(I_))
    ad = Adapter(layers={"model.layers.0.mlp.experts.0.gate_proj": layer}, format="peft")
    set_layout(ad, "fused", "peft")
    with pytest.raises(LoraToolsError, match="refuses DoRA"):
        save_adapter(ad, tmp_path / "x", "peft")
    assert not (tmp_path / "x").exists()


def test_experts_only_adapter_against_fused_base(moe, cli, tmp_path):
    """Per-expert layers count as matched against a base that holds its experts as fused 3-D tensors."""
    base, fused, _ = moe
    ad = load_adapter(fused)
    cfg = config(fused)
    only = tmp_path / "only"
    only.mkdir()
    cfg["target_modules"] = []
    (only / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors(fused).items() if ".experts." in k}, str(only / "adapter_model.safetensors"))
    doc = json.loads(cli.ok("inspect", only, "--base", base, "--json").stdout)
    assert doc["summary"]["unmatched"] == [] and doc["summary"]["experts"]["param_fraction"] == 1.0
    assert not any("match no module" in w for w in doc["summary"]["warnings"])
    assert len(doc["layers"]) == len([n for n in ad.layers if parse(n)])
    cli.ok("convert", only, "--to", "peft", "--base", base, "--expert-layout", "per-expert", "-o", tmp_path / "per")


def test_merge_fused_first_keeps_fused(moe, cli, tmp_path):
    base, fused, _ = moe
    per = tmp_path / "per"
    cli.ok("convert", fused, "--to", "peft", "--expert-layout", "per-expert", "-o", per)
    out = tmp_path / "m"
    cli.ok("merge", f"{fused}:1", f"{per}:0.5", "--method", "cat", "-o", out)
    assert config(out)["target_parameters"]
    src, got = load_adapter(fused), load_adapter(out)
    for n, la in src.layers.items():
        torch.testing.assert_close(got.layers[n].delta(torch.float64), 1.5 * la.delta(torch.float64), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(peft_logits(out), applied_logits(out, base), rtol=0, atol=1e-5)
