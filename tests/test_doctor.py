"""``loratools doctor``: every seeded rule break is found (rule ids), clean adapters are clean, and every ``--fix``
output loads in real PEFT with the source adapter's logits (exact fixes ≤ 1e-5; truncations within the reported
per-layer error) and is clean when checked again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.doctor_rules import RULES, TARGETS
from tests.conftest import tiny_llama, tokens

peft = pytest.importorskip("peft")


def _make(root: Path, name: str, seed: int = 1, base_overrides: dict | None = None, **cfg) -> tuple[Path, Path]:
    """(base folder, PEFT adapter folder) of a random LoRA (B ≠ 0) made by PEFT itself on a tiny Llama."""
    from peft import LoraConfig, get_peft_model

    base_dir = root / ("base_" + "_".join(f"{k}{v}" for k, v in sorted((base_overrides or {}).items())))
    if not base_dir.exists():
        tiny_llama(0, **(base_overrides or {})).save_pretrained(base_dir)
    model = tiny_llama(0, **(base_overrides or {}))
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    config.update(cfg)
    pm = get_peft_model(model, LoraConfig(**config))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.mul_(0.3)
    out = root / name
    pm.save_pretrained(out)
    return base_dir, out


def _logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base))
    model.eval()
    pm = PeftModel.from_pretrained(model, str(adapter))
    pm.eval()
    with torch.no_grad():
        return pm(tokens(model.config.vocab_size)).logits.float()


def _doctor(cli, *args) -> tuple[int, dict]:
    res = cli("doctor", *args, "--json", "--quiet")
    return res.exit_code, json.loads(res.stdout)


def _ids(doc: dict, severities=("error", "warning")) -> set[str]:
    return {f["rule"] for f in doc["findings"] if f["severity"] in severities}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("doctor")
    out = {}
    out["plain"] = _make(root, "plain")
    out["dora"] = _make(root, "dora", use_dora=True)
    out["rslora"] = _make(root, "rslora", use_rslora=True, r=8, lora_alpha=4)
    out["patterns"] = _make(root, "patterns", target_modules=["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8,
                            rank_pattern={"down_proj": 8}, alpha_pattern={"v_proj": 2})
    out["dora_rslora"] = _make(root, "dora_rslora", use_dora=True, use_rslora=True, r=8, lora_alpha=16)
    out["mts"] = _make(root, "mts", modules_to_save=["lm_head"])
    out["emb"] = _make(root, "emb", target_modules=["q_proj", "embed_tokens"])
    return root, out


def test_rule_table_is_complete():
    from loratools.cli.doctor_cmd import TARGETS as CLI_TARGETS
    from loratools.doctor import CHECKS

    assert CLI_TARGETS == TARGETS and set(RULES) == set(TARGETS)
    ids = [r.id for rules in RULES.values() for r in rules]
    assert len(ids) == len(set(ids))
    for target, rules in RULES.items():
        assert {f"{target}.zero-coverage", f"{target}.partial-coverage"} <= {r.id for r in rules}
        for r in rules:
            assert r.check in CHECKS and r.severity in ("error", "warning", "info")
            assert r.source and r.holds_for and r.message and r.fix and r.target == target


@pytest.mark.parametrize("target", TARGETS)
def test_clean_adapter_is_clean(cli, made, target):
    base, ad = made[1]["plain"]
    code, doc = _doctor(cli, ad, "--target", target, "--base", base)
    # an LLM adapter is clean everywhere, except that ComfyUI (SD loaders) would find none of its keys: a warning
    expected = {"comfyui.no-family"} if target == "comfyui" else set()
    assert code == 0 and doc["ok"] and _ids(doc) == expected, doc
    assert doc["target"] == target


@pytest.mark.parametrize("case, target, expected", [
    ("dora", "vllm", {"vllm.dora"}),
    ("dora", "llama.cpp", {"llama.cpp.dora"}),
    ("dora", "sglang", {"sglang.dora"}),
    ("dora", "tensorrt-llm", {"tensorrt-llm.dora"}),
    ("dora", "peft", set()),
    ("rslora", "vllm", set()),
    ("rslora", "llama.cpp", {"llama.cpp.rslora"}),
    ("rslora", "sglang", {"sglang.rslora"}),
    ("rslora", "tensorrt-llm", {"tensorrt-llm.rslora"}),
    ("patterns", "llama.cpp", {"llama.cpp.global-alpha"}),
    ("patterns", "vllm", {"vllm.scale-pattern"}),
    ("patterns", "tensorrt-llm", {"tensorrt-llm.global-scale"}),
    ("patterns", "peft", set()),
    ("dora_rslora", "vllm", {"vllm.dora"}),
    ("dora_rslora", "llama.cpp", {"llama.cpp.dora", "llama.cpp.rslora"}),
    ("mts", "vllm", {"vllm.modules-to-save"}),
    ("mts", "llama.cpp", {"llama.cpp.modules-to-save"}),
    ("mts", "sglang", {"sglang.modules-to-save"}),
    ("mts", "peft", set()),
    ("emb", "tensorrt-llm", {"tensorrt-llm.embedding"}),
    ("emb", "vllm", {"vllm.embedding"}),
    ("emb", "llama.cpp", {"llama.cpp.embedding"}),
])
def test_seeded_breaks_are_found(cli, made, case, target, expected):
    base, ad = made[1][case]
    code, doc = _doctor(cli, ad, "--target", target, "--base", base)
    assert _ids(doc) == expected, doc["findings"]
    errors = any(f["severity"] == "error" for f in doc["findings"])
    assert code == (1 if errors else 0) and doc["ok"] is (not errors)
    for f in doc["findings"]:
        assert set(f) == {"rule", "severity", "modules", "message", "fix", "source"}


def test_plain_text_one_line_per_rule(cli, made):
    base, ad = made[1]["dora_rslora"]
    res = cli("doctor", ad, "--target", "llama.cpp", "--base", base)
    assert res.exit_code == 1
    lines = [line for line in res.stdout.splitlines() if line.startswith(("error:", "warning:"))]
    assert [line.split("]")[0] for line in lines] == ["error: [llama.cpp.rslora", "error: [llama.cpp.dora"]
    assert "fix:" in res.stdout and "broken for llama.cpp" in res.stdout


def _fix(cli, tmp_path, base, ad, target, *extra) -> tuple[Path, dict]:
    out = tmp_path / f"fixed_{target}"
    res = cli("doctor", ad, "--target", target, "--base", base, "--fix", "-o", out, "--json", "--quiet", *extra)
    doc = json.loads(res.stdout)
    assert res.exit_code == 0, doc
    assert doc["ok"] and not [f for f in doc["findings_after"] if f["severity"] in ("error", "warning")
                              and f["rule"] not in ("vllm.embedding", "llama.cpp.embedding")], doc["findings_after"]
    code, again = _doctor(cli, out, "--target", target, "--base", base)  # doctor on the output: nothing broken
    assert code == 0 and again["ok"]
    return out, doc


@pytest.mark.parametrize("case, target, extra", [
    ("dora", "vllm", ("--max-rank", "64")),  # fold at full rank: exact
    ("dora_rslora", "llama.cpp", ("--max-rank", "64")),
    ("rslora", "llama.cpp", ()),
    ("rslora", "sglang", ()),
    ("patterns", "llama.cpp", ()),
    ("patterns", "tensorrt-llm", ()),
    ("patterns", "vllm", ()),
    ("dora_rslora", "peft", ()),  # nothing broken: --fix copies
])
def test_exact_fixes_keep_logits(cli, made, tmp_path, case, target, extra):
    base, ad = made[1][case]
    out, doc = _fix(cli, tmp_path, base, ad, target, *extra)
    assert doc["output_format"] == "peft"
    cfg = json.loads((out / "adapter_config.json").read_text())
    if target in ("llama.cpp", "tensorrt-llm", "sglang"):
        assert not cfg.get("use_rslora") and not cfg.get("use_dora")
    if target == "llama.cpp":
        assert not cfg.get("alpha_pattern")  # one global alpha; per-module ranks stay
    want, got = _logits(base, ad), _logits(base, out)
    assert (want - got).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_dora_fold_needs_base(cli, made, tmp_path):
    _, ad = made[1]["dora"]
    res = cli("doctor", ad, "--target", "vllm", "--fix", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "needs --base" in res.stderr


def test_dora_fold_at_own_rank_reports_its_error(cli, made, tmp_path):
    """Folding DoRA at the layer's own rank is a truncation: the reported error is the achieved one."""
    from loratools.checkpoint import Checkpoint
    from loratools.formats import load_adapter

    base, ad = made[1]["dora"]
    out, doc = _fix(cli, tmp_path, base, ad, "vllm")
    ck = Checkpoint(base)
    src, new = load_adapter(ad, base=ck), load_adapter(out, base=ck)
    from loratools import dora

    for row in doc["per_layer"]:
        la = src.layers[row["name"]]
        w = ck.module_weight(row["name"])
        want = dora.effective_delta(la, w, torch.float64)
        got = new.layers[row["name"]].delta(torch.float64)
        err = float((want - got).norm() / want.norm())
        assert row["action"].startswith("DoRA folded") and row["rank"] == la.rank
        assert err == pytest.approx(row["relative_error"], rel=1e-3, abs=1e-6)


