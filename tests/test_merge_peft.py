"""merge vs real PEFT ``add_weighted_adapter`` on a tiny Llama: every method, deltas and model outputs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from loratools.formats import load_adapter
from loratools.merge import METHODS, merge_adapters
from tests.conftest import tiny_llama, tokens

WEIGHTS = [0.7, -0.4]
SEED = 1234


def _find(folder: Path, name: str) -> Path:
    return next(p.parent for p in folder.rglob("adapter_config.json") if p.parent.name == name)


def build_peft(rslora: bool = False):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, use_rslora=rslora,
                                                     target_modules=["q_proj", "v_proj", "embed_tokens"]),
                           adapter_name="one")
    # "two" has another alpha and targets o_proj instead of v_proj: union of modules, missing = zero
    model.add_adapter("two", LoraConfig(r=4, lora_alpha=16, use_rslora=rslora,
                                      target_modules=["q_proj", "o_proj", "embed_tokens"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_deltas(model, adapter: str) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return {n: m.get_delta_weight(adapter).detach().clone() for n, m in model.base_model.model.named_modules()
            if isinstance(m, PeftLoraLayer) and (adapter in m.lora_A or adapter in m.lora_embedding_A)}


def module_order(model) -> list[str]:
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    return [n for n, m in model.base_model.model.named_modules() if isinstance(m, PeftLoraLayer)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("peft")
    model = build_peft()
    model.save_pretrained(str(tmp / "saved"), selected_adapters=["one", "two"], save_embedding_layers=False)
    return model, _find(tmp, "one"), _find(tmp, "two")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-30))


def run_peft(model, method: str, name: str, svd_rank: int | None = None):
    kw = {} if method in ("cat", "linear", "svd") else {"density": 0.5}
    torch.manual_seed(SEED)
    model.add_weighted_adapter(["one", "two"], WEIGHTS, name, combination_type=method, svd_rank=svd_rank, **kw)
    return peft_deltas(model, name), kw


@pytest.mark.parametrize("method", METHODS)
def test_every_method_matches_peft(setup, method):
    model, dir_a, dir_b = setup
    svd_rank = 6 if method.endswith("svd") else None
    ref, kw = run_peft(model, method, f"m_{method}", svd_rank)
    inputs = [(load_adapter(dir_a), WEIGHTS[0]), (load_adapter(dir_b), WEIGHTS[1])]
    merged, report = merge_adapters(inputs, method=method, rank=svd_rank, seed=SEED, module_order=module_order(model),
                                    **kw)
    assert set(merged.layers) == set(ref)
    exact = {n: sum(w * ad.layers[n].delta() for ad, w in inputs if n in ad.layers) for n in ref}
    for name, delta in ref.items():
        got = merged.layers[name].delta()
        assert got.shape == delta.shape
        # deterministic methods to 1e-5; DARE too, since PEFT's random draws are replayed exactly
        assert rel(got, delta) < 1e-5, (name, rel(got, delta))
    errs = {r.name: r.relative_error for r in report.layers}
    for name in ref:  # the reported error is the true error against Σ wᵢ ΔWᵢ
        assert errs[name] == pytest.approx(rel(merged.layers[name].delta(), exact[name]), rel=1e-3, abs=1e-6)
    if method == "cat":
        assert report.exact and max(errs.values()) < 1e-6
    if method == "linear":  # the cross terms make PEFT's linear an approximation
        shared = [n for n in ref if all(n in ad.layers for ad, _ in inputs)]
        assert not report.exact and min(errs[n] for n in shared) > 0.1
        assert max(errs[n] for n in ref if n not in shared) < 1e-6  # one input: exact


def test_svd_full_rank_is_exact_and_model_outputs_match(setup, tmp_path, cli):
    from peft import PeftModel

    model, dir_a, dir_b = setup
    ref, _ = run_peft(model, "svd", "m_full", svd_rank=8)
    out = tmp_path / "svd"
    res = cli.ok("merge", f"{dir_a}:{WEIGHTS[0]}", f"{dir_b}:{WEIGHTS[1]}", "-o", out, "--method", "svd",
                 "--rank", "8", "--json")
    doc = json.loads(res.stdout)
    assert doc["exact"] and doc["totals"]["relative_error"] < 1e-5
    merged = load_adapter(out)
    for name, delta in ref.items():
        assert rel(merged.layers[name].delta(), delta) < 1e-5
    model.set_adapter("m_full")
    x = tokens(96)
    with torch.no_grad():
        expected = model(x).logits
        ours = PeftModel.from_pretrained(tiny_llama(0), str(out)).eval()(x).logits
    assert torch.allclose(ours, expected, atol=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "magnitude_prune_svd"])
def test_cli_model_outputs_match_peft(setup, tmp_path, cli, method):
    from peft import PeftModel

    model, dir_a, dir_b = setup
    rank = ["--rank", "4"] if method.endswith("svd") else []
    run_peft(model, method, f"cli_{method}", svd_rank=4 if rank else None)
    out = tmp_path / method
    cli.ok("merge", f"{dir_a}:{WEIGHTS[0]}", f"{dir_b}:{WEIGHTS[1]}", "-o", out, "--method", method,
           "--density", "0.5", "--seed", str(SEED), *rank)
    model.set_adapter(f"cli_{method}")
    x = tokens(96)
    with torch.no_grad():
        expected = model(x).logits
        ours = PeftModel.from_pretrained(tiny_llama(0), str(out)).eval()(x).logits
    if method.startswith("dare"):
        # the CLI processes modules in file order, PEFT in named_modules order: other masks, same law
        assert torch.isfinite(ours).all() and not torch.allclose(ours, tiny_llama(0)(x).logits)
    else:
        assert torch.allclose(ours, expected, atol=1e-5)


def test_rslora_scaling_quirk_not_reproduced(tmp_path):
    """PEFT's merged adapter inherits use_rslora and is √r too large; ours is the intended Σ wᵢ ΔWᵢ."""
    model = build_peft(rslora=True)
    model.save_pretrained(str(tmp_path / "s"), selected_adapters=["one", "two"], save_embedding_layers=False)
    ref, _ = run_peft(model, "svd", "m", svd_rank=8)
    inputs = [(load_adapter(_find(tmp_path, "one")), WEIGHTS[0]), (load_adapter(_find(tmp_path, "two")), WEIGHTS[1])]
    merged, _ = merge_adapters(inputs, method="svd", rank=8)
    for name, delta in ref.items():
        exact = sum(w * ad.layers[name].delta() for ad, w in inputs if name in ad.layers)
        assert rel(merged.layers[name].delta(), exact) < 1e-5
        assert rel(delta, math.sqrt(8) * exact) < 1e-5  # PEFT's quirk, measured


