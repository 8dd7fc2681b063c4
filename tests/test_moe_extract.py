"""extract / bake / spectrum on MoE checkpoints with fused 3-D expert tensors (issue 14, checkpoint side).

Tiny real transformers-5 models (Qwen3-MoE: fused [E, out, in], gate/up concatenated; GPT-OSS: [E, in, out],
gate/up interleaved) with random weights; TUNED = BASE + a random low-rank ΔW per expert (plus router and attention
changes), written fused (the model's own state dict) or per expert (``save_pretrained``, transformers' reverse
conversion). Truth: float64 SVD of each expert's ΔW, transformers' forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratools.bake import bake
from loratools.checkpoint import Checkpoint
from loratools.cli import main
from loratools.errors import LoraToolsError
from loratools.extract import ExtractOptions, extract, spectrum
from loratools.formats import save_adapter
from loratools.linalg import RankRule

E, H, INTER, LAYERS = 4, 32, 16, 2  # experts, hidden, moe intermediate, layers
DELTA_RANK = 3


def qwen3_moe(seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, intermediate_size=48, moe_intermediate_size=INTER, num_experts=E,
                         num_experts_per_tok=2, vocab_size=64, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeForCausalLM(cfg).eval()


def gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, num_local_experts=E, num_experts_per_tok=2, vocab_size=64,
                       layer_types=["full_attention"] * LAYERS, sliding_window=16)
    return GptOssForCausalLM(cfg).eval()


def write_fused(model, folder: Path) -> Path:
    """The model's own (fused 3-D) state dict as model.safetensors + config.json."""
    folder.mkdir(parents=True)
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.to_json_file(str(folder / "config.json"))
    return folder


def low_rank(m: int, n: int, gen: torch.Generator, rank: int = DELTA_RANK, noise: float = 0.0) -> torch.Tensor:
    d = torch.randn(m, rank, generator=gen) @ torch.randn(rank, n, generator=gen) * 0.05
    return d + noise * torch.randn(m, n, generator=gen)