def test_modules_to_save_dropped_with_warning(cli, made, tmp_path):
    base, ad = made[1]["mts"]
    res = cli("doctor", ad, "--target", "vllm", "--base", base, "--fix", "-o", tmp_path / "o", "--quiet")
    assert res.exit_code == 0, res.output
    assert "warning: dropped modules_to_save lm_head" in res.stderr
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert not cfg.get("modules_to_save")
    assert all("lora_" in k for k in load_file(tmp_path / "o" / "adapter_model.safetensors"))
    _logits(base, tmp_path / "o")  # loads in PEFT


def test_embedding_dropped_for_tensorrt(cli, made, tmp_path):
    base, ad = made[1]["emb"]
    out, doc = _fix(cli, tmp_path, base, ad, "tensorrt-llm")
    assert any("embed_tokens" in w for w in doc["warnings"])
    assert not any("embed_tokens" in k for k in load_file(out / "adapter_model.safetensors"))
    _logits(base, out)


def _with_extra_layer(src: Path, dst: Path, name: str) -> Path:
    """Copy of a PEFT adapter with one more layer that targets module ``name``."""
    dst.mkdir()
    tensors = load_file(src / "adapter_model.safetensors")
    a = next(v for k, v in tensors.items() if k.endswith("q_proj.lora_A.weight"))
    b = next(v for k, v in tensors.items() if k.endswith("q_proj.lora_B.weight"))
    tensors[f"base_model.model.{name}.lora_A.weight"] = a.clone()
    tensors[f"base_model.model.{name}.lora_B.weight"] = b.clone()
    save_file(tensors, dst / "adapter_model.safetensors", {"format": "pt"})
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    return dst


