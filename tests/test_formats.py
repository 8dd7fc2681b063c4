"""Format readers/writers: detection, bit-exact round trips, metadata, name resolution, real PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.adapter import LoraLayer
from loratools.formats import detect_format, load_adapter
from tests.conftest import SAMPLES, sample_llama, tokens


def tensors_of(path):
    return load_file(str(path))


def meta_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_detect_formats(samples):
    assert detect_format(samples / "peft_lora") == "peft"
    assert detect_format(samples / "kohya_lora.safetensors") == "kohya"
    assert detect_format(samples / "locon.safetensors") == "kohya"


def test_peft_reader_scales_and_patterns(samples):
    ad = load_adapter(samples / "peft_lora")
    v = ad.layers["model.layers.0.self_attn.v_proj"]
    q = ad.layers["model.layers.0.self_attn.q_proj"]
    assert (v.rank, v.alpha, v.scale) == (4, 8.0, 2.0)
    assert (q.rank, q.alpha, q.scale) == (8, 16.0, 2.0)
    assert ad.warnings == []


def test_kohya_reader_matches_peft_sample(samples):
    k = load_adapter(samples / "kohya_lora.safetensors", base=samples / "base")
    p = load_adapter(samples / "peft_lora")
    assert set(k.layers) == set(p.layers)
    for name, layer in p.layers.items():
        torch.testing.assert_close(k.layers[name].delta(), layer.delta(), rtol=2e-3, atol=1e-4)


def test_kohya_unresolved_names_without_base(samples):
    ad = load_adapter(samples / "kohya_lora.safetensors")
    assert not ad.resolved
    assert "lora_unet_model_layers_0_self_attn_q_proj" in ad.layers


@pytest.mark.parametrize("src", ["peft_lora", "kohya_lora.safetensors", "locon.safetensors", "peft_dora"])
@pytest.mark.parametrize("via", ["peft", "kohya", "diffusers"])
def test_round_trip_bit_exact(cli, tmp_path, src, via):
    """src → via → src format: weights bit-exact, metadata kept."""
    src_path = SAMPLES / src
    base = SAMPLES / ("unet_base.safetensors" if src == "locon.safetensors" else "base")
    src_fmt = "peft" if src_path.is_dir() else "kohya"
    if "dora" in src and via == "diffusers":
        cli.fails("convert", src_path, "--to", via, "-o", tmp_path / "x.safetensors", match="DoRA")
        assert not (tmp_path / "x.safetensors").exists()
        return
    mid = tmp_path / ("mid" if via == "peft" else "mid.safetensors")
    back = tmp_path / ("back" if src_fmt == "peft" else "back.safetensors")
    cli.ok("convert", src_path, "--to", via, "-o", mid, "--base", base)
    cli.ok("convert", mid, "--to", src_fmt, "-o", back, "--base", base)
    a = load_adapter(src_path, base=base)
    b = load_adapter(back, base=base)
    assert list(a.layers) == list(b.layers) or set(a.layers) == set(b.layers)
    for name, la in a.layers.items():
        lb = b.layers[name]
        assert torch.equal(la.down, lb.down) and torch.equal(la.up, lb.up), name
        assert la.down.dtype == lb.down.dtype
        assert la.scale == lb.scale
        if la.magnitude is not None:
            if via == "peft":
                assert torch.equal(la.magnitude, lb.magnitude)
            else:  # through LyCORIS dora_scale: ‖·‖ vs ‖·‖+eps transform with --base, float rounding only
                torch.testing.assert_close(la.magnitude, lb.magnitude, rtol=1e-6, atol=0)
    if src_fmt == "kohya":
        assert tensors_of(src_path).keys() == tensors_of(back).keys()
        assert all(torch.equal(v, tensors_of(back)[k]) for k, v in tensors_of(src_path).items())
        # every source key kept; an SD LoRA gains the family metadata loaders filter on (ss_base_model_version…)
        added = {k: v for k, v in meta_of(back).items() if k not in meta_of(src_path)}
        assert {k: v for k, v in meta_of(back).items() if k in meta_of(src_path)} == meta_of(src_path)
        assert set(added) <= {"ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture"}
        assert bool(added) == (src == "locon.safetensors")  # the LoCon sample is an SD1.5 UNet LoRA
    else:
        ca = json.loads((src_path / "adapter_config.json").read_text())
        cb = json.loads((back / "adapter_config.json").read_text())
        assert ca == cb


def test_kohya_conv_locon_layers(samples):
    ad = load_adapter(samples / "locon.safetensors", base=samples / "unet_base.safetensors")
    assert ad.family == "sd15"  # SD UNet stems: canonical names carry their pipeline component
    conv = ad.layers["unet.down_blocks.0.resnets.0.conv1"]
    assert conv.is_conv and conv.shape == (32, 32, 3, 3) and conv.rank == 4 and conv.scale == 0.5
    assert ad.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"].shape == (32, 32)


def test_kohya_missing_alpha_means_scale_one(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_a_b.lora_down.weight": torch.randn(4, 8, generator=g),
               "lora_unet_a_b.lora_up.weight": torch.randn(6, 4, generator=g)}, str(tmp_path / "x.safetensors"))
    layer = load_adapter(tmp_path / "x.safetensors").layers["lora_unet_a_b"]
    assert layer.alpha is None and layer.scale == 1.0


def test_kohya_alpha_disagreement_warns(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
               "lora_unet_a.lora_up.weight": torch.randn(6, 4, generator=g), "lora_unet_a.alpha": torch.tensor(4.0)},
              str(tmp_path / "x.safetensors"), metadata={"ss_network_alpha": "1", "ss_network_dim": "4"})
    ad = load_adapter(tmp_path / "x.safetensors")
    assert any("alpha disagrees" in w for w in ad.warnings)


def test_diffusers_keys_all_styles(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    sd = {
        "unet.down_blocks.0.attn.to_q.lora.down.weight": d, "unet.down_blocks.0.attn.to_q.lora.up.weight": u,
        "unet.down_blocks.0.attn.to_k.lora_A.weight": d, "unet.down_blocks.0.attn.to_k.lora_B.weight": u,
        "unet.down_blocks.0.attn.to_k.alpha": torch.tensor(2.0),
        "unet.mid.attn.processor.to_out_lora.down.weight": d, "unet.mid.attn.processor.to_out_lora.up.weight": u,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": d,
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": u,
    }
    save_file({k: v.clone() for k, v in sd.items()}, str(tmp_path / "d.safetensors"))
    ad = load_adapter(tmp_path / "d.safetensors")
    assert ad.format == "diffusers"
    assert set(ad.layers) == {"unet.down_blocks.0.attn.to_q", "unet.down_blocks.0.attn.to_k", "unet.mid.attn.to_out.0",
                              "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}
    assert ad.layers["unet.down_blocks.0.attn.to_k"].scale == 0.5
    assert ad.layers["unet.down_blocks.0.attn.to_q"].scale == 1.0


def test_diffusers_to_kohya_prefixes(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    save_file({"unet.a.to_q.lora_A.weight": d, "unet.a.to_q.lora_B.weight": u,
               "text_encoder_2.b.q_proj.lora_A.weight": d.clone(), "text_encoder_2.b.q_proj.lora_B.weight": u.clone()},
              str(tmp_path / "d.safetensors"))
    cli.ok("convert", tmp_path / "d.safetensors", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    keys = set(tensors_of(tmp_path / "k.safetensors"))
    assert "lora_unet_a_to_q.lora_down.weight" in keys and "lora_te2_b_q_proj.lora_up.weight" in keys


def _peft_folder(folder, modules):
    g = torch.Generator().manual_seed(0)
    folder.mkdir()
    save_file({f"base_model.model.{m}.lora_{ab}.weight": torch.randn(*shape, generator=g)
               for m in modules for ab, shape in (("A", (4, 16)), ("B", (16, 4)))},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                            "target_modules": sorted({m.split(".")[-1] for m in modules})}))
    return folder


@pytest.mark.parametrize("modules,component,diffusers_root,kohya_prefix", [
    (["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_out", "context_embedder"], None,
     "transformer", "lora_unet_"),  # a Flux adapter: diffusers transformer keys; kohya = sd-scripts' BFL
    (["transformer_blocks.0.attn.to_q", "foo_blocks.0.proj_out"], None, "transformer", "lora_transformer_"),  # a DiT
    # adapter no family knows: every layer still goes to the transformer, not unet
    (["text_model.encoder.layers.0.self_attn.q_proj"], None, "text_encoder", "lora_te_"),
    (["down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.proj_out"], None, "unet", "lora_unet_"),
    (["transformer_blocks.0.attn.to_q", "context_embedder"], "text_encoder_2", "text_encoder_2", "lora_te2_"),
])
def test_component_of_component_less_peft_layers(cli, tmp_path, modules, component, diffusers_root, kohya_prefix):
    """PEFT module paths carry no pipeline component: it is guessed once for the whole adapter (or --component),
    for diffusers keys and kohya prefixes alike; the weights travel unchanged."""
    src = _peft_folder(tmp_path / "a", modules)
    extra = ["--component", component] if component else []
    for fmt, want in (("diffusers", diffusers_root + "."), ("kohya", kohya_prefix)):
        out = tmp_path / f"{fmt}.safetensors"
        cli.ok("convert", src, "--to", fmt, "-o", out, *extra)
        keys = list(tensors_of(out))
        assert keys and all(k.startswith(want) for k in keys), keys
        back = load_adapter(out)
        assert len(back.layers) == len(modules)


def test_safetensors_writer_is_reproducible_and_standard(tmp_path):
    """Our writer: the same bytes in every process (the safetensors package orders its header differently each
    run), and a file the reference reader loads to the same tensors, dtypes and metadata."""
    import subprocess
    import sys

    from loratools.formats.common import save_safetensors

    script = (
        "import sys, torch; from pathlib import Path; from loratools.formats.common import save_safetensors\n"
        "g = torch.Generator().manual_seed(0)\n"
        "t = {f'w{i}': torch.randn(3, i + 1, generator=g) for i in range(12)}\n"
        "t.update(h=torch.randn(5, generator=g).half(), b=torch.randn(2, 2, generator=g).bfloat16(), i=torch.arange(3),"
        " e=torch.zeros(0, 4), s=torch.tensor(2.5), m=torch.tensor([True, False]))\n"
        "save_safetensors(t, Path(sys.argv[1]), {f'k{i}': str(i) for i in range(12)})\n"
    )
    outs = []
    for i in range(2):
        out = tmp_path / f"{i}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    loaded = load_file(str(tmp_path / "0.safetensors"))
    assert loaded["h"].dtype == torch.float16 and loaded["b"].dtype == torch.bfloat16 and loaded["i"].dtype == torch.int64
    assert loaded["e"].shape == (0, 4) and loaded["s"].shape == () and float(loaded["s"]) == 2.5
    assert loaded["m"].tolist() == [True, False] and loaded["w11"].shape == (3, 12)
    assert meta_of(tmp_path / "0.safetensors") == {f"k{i}": str(i) for i in range(12)}
    # non-contiguous views and slices of one storage are written as their own values
    base = torch.arange(12.0).reshape(3, 4)
    save_safetensors({"t": base.T, "row": base[1], "col": base[:, 2]}, tmp_path / "v.safetensors", {})
    got = load_file(str(tmp_path / "v.safetensors"))
    assert torch.equal(got["t"], base.T) and torch.equal(got["row"], base[1]) and torch.equal(got["col"], base[:, 2])


def test_component_option_rehomes_kohya_and_diffusers_inputs(cli, tmp_path):
    """--component is every layer's component: a Flux-style kohya file (lora_unet_ over transformer blocks) goes to
    diffusers as transformer.*, to kohya as lora_transformer_*; a two-component adapter is refused, nothing written."""
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    save_file({"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": d,
               "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": u}, str(tmp_path / "k.safetensors"))
    cli.ok("convert", tmp_path / "k.safetensors", "--to", "kohya", "-o", tmp_path / "k2.safetensors",
           "--component", "transformer")
    assert list(tensors_of(tmp_path / "k2.safetensors")) == [
        "lora_transformer_transformer_blocks_0_attn_to_q.lora_down.weight",
        "lora_transformer_transformer_blocks_0_attn_to_q.lora_up.weight"]
    save_file({"unet.a.to_q.lora_A.weight": d, "unet.a.to_q.lora_B.weight": u}, str(tmp_path / "d.safetensors"))
    cli.ok("convert", tmp_path / "d.safetensors", "--to", "diffusers", "-o", tmp_path / "d2.safetensors",
           "--component", "transformer")
    assert sorted(tensors_of(tmp_path / "d2.safetensors")) == ["transformer.a.to_q.lora_A.weight",
                                                             "transformer.a.to_q.lora_B.weight"]
    save_file({"unet.a.to_q.lora_A.weight": d, "unet.a.to_q.lora_B.weight": u,
               "text_encoder.b.q_proj.lora_A.weight": d.clone(), "text_encoder.b.q_proj.lora_B.weight": u.clone()},
              str(tmp_path / "two.safetensors"))
    cli.fails("convert", tmp_path / "two.safetensors", "--to", "diffusers", "-o", tmp_path / "x.safetensors",
              "--component", "transformer", match="text_encoder, unet")
    assert not (tmp_path / "x.safetensors").exists()


def test_rslora_and_embedding_peft_read(tmp_path):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import tiny_llama

    model = tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "embed_tokens"],
                                          init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "a"))
    ad = load_adapter(tmp_path / "a")
    emb = ad.layers["model.embed_tokens"]
    assert emb.embedding and emb.shape == (96, 32) and emb.scale == pytest.approx(8 / 2)
    peft_emb = pm.base_model.model.model.embed_tokens
    ref = (peft_emb.lora_embedding_B["default"] @ peft_emb.lora_embedding_A["default"]).T * peft_emb.scaling["default"]
    torch.testing.assert_close(emb.delta(), ref.detach())
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(ad.layers["model.layers.0.self_attn.q_proj"].delta(), q.get_delta_weight("default").detach())
    assert any("base_layer" in k for k in ad.extra_tensors)


@pytest.mark.parametrize("src", ["peft_lora", "kohya_lora.safetensors", "peft_dora"])
def test_converted_peft_loads_in_peft_with_same_outputs(cli, tmp_path, src):
    """Convert to PEFT and load with PeftModel.from_pretrained: logits equal the source's delta applied."""
    from peft import PeftModel

    out = tmp_path / "peft"
    cli.ok("convert", SAMPLES / src, "--to", "peft", "-o", out, "--base", SAMPLES / "base")
    x = tokens(vocab=256)
    model = PeftModel.from_pretrained(sample_llama(), str(out))
    model.eval()
    with torch.no_grad():
        got = model(x).logits
        # reference: the real library on the original (for peft) or the source's deltas applied by hand
        if (SAMPLES / src).is_dir():
            ref = PeftModel.from_pretrained(sample_llama(), str(SAMPLES / src)).eval()(x).logits
        else:
            base = sample_llama()
            ad = load_adapter(SAMPLES / src, base=SAMPLES / "base")
            sd = base.state_dict()
            for name, layer in ad.layers.items():
                sd[name + ".weight"] += layer.delta()
            base.load_state_dict(sd)
            ref = base(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dtype_option(cli, tmp_path, samples):
    cli.ok("convert", samples / "peft_lora", "--to", "kohya", "-o", tmp_path / "k.safetensors", "--dtype", "bf16")
    t = tensors_of(tmp_path / "k.safetensors")
    assert all(v.dtype == torch.bfloat16 for k, v in t.items() if not k.endswith(".alpha"))
    assert all(v.dtype == torch.float32 for k, v in t.items() if k.endswith(".alpha"))  # scale never rounded


def test_loralayer_shape_checks():
    from loratools.errors import LoraToolsError

    with pytest.raises(LoraToolsError, match="rank mismatch"):
        LoraLayer(down=torch.zeros(4, 8), up=torch.zeros(6, 3))
    with pytest.raises(LoraToolsError, match="conv/linear"):
        LoraLayer(down=torch.zeros(4, 8, 3, 3), up=torch.zeros(6, 4))


def test_peft_made_adapter_survives_kohya_and_diffusers_round_trip(cli, tmp_path):
    """A real PEFT adapter (rsLoRA, rank/alpha patterns, embedding) → kohya → diffusers → PEFT gives the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from tests.conftest import tiny_llama

    tiny_llama(seed=3).save_pretrained(str(tmp_path / "base"))
    model = tiny_llama(seed=3)
    cfg = LoraConfig(r=6, lora_alpha=12, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                     rank_pattern={"v_proj": 3}, alpha_pattern={"down_proj": 5}, init_lora_weights=False)
    pm = get_peft_model(model, cfg).eval()
    pm.save_pretrained(str(tmp_path / "src"))
    x = tokens()
    with torch.no_grad():
        ref = pm(x).logits
    base = tmp_path / "base"
    cli.ok("convert", tmp_path / "src", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    cli.ok("convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d.safetensors", "--base", base)
    cli.ok("convert", tmp_path / "d.safetensors", "--to", "peft", "-o", tmp_path / "back", "--base", base)
    from tests.conftest import tiny_llama as fresh

    back = load_adapter(tmp_path / "back")
    assert back.layers["model.embed_tokens"].embedding  # remembered through kohya and diffusers metadata
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. PEFT's "Found missing adapter keys" must not happen
        loaded = PeftModel.from_pretrained(fresh(seed=3), str(tmp_path / "back")).eval()
    with torch.no_grad():
        got = loaded(x).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_peft_bin_weights_are_read_safely(tmp_path, samples):
    import shutil

    shutil.copy(samples / "peft_lora" / "adapter_config.json", tmp_path)
    torch.save(tensors_of(samples / "peft_lora" / "adapter_model.safetensors"), str(tmp_path / "adapter_model.bin"))
    a, b = load_adapter(tmp_path), load_adapter(samples / "peft_lora")
    assert set(a.layers) == set(b.layers)
    assert all(torch.equal(a.layers[n].up, b.layers[n].up) for n in a.layers)
