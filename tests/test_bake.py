"""bake: base + Σ wᵢΔWᵢ vs PEFT merge_and_unload (plain LoRA and DoRA), layouts, dtypes, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from loratools.bake import bake
from loratools.checkpoint import Checkpoint
from loratools.formats import load_adapter
from tests.conftest import sample_llama, tiny_llama, tokens


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A sharded tiny Llama folder (+ tokenizer/generation files) and a random PEFT adapter for it."""
    from peft import LoraConfig, get_peft_model

    tmp = tmp_path_factory.mktemp("bake")
    base = tiny_llama(0)
    base.save_pretrained(str(tmp / "base"), max_shard_size="40KB")
    (tmp / "base" / "tokenizer.json").write_text('{"fake": true}\n')
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "down_proj", "embed_tokens"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(str(tmp / "adapter"), save_embedding_layers=False)
    with torch.no_grad():
        expected = model.merge_and_unload()(tokens(96)).logits
    return tmp, expected


def test_bake_sharded_matches_peft_merge_and_unload(sharded, cli):
    from transformers import LlamaForCausalLM

    tmp, expected = sharded
    assert (tmp / "base" / "model.safetensors.index.json").is_file()
    out = tmp / "out"
    res = cli.ok("bake", "--base", tmp / "base", tmp / "adapter", "-o", out, "--json")
    doc = json.loads(res.stdout)
    assert doc["files"] > 1 and doc["modified"] == 2 * 3 + 1
    src = {p.name for p in (tmp / "base").iterdir()}
    assert {p.name for p in out.iterdir()} == src  # same shards, index, config, tokenizer, generation config
    idx_in = json.loads((tmp / "base" / "model.safetensors.index.json").read_text())
    idx_out = json.loads((out / "model.safetensors.index.json").read_text())
    assert idx_out["weight_map"] == idx_in["weight_map"]
    assert (out / "tokenizer.json").read_text() == '{"fake": true}\n'
    with torch.no_grad():
        got = LlamaForCausalLM.from_pretrained(str(out)).eval()(tokens(96)).logits
    assert torch.allclose(got, expected, atol=1e-5)
    # untouched tensors are bit-exact copies
    a, b = Checkpoint(tmp / "base"), Checkpoint(out)
    assert torch.equal(a.get("model.norm.weight"), b.get("model.norm.weight"))
    assert torch.equal(a.get("model.layers.0.self_attn.k_proj.weight"), b.get("model.layers.0.self_attn.k_proj.weight"))


def test_bake_dora_matches_peft(samples, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    out = tmp_path / "dora"
    bake(samples / "base", [(samples / "peft_dora", 1.0)], out)
    x = tokens(256)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(sample_llama(), str(samples / "peft_dora")).merge_and_unload()(x).logits
        got = LlamaForCausalLM.from_pretrained(str(out)).eval()(x).logits
        plain = sample_llama()(x).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_bake_weighted_kohya_and_peft(samples, tmp_path):
    out = tmp_path / "w"
    doc = bake(samples / "base", [(samples / "peft_lora", 0.5), (samples / "kohya_lora.safetensors", -0.25)], out)
    assert doc["layers"] == 28
    base, new = Checkpoint(samples / "base"), Checkpoint(out)
    peft, kohya = load_adapter(samples / "peft_lora"), load_adapter(samples / "kohya_lora.safetensors", base=base)
    for name, layer in peft.layers.items():
        key = name + ".weight"
        expect = base.get(key).double() + 0.5 * layer.delta(torch.float64) - 0.25 * kohya.layers[name].delta(torch.float64)
        assert torch.allclose(new.get(key).double(), expect, atol=1e-6)


def test_bake_keeps_or_changes_dtype(samples, tmp_path, cli):
    half = tmp_path / "half"
    tiny = sample_llama().half()
    tiny.save_pretrained(str(half))
    cli.ok("bake", "--base", half, samples / "peft_lora", "-o", tmp_path / "o16")
    c = Checkpoint(tmp_path / "o16")
    assert all(c.dtype(k) == torch.float16 for k in c.keys())
    cli.ok("bake", "--base", samples / "base", samples / "peft_lora", "-o", tmp_path / "obf", "--dtype", "bf16")
    c = Checkpoint(tmp_path / "obf")
    assert all(c.dtype(k) == torch.bfloat16 for k in c.keys())
    cfg = json.loads((tmp_path / "obf" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_bake_single_file_conv(samples, tmp_path, cli):
    out = tmp_path / "unet.safetensors"
    cli.ok("bake", "--base", samples / "unet_base.safetensors", f"{samples / 'locon.safetensors'}:0.8", "-o", out)
    base, new = Checkpoint(samples / "unet_base.safetensors"), Checkpoint(out)
    ad = load_adapter(samples / "locon.safetensors", base=base)
    assert set(new.keys()) == set(base.keys())
    for name, layer in ad.layers.items():
        key = base.module_ref(name).key  # canonical unet.<path> → the file's <path>.weight
        expect = base.get(key).double() + 0.8 * layer.delta(torch.float64)
        assert torch.allclose(new.get(key).double(), expect, atol=1e-6)
    with safe_open(str(out), "pt") as f, safe_open(str(samples / "unet_base.safetensors"), "pt") as g:
        assert f.metadata() == g.metadata()


def test_bake_bad_inputs(samples, tmp_path, cli):
    out = tmp_path / "o"
    cli.fails("bake", "--base", samples / "base", samples / "locon.safetensors", "-o", out,
              match="none of its 10 layer(s) matches a module of the base")
    cli.fails("bake", "--base", samples / "base", f"{samples / 'peft_lora'}:x", "-o", out, match="not a number")
    cli.fails("bake", "--base", samples / "unet_base.safetensors", samples / "peft_lora", "-o", out,
              match="(a sd15 checkpoint, diffusers layout)")
    cli.fails("bake", "--base", samples / "nope", samples / "peft_lora", "-o", out, match="no such file")
    assert not out.exists()
    # shape conflict: the tiny_llama model has other shapes than samples/base
    tiny = tmp_path / "tiny"
    tiny_llama(0).save_pretrained(str(tiny))
    cli.fails("bake", "--base", tiny, samples / "peft_lora", "-o", out, match="shape")
    out.mkdir()
    cli.fails("bake", "--base", samples / "base", samples / "peft_lora", "-o", out, match="already exists")
    assert not any(out.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "tiny"]


def test_folder_base_refuses_a_weight_file_name_for_its_output_folder(samples, tmp_path, cli):
    out = tmp_path / "baked.safetensors"
    cli.fails("bake", "--base", samples / "base", samples / "peft_lora", "-o", out, match="bakes into a folder")
    assert not out.exists()