@pytest.mark.parametrize("target", ["vllm", "llama.cpp", "peft"])
def test_partial_coverage_found_and_fixed(cli, made, tmp_path, target):
    base, ad = made[1]["plain"]
    part = _with_extra_layer(ad, tmp_path / "part", "model.layers.7.self_attn.q_proj")
    code, doc = _doctor(cli, part, "--target", target, "--base", base)
    assert code == 1 and _ids(doc) == {f"{target}.partial-coverage"}
    assert doc["findings"][0]["modules"] == ["model.layers.7.self_attn.q_proj"]
    out, fixed = _fix(cli, tmp_path, base, part, target)
    assert any("model.layers.7.self_attn.q_proj" in w for w in fixed["warnings"])
    assert (_logits(base, ad) - _logits(base, out)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("target", TARGETS)
def test_zero_coverage_is_a_finding(cli, made, tmp_path, target):
    base, ad = made[1]["plain"]
    other = tmp_path / "other"
    other.mkdir()
    tensors = {k.replace("self_attn", "attention"): v for k, v in load_file(ad / "adapter_model.safetensors").items()}
    save_file(tensors, other / "adapter_model.safetensors", {"format": "pt"})
    (other / "adapter_config.json").write_text((ad / "adapter_config.json").read_text())
    code, doc = _doctor(cli, other, "--target", target, "--base", base)
    assert code == 1 and _ids(doc) - {"comfyui.no-family"} == {f"{target}.zero-coverage"}, doc
    zero = next(f for f in doc["findings"] if f["rule"] == f"{target}.zero-coverage")
    assert len(zero["modules"]) == 4
    res = cli("doctor", other, "--target", target, "--base", base, "--fix", "-o", tmp_path / "o")
    assert res.exit_code == 1 and "nothing to fix" in res.stderr


def test_lycoris_types_for_peft_and_diffusers(cli, samples, tmp_path):
    code, doc = _doctor(cli, samples / "lycoris.safetensors", "--target", "peft")
    assert code == 1 and "peft.layer-kind" in _ids(doc)
    code, doc = _doctor(cli, samples / "lycoris.safetensors", "--target", "diffusers")
    assert code == 1 and _ids(doc) == {"diffusers.layer-kind"}
    code, doc = _doctor(cli, samples / "lycoris.safetensors", "--target", "comfyui")
    assert "comfyui.layer-kind" not in _ids(doc)


def test_fix_reports_the_error_of_what_it_stored(cli, samples, tmp_path):
    """LoHa/LoKr rewritten as fp16 LoRA factors: each row's error is the float64 error of the stored factors
    (fp16 rounding, ~1e-4), not the 0 of the exact float32 conversion."""
    from loratools.formats import load_adapter

    src = samples / "lycoris.safetensors"
    out = tmp_path / "fixed.safetensors"
    res = cli("doctor", src, "--target", "diffusers", "--fix", "-o", out, "--json", "--quiet")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.stdout)["per_layer"]}
    a, b = load_adapter(src), load_adapter(out)
    rewritten = [n for n, la in a.layers.items() if la.kind != "lora"]
    assert rewritten
    for name in rewritten:
        want, got = a.layers[name].delta(torch.float64), b.layers[name].delta(torch.float64)
        err = float((got - want).norm() / want.norm())
        assert err > 1e-6 and rows[name]["relative_error"] == pytest.approx(err, rel=1e-3)