def test_dare_cli_is_seeded_and_keeps_density(setup, tmp_path, cli):
    _, dir_a, dir_b = setup
    outs = []
    for i, seed in enumerate([3, 3, 4]):
        out = tmp_path / f"d{i}"
        cli.ok("merge", f"{dir_a}:1", f"{dir_b}:1", "-o", out, "--method", "dare_linear", "--density", "0.3",
               "--seed", str(seed))
        outs.append(load_adapter(out))
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(outs[0].layers[name].down, outs[1].layers[name].down)
    assert not torch.equal(outs[0].layers[name].down, outs[2].layers[name].down)
    # a module only in `one`: the merged A is one's A pruned to Bernoulli(0.3) and rescaled by 1/0.3 (× √(w·s))
    only_a = "model.layers.0.self_attn.v_proj"
    src = load_adapter(dir_a).layers[only_a]
    got = outs[0].layers[only_a].down
    kept = got != 0
    frac = float(kept.float().mean())
    n = got.numel()
    assert abs(frac - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    assert torch.allclose(got[kept], (src.down * math.sqrt(src.scale) / 0.3)[kept], rtol=1e-6)


def test_dare_replay_needs_injection(setup):
    """Without replaying PEFT's injection draws the masks differ (the replay is what makes DARE exact)."""
    model, dir_a, dir_b = setup
    ref, kw = run_peft(copy.deepcopy(model), "dare_ties", "m_rng")
    inputs = [(load_adapter(dir_a), WEIGHTS[0]), (load_adapter(dir_b), WEIGHTS[1])]
    merged, _ = merge_adapters(inputs, method="dare_ties", seed=SEED, module_order=module_order(model),
                               peft_rng=False, **kw)
    assert any(rel(merged.layers[n].delta(), d) > 1e-3 for n, d in ref.items())