def perturb_qwen(model, seed: int = 1, noise: float = 0.0) -> dict[str, torch.Tensor]:
    """Add a random low-rank ΔW to every expert's gate, up, down (canonical [out, in]), the router and one q_proj;
    returns {canonical module → ΔW}."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            ex = layer.mlp.experts
            for e in range(E):
                for name, rows in (("gate_proj", slice(0, INTER)), ("up_proj", slice(INTER, 2 * INTER))):
                    d = low_rank(INTER, H, gen, noise=noise)
                    ex.gate_up_proj[e, rows] += d
                    deltas[f"model.layers.{li}.mlp.experts.{e}.{name}"] = d
                d = low_rank(H, INTER, gen, noise=noise)
                ex.down_proj[e] += d
                deltas[f"model.layers.{li}.mlp.experts.{e}.down_proj"] = d
            layer.mlp.gate.weight += 0.05 * torch.randn(E, H, generator=gen)
        model.model.layers[0].self_attn.q_proj.weight += low_rank(32, H, gen)
    return deltas


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen_moe")
    base = qwen3_moe()
    write_fused(base, root / "base")
    base.save_pretrained(root / "base_per_expert")  # transformers 5 writes experts.N.gate_proj.weight back
    tuned = qwen3_moe()
    deltas = perturb_qwen(tuned)
    write_fused(tuned, root / "tuned")
    noisy = qwen3_moe()
    noisy_deltas = perturb_qwen(noisy, seed=2, noise=0.01)
    write_fused(noisy, root / "noisy")
    return root, deltas, noisy_deltas


def logits(model_dir: Path, cls) -> torch.Tensor:
    model = cls.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        return model(ids).logits


def test_checkpoint_reads_fused_experts_as_canonical_modules(qwen_dirs):
    root, _, _ = qwen_dirs
    fused, per = Checkpoint(root / "base"), Checkpoint(root / "base_per_expert")
    assert "model.layers.0.mlp.experts.gate_up_proj" in fused.keys()
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in per.keys()
    names = [f"model.layers.{li}.mlp.experts.{e}.{p}" for li in range(LAYERS) for e in range(E)
             for p in ("gate_proj", "up_proj", "down_proj")]
    for name in names:
        assert fused.module_shape(name) == per.module_shape(name)
        assert torch.equal(fused.module_weight(name), per.module_weight(name)), name
    assert fused.module_refs()["model.layers.1.mlp.experts.2.up_proj"].expert == 2


def test_full_rank_extraction_reproduces_tuned_logits(qwen_dirs, tmp_path):
    from transformers import Qwen3MoeForCausalLM

    root, deltas, _ = qwen_dirs
    res = extract(root / "base", root / "tuned", ExtractOptions(rule=RankRule("full"), router="lora"))
    names = {r["name"] for r in res.layers if r["kind"] == "expert"}
    assert names == set(deltas)
    assert all(r["rank"] == DELTA_RANK for r in res.layers if r["kind"] == "expert")
    for name, d in deltas.items():
        left, right = res.adapter.layers[name].factors(torch.float64)
        assert torch.allclose(left @ right.T, d.double(), atol=1e-6), name
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    bake(root / "base", [(tmp_path / "lora", 1.0)], tmp_path / "baked")
    got, want = logits(tmp_path / "baked", Qwen3MoeForCausalLM), logits(root / "tuned", Qwen3MoeForCausalLM)
    assert (got - want).abs().max() <= 1e-4
    base = logits(root / "base", Qwen3MoeForCausalLM)
    assert (base - want).abs().max() > 1e-2  # the change is visible in the logits


def test_full_rank_per_expert_adapter_loads_in_peft(qwen_dirs, tmp_path):
    """The default output (per-expert PEFT target_modules, router in modules_to_save) loads in PEFT 0.21 onto the
    fused transformers-5 model (PEFT maps per-expert modules onto ``target_parameters``) and gives the tuned logits."""
    from peft import PeftModel
    from transformers import Qwen3MoeForCausalLM

    root, _, _ = qwen_dirs
    res = extract(root / "base", root / "tuned", ExtractOptions(rule=RankRule("full")))
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    model = PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(root / "base"), tmp_path / "lora").eval()
    ids = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        got = model(ids).logits
    assert (got - logits(root / "tuned", Qwen3MoeForCausalLM)).abs().max() <= 1e-4


def test_low_rank_each_expert_at_float64_optimum(qwen_dirs):
    root, _, noisy = qwen_dirs
    res = extract(root / "base", root / "noisy", ExtractOptions(rule=RankRule("rank", 8), expert_rule=RankRule("rank", 2)))
    experts = {r["name"]: r for r in res.layers if r["kind"] == "expert"}
    assert set(experts) == set(noisy)
    assert res.layers[[r["name"] for r in res.layers].index("model.layers.0.self_attn.q_proj")]["rank"] == 8
    for name, d in noisy.items():
        d = d.double()
        s = torch.linalg.svdvals(d)
        optimum = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        left, right = res.adapter.layers[name].factors(torch.float64)
        stored = float(torch.linalg.norm(d - left @ right.T) / torch.linalg.norm(d))
        assert experts[name]["rank"] == 2
        assert stored <= optimum * 1.005, (name, stored, optimum)
        assert abs(experts[name]["relative_error"] - optimum) <= 0.005 * optimum


def test_per_expert_base_pairs_with_fused_tuned(qwen_dirs):
    root, deltas, _ = qwen_dirs
    opt = ExtractOptions(rule=RankRule("rank", 2))
    fused = extract(root / "base", root / "tuned", opt)
    mixed = extract(root / "base_per_expert", root / "tuned", opt)
    assert set(fused.adapter.layers) == set(mixed.adapter.layers)
    assert not [s for s in mixed.skipped if ".experts." in s["name"]]
    for name in deltas:
        a, b = fused.adapter.layers[name], mixed.adapter.layers[name]
        assert torch.equal(a.up, b.up) and torch.equal(a.down, b.down), name
    # and the other way round: fused base, per-expert tuned
    tuned_per = root / "tuned_per_expert"
    if not tuned_per.exists():
        from transformers import Qwen3MoeForCausalLM

        Qwen3MoeForCausalLM.from_pretrained(root / "tuned").save_pretrained(tuned_per)
    back = extract(root / "base", tuned_per, opt)
    for name in deltas:
        a, b = fused.adapter.layers[name], back.adapter.layers[name]
        assert torch.allclose(a.factors(torch.float64)[0] @ a.factors(torch.float64)[1].T,
                              b.factors(torch.float64)[0] @ b.factors(torch.float64)[1].T, atol=1e-6), name


def test_router_modes_are_explicit_and_reported(qwen_dirs, tmp_path):
    root, _, _ = qwen_dirs
    full = extract(root / "base", root / "tuned", ExtractOptions(rule=RankRule("rank", 4)))
    tuned = load_file(str(root / "tuned" / "model.safetensors"))
    for li in range(LAYERS):
        key = f"model.layers.{li}.mlp.gate.weight"
        assert torch.equal(full.adapter.extra_tensors[f"base_model.model.{key}"], tuned[key])
    assert {r["handled"] for r in full.summary["experts"]["routers"]} == {"saved in full"}
    save_adapter(full.adapter, tmp_path / "full", "peft")
    cfg = json.loads((tmp_path / "full" / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == [f"model.layers.{li}.mlp.gate" for li in range(LAYERS)]
    skip = extract(root / "base", root / "tuned", ExtractOptions(rule=RankRule("rank", 4), router="skip"))
    assert not skip.adapter.extra_tensors and not any(".mlp.gate" == n[-9:] for n in skip.adapter.layers)
    assert {r["handled"] for r in skip.summary["experts"]["routers"]} == {"skipped"}
    lora = extract(root / "base", root / "tuned", ExtractOptions(rule=RankRule("rank", 4), router="lora"))
    assert "model.layers.0.mlp.gate" in lora.adapter.layers


def test_bake_into_fused_base_equals_manual_merge(qwen_dirs, tmp_path):
    root, _, _ = qwen_dirs
    res = extract(root / "base", root / "noisy", ExtractOptions(rule=RankRule("rank", 2), router="lora"))
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    bake(root / "base", [(tmp_path / "lora", 0.7)], tmp_path / "baked")
    base = load_file(str(root / "base" / "model.safetensors"))
    baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    for li in range(LAYERS):
        pre = f"model.layers.{li}.mlp.experts"
        gate_up, down = base[f"{pre}.gate_up_proj"].clone(), base[f"{pre}.down_proj"].clone()
        for e in range(E):
            for name, target in (("gate_proj", gate_up[e, :INTER]), ("up_proj", gate_up[e, INTER:]), ("down_proj", down[e])):
                left, right = res.adapter.layers[f"{pre}.{e}.{name}"].factors(torch.float32)
                target += 0.7 * (left @ right.T)
        assert torch.allclose(baked[f"{pre}.gate_up_proj"], gate_up, atol=1e-6)
        assert torch.allclose(baked[f"{pre}.down_proj"], down, atol=1e-6)
    assert baked["model.layers.0.mlp.experts.gate_up_proj"].shape == (E, 2 * INTER, H)


def test_spectrum_lists_each_expert(qwen_dirs):
    root, noisy_names, _ = qwen_dirs
    rep = spectrum(root / "base", root / "tuned", exact=True)
    rows = {r["name"]: r for r in rep["layers"]}
    assert set(noisy_names) <= set(rows)
    row = rows["model.layers.1.mlp.experts.3.up_proj"]
    assert row["shape"] == [INTER, H] and row["energy_rank"]["0.99"] <= DELTA_RANK


def test_gpt_oss_square_fused_layout_read_from_architecture(tmp_path):
    """GPT-OSS stores gate_up_proj [E, in, out] with gate/up interleaved; with hidden = 2·intermediate each expert's
    slice is square, so only the architecture tells the orientation."""
    from transformers import GptOssForCausalLM

    base = gpt_oss()
    assert tuple(base.model.layers[0].mlp.experts.gate_up_proj.shape) == (E, H, 2 * INTER) and H == 2 * INTER
    write_fused(base, tmp_path / "base")
    tuned = gpt_oss()
    gen = torch.Generator().manual_seed(3)
    gate, up, down = low_rank(INTER, H, gen), low_rank(INTER, H, gen), low_rank(H, INTER, gen)  # canonical [out, in]
    with torch.no_grad():
        ex = tuned.model.layers[1].mlp.experts
        ex.gate_up_proj[2, :, 0::2] += gate.T
        ex.gate_up_proj[2, :, 1::2] += up.T
        ex.down_proj[2] += down.T
    write_fused(tuned, tmp_path / "tuned")
    res = extract(tmp_path / "base", tmp_path / "tuned", ExtractOptions(rule=RankRule("full")))
    pre = "model.layers.1.mlp.experts.2"
    assert {r["name"] for r in res.layers} == {f"{pre}.gate_proj", f"{pre}.up_proj", f"{pre}.down_proj"}
    for name, d in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
        left, right = res.adapter.layers[f"{pre}.{name}"].factors(torch.float64)
        assert torch.allclose(left @ right.T, d.double(), atol=1e-6), name
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    bake(tmp_path / "base", [(tmp_path / "lora", 1.0)], tmp_path / "baked")
    got, want = logits(tmp_path / "baked", GptOssForCausalLM), logits(tmp_path / "tuned", GptOssForCausalLM)
    assert (got - want).abs().max() <= 1e-4


def test_fused_experts_without_architecture_refused(qwen_dirs, tmp_path):
    root, _, _ = qwen_dirs
    for name in ("base", "tuned"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").symlink_to(root / name / "model.safetensors")
    with pytest.raises(LoraToolsError, match=r"experts\.(gate_up|down)_proj: a fused 3-D.*no known MoE architecture"):
        extract(tmp_path / "base", tmp_path / "tuned")
    r = CliRunner().invoke(main, ["extract", "--base", str(tmp_path / "base"), "--tuned", str(tmp_path / "tuned"),
                                  "-o", str(tmp_path / "out")])
    assert r.exit_code == 1 and "no known MoE architecture" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_cli_expert_rank_and_router_json(qwen_dirs, tmp_path):
    root, _, _ = qwen_dirs
    out = tmp_path / "lora"
    r = CliRunner().invoke(main, ["extract", "--base", str(root / "base"), "--tuned", str(root / "tuned"),
                                  "-o", str(out), "--rank", "4", "--expert-rank", "2", "--router", "skip", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    ex = doc["summary"]["experts"]
    assert ex["modules"] == LAYERS * E * 3 and ex["tensors"] == LAYERS * 2 and ex["ranks"] == [2]
    assert ex["router"] == "skip" and len(ex["routers"]) == LAYERS
    assert doc["summary"]["expert_rule"] == "rank=2"
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "model.layers.0.mlp.experts.3.down_proj" in cfg["target_modules"] or "down_proj" in cfg["target_modules"]


def test_mixtral_per_expert_names_pair_with_fused(tmp_path):
    """Mixtral's original checkpoints (``block_sparse_moe.experts.N.w1|w3|w2``, router ``block_sparse_moe.gate``)
    map to the canonical ``mlp.experts.N.gate_proj|up_proj|down_proj`` / ``mlp.gate`` of the fused model."""
    from transformers import MixtralConfig, MixtralForCausalLM

    def mixtral():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(
            hidden_size=H, intermediate_size=INTER, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_local_experts=E, num_experts_per_tok=2, vocab_size=64)).eval()

    base = mixtral()
    base.save_pretrained(tmp_path / "base")  # per expert, original names
    ck = Checkpoint(tmp_path / "base")
    assert "model.layers.0.block_sparse_moe.experts.1.w3.weight" in ck.keys()
    # the original module names stay addressable (adapters trained on them), beside the canonical ones
    assert ck.module_ref("model.layers.0.block_sparse_moe.experts.1.w3") == ck.module_ref(
        "model.layers.0.mlp.experts.1.up_proj")
    tuned = mixtral()
    gen = torch.Generator().manual_seed(5)
    up, router = low_rank(INTER, H, gen), 0.05 * torch.randn(E, H, generator=gen)
    with torch.no_grad():
        tuned.model.layers[0].mlp.experts.gate_up_proj[1, INTER:] += up
        tuned.model.layers[0].mlp.gate.weight += router
    write_fused(tuned, tmp_path / "tuned")
    res = extract(tmp_path / "base", tmp_path / "tuned", ExtractOptions(rule=RankRule("full"), router="lora"))
    assert {r["name"] for r in res.layers} == {"model.layers.0.mlp.experts.1.up_proj", "model.layers.0.mlp.gate"}
    assert not [s for s in res.skipped if "only in" in s["reason"]]
    left, right = res.adapter.layers["model.layers.0.mlp.experts.1.up_proj"].factors(torch.float64)
    assert torch.allclose(left @ right.T, up.double(), atol=1e-6)
    left, right = res.adapter.layers["model.layers.0.mlp.gate"].factors(torch.float64)
    assert torch.allclose(left @ right.T, router.double(), atol=1e-6)
    # the per-expert base bakes by canonical names: its w3 / gate tensors get the change
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    bake(tmp_path / "base", [(tmp_path / "lora", 1.0)], tmp_path / "baked")
    baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    want = tuned.state_dict()
    assert torch.allclose(baked["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
                          want["model.layers.0.mlp.experts.gate_up_proj"][1, INTER:], atol=1e-6)
    assert torch.allclose(baked["model.layers.0.block_sparse_moe.gate.weight"],
                          want["model.layers.0.mlp.gate.weight"], atol=1e-6)


def test_qwen2_moe_shared_expert_decomposed_and_reported(tmp_path):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    def qwen2():
        torch.manual_seed(0)
        return Qwen2MoeForCausalLM(Qwen2MoeConfig(
            hidden_size=H, intermediate_size=48, moe_intermediate_size=INTER, shared_expert_intermediate_size=24,
            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_experts=E, num_experts_per_tok=2,
            vocab_size=64)).eval()

    write_fused(qwen2(), tmp_path / "base")
    tuned = qwen2()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        mlp = tuned.model.layers[0].mlp
        mlp.shared_expert.up_proj.weight += low_rank(24, H, gen)
        mlp.experts.down_proj[0] += low_rank(H, INTER, gen)
    write_fused(tuned, tmp_path / "tuned")
    res = extract(tmp_path / "base", tmp_path / "tuned",
                  ExtractOptions(rule=RankRule("rank", 4), expert_rule=RankRule("rank", 2)))
    kinds = {r["name"]: (r["kind"], r["rank"]) for r in res.layers}
    assert kinds == {"model.layers.0.mlp.shared_expert.up_proj": ("linear", 4),
                     "model.layers.0.mlp.experts.0.down_proj": ("expert", 2)}
    ex = res.summary["experts"]
    assert ex["shared_expert_modules"] == ["model.layers.0.mlp.shared_expert.up_proj"]
    assert ex["routers"] == [{"name": "model.layers.0.mlp.gate", "key": "model.layers.0.mlp.gate.weight",
                              "handled": "skipped: unchanged (ΔW = 0)"}]


def test_router_saved_in_full_loads_in_peft(tmp_path):
    """``--router full`` writes the router as PEFT ``modules_to_save``: PEFT loads it (transformers' router is no
    ``nn.Linear``, so a LoRA there would not load) and reproduces the tuned logits."""
    from peft import PeftModel
    from transformers import Qwen3MoeForCausalLM

    write_fused(qwen3_moe(), tmp_path / "base")
    tuned = qwen3_moe()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in tuned.model.layers:
            layer.mlp.gate.weight += 0.2 * torch.randn(E, H, generator=gen)
        tuned.model.layers[1].self_attn.v_proj.weight += low_rank(16, H, gen)
    write_fused(tuned, tmp_path / "tuned")
    res = extract(tmp_path / "base", tmp_path / "tuned", ExtractOptions(rule=RankRule("full")))
    assert set(res.adapter.layers) == {"model.layers.1.self_attn.v_proj"}
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    model = PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    ids = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        got, want = model(ids).logits, tuned(ids).logits
    assert (got - want).abs().max() <= 1e-4
    with model.disable_adapter(), torch.no_grad():
        assert (model(ids).logits - want).abs().max() > 1e-2
    # bake applies the saved router in place of the base's, as PEFT's merge_and_unload does
    bake(tmp_path / "base", [(tmp_path / "lora", 1.0)], tmp_path / "baked")
    merged = model.merge_and_unload().state_dict()
    baked = Checkpoint(tmp_path / "baked")
    for li in range(LAYERS):
        for name in (f"model.layers.{li}.mlp.gate.weight", f"model.layers.{li}.self_attn.v_proj.weight"):
            assert (baked.get(name) - merged[name]).abs().max() <= 1e-6, name


def test_per_expert_energy_rule_padded_so_peft_loads(qwen_dirs, tmp_path):
    """An energy rule gives each expert its own rank; PEFT stacks per-expert LoRAs onto the fused tensors and needs one
    rank per experts module, so extract zero-pads (ΔW unchanged): PEFT loads it and equals bake."""
    from peft import PeftModel
    from transformers import Qwen3MoeForCausalLM

    root, _, noisy = qwen_dirs
    res = extract(root / "base", root / "noisy", ExtractOptions(rule=RankRule("energy", 0.9), router="skip"))
    rows = {r["name"]: r for r in res.layers if r["kind"] == "expert"}
    assert len({r["rank"] for r in rows.values()}) > 1  # the rule chose different ranks per expert
    assert res.summary["experts"]["padded_to_uniform_rank"] > 0
    for name, d in noisy.items():
        d = d.double()
        s = torch.linalg.svdvals(d)
        k = rows[name]["rank"]
        left, right = res.adapter.layers[name].factors(torch.float64)
        stored = float(torch.linalg.norm(d - left @ right.T) / torch.linalg.norm(d))
        assert stored <= float(s[k:].square().sum().sqrt() / s.square().sum().sqrt()) * 1.005 + 1e-7, name
    save_adapter(res.adapter, tmp_path / "lora", "peft")
    bake(root / "base", [(tmp_path / "lora", 1.0)], tmp_path / "baked")
    model = PeftModel.from_pretrained(Qwen3MoeForCausalLM.from_pretrained(root / "base"), tmp_path / "lora").eval()
    ids = torch.arange(24).reshape(2, 12) % 64
    with torch.no_grad():
        got = model(ids).logits
    assert (got - logits(tmp_path / "baked", Qwen3MoeForCausalLM)).abs().max() <= 1e-5


def test_nan_in_one_expert_is_one_line_error(qwen_dirs, tmp_path):
    root, _, _ = qwen_dirs
    sd = load_file(str(root / "tuned" / "model.safetensors"))
    sd["model.layers.1.mlp.experts.down_proj"][2, 5, 3] = float("nan")
    (tmp_path / "tuned").mkdir()
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"))
    (tmp_path / "tuned" / "config.json").write_text((root / "tuned" / "config.json").read_text())
    with pytest.raises(LoraToolsError, match=r"experts\.down_proj: module model\.layers\.1\.mlp\.experts\.2\.down_proj"
                                             r".*non-finite"):
        extract(root / "base", tmp_path / "tuned")