# ---------------------------------------------------------------------------------------------------- ranks (vLLM)

WIDE = dict(hidden_size=640, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return {r: _make(root, f"r{r}", base_overrides=WIDE, r=r, lora_alpha=r, target_modules=["q_proj"])
            for r in (12, 48, 300, 600)}


@pytest.mark.parametrize("rank, setting", [(12, 16), (48, 64), (300, 320)])
def test_vllm_rank_settings(cli, wide, rank, setting):
    base, ad = wide[rank]
    code, doc = _doctor(cli, ad, "--target", "vllm", "--base", base)
    assert code == 0 and _ids(doc) == set()
    (info,) = [f for f in doc["findings"] if f["rule"] == "vllm.max-lora-rank-setting"]
    assert f"--max-lora-rank {setting} " in info["message"]


def test_vllm_rank_600_is_broken_and_truncated(cli, wide, tmp_path):
    base, ad = wide[600]
    code, doc = _doctor(cli, ad, "--target", "vllm", "--base", base)
    assert code == 1 and _ids(doc) == {"vllm.max-lora-rank"}
    out, fixed = _fix(cli, tmp_path, base, ad, "vllm")
    (row,) = fixed["per_layer"]
    assert row["rank"] == 512 and row["action"] == "truncated" and 0 < row["relative_error"] < 1
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 512
    # the written layer's error is the reported one (Eckart–Young optimum from the exact spectrum)
    from loratools.formats import load_adapter

    src, new = load_adapter(ad), load_adapter(out)
    name = row["name"]
    want, got = src.layers[name].delta(torch.float64), new.layers[name].delta(torch.float64)
    assert float((want - got).norm() / want.norm()) == pytest.approx(row["relative_error"], rel=1e-3)
    assert row["retained_energy"] == pytest.approx(1 - row["relative_error"] ** 2, rel=1e-6)
    # the logits' change from the base moves by about the layer's reported error (one layer, so nearly linear)
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(str(base)).eval()
    with torch.no_grad():
        z = plain(tokens(plain.config.vocab_size)).logits.float()
    full, cut = _logits(base, ad) - z, _logits(base, out) - z
    assert float((full - cut).norm() / full.norm()) <= 2 * row["relative_error"] + 1e-4


def test_vllm_max_rank_option(cli, wide, tmp_path):
    base, ad = wide[48]
    code, doc = _doctor(cli, ad, "--target", "vllm", "--base", base, "--max-rank", "16")
    assert code == 1 and _ids(doc) == {"vllm.max-lora-rank"} and "16" in doc["findings"][-1]["message"]
    out, fixed = _fix(cli, tmp_path, base, ad, "vllm", "--max-rank", "16")
    assert fixed["per_layer"][0]["rank"] == 16


def test_usage_errors_exit_2(cli, made, tmp_path):
    base, ad = made[1]["plain"]
    assert cli("doctor", ad, "--target", "vllm", "--fix").exit_code == 2
    assert cli("doctor", ad, "--target", "vllm", "-o", tmp_path / "x").exit_code == 2
    assert cli("doctor", ad, "--target", "vllm", "--max-rank", "12").exit_code == 2
    assert cli("doctor", ad, "--target", "nope").exit_code == 2
    assert cli("doctor", ad).exit_code == 2


def test_comfyui_refuses_dora_it_would_misapply(cli, samples):
    """ComfyUI's dora_scale formula is neither PEFT's nor LyCORIS's: DoRA is an error for that target."""
    code, doc = _doctor(cli, samples / "peft_dora", "--target", "comfyui")
    assert code == 1 and "comfyui.dora" in _ids(doc)
