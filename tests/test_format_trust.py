"""Trust in the formats: alpha 0, modules_to_save carried through single files, non-float and rank-0 factors,
output suffixes, badly typed adapter configs and shard indexes — one-line errors with exit 1, never a silent change."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratools.adapter import LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats import load_adapter, save_adapter
from tests.conftest import SAMPLES, sample_llama, tiny_llama, tokens

KOHYA = SAMPLES / "kohya_lora.safetensors"


def save(path, tensors, metadata=None):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def meta_of(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def fails1(cli, *args, match=""):
    res = cli.fails(*args, match=match)
    assert res.exit_code == 1, res.output
    return res


def nothing_written(tmp_path, *keep):
    return sorted(p.name for p in tmp_path.iterdir() if p.name not in keep) == []


# ----------------------------------------------------------------------------------------- 1. alpha = 0


def alpha_zero_kohya(tmp_path):
    t = load_file(str(KOHYA))
    t = {k: (torch.zeros_like(v) if k.endswith(".alpha") else v) for k, v in t.items()}
    return save(tmp_path / "a0.safetensors", t)


def test_kohya_alpha_zero_means_alpha_equals_rank(cli, tmp_path):
    f = alpha_zero_kohya(tmp_path)
    ad = load_adapter(f)
    raw = load_file(str(f))
    stem = "lora_unet_model_layers_0_self_attn_q_proj"
    layer = ad.layers[stem]
    assert layer.scale == 1.0
    expect = raw[stem + ".lora_up.weight"].float() @ raw[stem + ".lora_down.weight"].float()
    torch.testing.assert_close(layer.delta(), expect)
    assert any("alpha = 0" in w and "ComfyUI" in w for w in ad.warnings)
    doc = json.loads(cli.ok("inspect", f, "--json").stdout)
    assert all(la["fro_norm"] > 0 and la["scale"] == 1.0 for la in doc["layers"])
    # convert writes the alpha that reproduces alpha = rank, never lora_alpha 0
    cli.ok("convert", f, "--to", "peft", "--base", SAMPLES / "base", "-o", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and all(v == 4 for v in cfg["alpha_pattern"].values())
    back = load_adapter(tmp_path / "p")
    torch.testing.assert_close(back.layers["model.layers.0.self_attn.q_proj"].delta(), expect)


def test_kohya_alpha_zero_bakes_the_delta(cli, tmp_path):
    f = alpha_zero_kohya(tmp_path)
    doc = json.loads(cli.ok("bake", f, "--base", SAMPLES / "base", "-o", tmp_path / "baked", "--json").stdout)
    assert doc["modified"] == 14
    base = load_file(str(SAMPLES / "base" / "model.safetensors"))
    baked = load_file(str(tmp_path / "baked" / "model.safetensors"))
    raw = load_file(str(f))
    k = "model.layers.1.mlp.up_proj.weight"
    stem = "lora_unet_model_layers_1_mlp_up_proj"
    delta = raw[stem + ".lora_up.weight"].float() @ raw[stem + ".lora_down.weight"].float()
    torch.testing.assert_close(baked[k].float() - base[k].float(), delta, atol=2e-3, rtol=1e-2)


def test_alpha_zero_agrees_with_lycoris_package(tmp_path):
    """LyCORIS's own module turns alpha 0 into alpha = lora_dim (scale 1), as sd-scripts does."""
    from lycoris.modules.locon import LoConModule

    module = LoConModule("lora_unet_x", torch.nn.Linear(8, 6), multiplier=1.0, lora_dim=4, alpha=0)
    assert float(module.scale) == 1.0
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    loha = {"hada_w1_a": torch.randn(6, 2, generator=g), "hada_w1_b": torch.randn(2, 8, generator=g),
            "hada_w2_a": torch.randn(6, 2, generator=g), "hada_w2_b": torch.randn(2, 8, generator=g)}
    f = save(tmp_path / "ly.safetensors", {
        "lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up, "lora_unet_a.alpha": torch.tensor(0.0),
        **{f"lora_unet_b.{k}": v for k, v in loha.items()}, "lora_unet_b.alpha": torch.tensor(0.0),
    })
    ad = load_adapter(f)
    torch.testing.assert_close(ad.layers["lora_unet_a"].delta(), up @ down)
    w = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    torch.testing.assert_close(ad.layers["lora_unet_b"].delta(), w)


def test_diffusers_alpha_zero_and_negative_alpha(tmp_path):
    g = torch.Generator().manual_seed(1)
    down, up = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    f = save(tmp_path / "d.safetensors", {
        "unet.a.lora_A.weight": down, "unet.a.lora_B.weight": up, "unet.a.alpha": torch.tensor(0.0),
        "unet.b.lora_A.weight": down.clone(), "unet.b.lora_B.weight": up.clone(), "unet.b.alpha": torch.tensor(-2.0),
    })
    ad = load_adapter(f)
    torch.testing.assert_close(ad.layers["a"].delta(), up @ down)
    torch.testing.assert_close(ad.layers["b"].delta(), -0.5 * up @ down)  # a negative alpha is a sign flip, kept


def test_peft_lora_alpha_zero_keeps_peft_semantics(tmp_path):
    shutil.copytree(SAMPLES / "peft_lora", tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg.update(lora_alpha=0, alpha_pattern={})
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    ad = load_adapter(tmp_path / "p")
    assert ad.layers["model.layers.0.self_attn.q_proj"].scale == 0.0  # PEFT: lora_alpha / r as it is


# ----------------------------------------------------------------------------------------- 2. modules_to_save


def peft_with_modules_to_save(tmp_path):
    """samples/peft_lora plus a saved lm_head (PEFT's saved key: base_model.model.lm_head.weight)."""
    d = tmp_path / "mts"
    shutil.copytree(SAMPLES / "peft_lora", d)
    t = load_file(str(d / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(3)
    base = load_file(str(SAMPLES / "base" / "model.safetensors"))
    head = base["lm_head.weight"]
    t["base_model.model.lm_head.weight"] = (head + 0.1 * torch.randn(head.shape, generator=g)).to(head.dtype)
    save(d / "adapter_model.safetensors", t, {"format": "pt"})
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["lm_head"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d, t["base_model.model.lm_head.weight"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_modules_to_save_round_trip_through_single_files(cli, tmp_path, fmt):
    src, head = peft_with_modules_to_save(tmp_path)
    single = tmp_path / f"x.{fmt}.safetensors"
    res = cli.ok("convert", src, "--to", fmt, "-o", single)
    assert "modules_to_save" in res.stderr + res.stdout and "ignore them" in res.stderr + res.stdout
    assert torch.equal(load_file(str(single))["base_model.model.lm_head.weight"], head)
    assert json.loads(cli.ok("inspect", single, "--json").stdout)["summary"]["extra_tensors"] == [
        "base_model.model.lm_head.weight"]
    cli.ok("convert", single, "--to", "peft", "--base", SAMPLES / "base", "-o", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    orig = load_file(str(src / "adapter_model.safetensors"))
    assert set(back) == set(orig)
    assert all(torch.equal(back[k], orig[k]) for k in orig)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]


def test_modules_to_save_survive_resize_to_kohya_and_load_in_peft(cli, tmp_path):
    from peft import PeftModel

    src, head = peft_with_modules_to_save(tmp_path)
    k = tmp_path / "r.safetensors"
    res = cli.ok("resize", src, "--to", "kohya", "--rank", "2", "-o", k)
    assert "modules_to_save" in res.stderr
    cli.ok("convert", k, "--to", "peft", "--base", SAMPLES / "base", "-o", tmp_path / "p")
    model = PeftModel.from_pretrained(sample_llama(), str(tmp_path / "p"))
    saved = dict(model.named_parameters())["base_model.model.lm_head.modules_to_save.default.weight"]
    assert torch.equal(saved.detach(), head)
    with torch.no_grad():
        model(tokens())


def test_full_tensors_without_a_stored_peft_config_become_modules_to_save(cli, tmp_path):
    src, head = peft_with_modules_to_save(tmp_path)
    k = tmp_path / "k.safetensors"
    cli.ok("convert", src, "--to", "kohya", "-o", k)
    meta = meta_of(k)
    assert json.loads(meta["loratools.modules_to_save"]) == ["base_model.model.lm_head.weight"]
    del meta["loratools.peft_config"]  # as if written by another tool that knows only the listed keys
    save(k, load_file(str(k)), meta)
    cli.ok("convert", k, "--to", "peft", "--base", SAMPLES / "base", "-o", tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    assert torch.equal(load_file(str(tmp_path / "p" / "adapter_model.safetensors"))["base_model.model.lm_head.weight"],
                       head)


def test_unlisted_peft_key_in_kohya_file_is_still_a_mixed_layout(cli, tmp_path):
    t = load_file(str(KOHYA))
    t["base_model.model.lm_head.weight"] = torch.zeros(4, 4)
    fails1(cli, "inspect", save(tmp_path / "m.safetensors", t), match="mixed key conventions")


# ----------------------------------------------------------------------------------------- 3. non-float factors


def _int_cases(tmp_path):
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g)
    yield "kohya", save(tmp_path / "k.safetensors", {
        "lora_unet_a.lora_down.weight": down.to(torch.int64), "lora_unet_a.lora_up.weight": up}), "lora_down.weight"
    yield "kohya-bool", save(tmp_path / "kb.safetensors", {
        "lora_unet_a.lora_down.weight": down, "lora_unet_a.lora_up.weight": up > 0}), "lora_up.weight"
    yield "diffusers", save(tmp_path / "d.safetensors", {
        "unet.a.lora_A.weight": down, "unet.a.lora_B.weight": up.to(torch.int32)}), "lora up"
    yield "lycoris", save(tmp_path / "l.safetensors", {
        "lora_unet_a.hada_w1_a": up.to(torch.int16), "lora_unet_a.hada_w1_b": down,
        "lora_unet_a.hada_w2_a": up, "lora_unet_a.hada_w2_b": down}), "hada_w1_a"
    d = tmp_path / "peft"
    shutil.copytree(SAMPLES / "peft_lora", d)
    t = load_file(str(d / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    t[key] = t[key].to(torch.int64)
    save(d / "adapter_model.safetensors", t)
    yield "peft", d, "lora_B.weight"


def test_non_float_factors_are_refused(cli, tmp_path):
    for kind, path, key in _int_cases(tmp_path):
        res = fails1(cli, "inspect", path, match=key)
        err = res.stderr
        assert path.name in err and ("int" in err or "bool" in err) and "floating point" in err, (kind, err)
        fails1(cli, "convert", path, "--to", "kohya", "-o", tmp_path / f"out_{kind}.safetensors", match="floating point")
        assert not (tmp_path / f"out_{kind}.safetensors").exists()


def test_integer_alpha_is_fine(tmp_path):
    t = load_file(str(KOHYA))
    t = {k: (v.to(torch.int64) if k.endswith(".alpha") else v) for k, v in t.items()}
    ad = load_adapter(save(tmp_path / "ia.safetensors", t))
    assert ad.layers["lora_unet_model_layers_0_self_attn_q_proj"].scale == 2.0


# ----------------------------------------------------------------------------------------- 4. rank 0


def test_rank_zero_factor_in_a_file_is_a_clear_error(cli, tmp_path):
    t = load_file(str(KOHYA))
    t["lora_unet_extra.lora_down.weight"] = torch.zeros(0, 8, dtype=torch.float16)
    t["lora_unet_extra.lora_up.weight"] = torch.zeros(6, 0, dtype=torch.float16)
    f = save(tmp_path / "r0.safetensors", t)
    res = fails1(cli, "inspect", f, match="has rank 0")
    assert "r0.safetensors" in res.stderr and "lora_unet_extra" in res.stderr


def two_layer_kohya(tmp_path, small=1e-6):
    g = torch.Generator().manual_seed(0)
    return save(tmp_path / "two.safetensors", {
        "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(6, 4, generator=g),
        "lora_unet_b.lora_down.weight": small * torch.randn(4, 8, generator=g),
        "lora_unet_b.lora_up.weight": torch.randn(6, 4, generator=g),
    })


def test_convert_rule_keeping_nothing_drops_the_layer_and_says_so(cli, tmp_path):
    f = two_layer_kohya(tmp_path)
    out = tmp_path / "c.safetensors"
    res = cli.ok("convert", f, "--to", "kohya", "--threshold", "1e-3", "-o", out)
    assert "rank 0" in res.stderr and "lora_unet_b" in res.stderr and "dropped" in res.stderr
    ad = load_adapter(out)
    assert sorted(ad.layers) == ["lora_unet_a"]
    fails1(cli, "convert", f, "--to", "kohya", "--threshold", "1e9", "-o", tmp_path / "none.safetensors",
           match="rank 0")
    assert not (tmp_path / "none.safetensors").exists()


def test_zero_layer_is_dropped_by_exact_convert(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    z = torch.zeros(2, 8)
    f = save(tmp_path / "z.safetensors", {
        "lora_unet_a.lora_down.weight": torch.randn(4, 8, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(6, 4, generator=g),
        "lora_unet_b.hada_w1_a": torch.randn(6, 2, generator=g), "lora_unet_b.hada_w1_b": z,
        "lora_unet_b.hada_w2_a": torch.randn(6, 2, generator=g), "lora_unet_b.hada_w2_b": z,
    })
    res = cli.ok("convert", f, "--to", "kohya", "-o", tmp_path / "o.safetensors")
    assert "lora_unet_b" in res.stderr and "dropped" in res.stderr
    assert sorted(load_adapter(tmp_path / "o.safetensors").layers) == ["lora_unet_a"]


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "peft"])
def test_writers_drop_rank_zero_layers(tmp_path, fmt):
    ad = load_adapter(SAMPLES / "peft_lora")
    ad.layers["model.empty"] = LoraLayer(down=torch.zeros(0, 8), up=torch.zeros(6, 0))
    out = tmp_path / ("o" if fmt == "peft" else "o.safetensors")
    save_adapter(ad, out, fmt)
    assert any("rank 0" in w and "model.empty" in w for w in ad.warnings)
    assert len(load_adapter(out).layers) == 14
    ad.layers = {"model.empty": LoraLayer(down=torch.zeros(0, 8), up=torch.zeros(6, 0))}
    with pytest.raises(LoraToolsError, match="rank 0"):
        save_adapter(ad, tmp_path / "none.safetensors", "kohya")
    assert not (tmp_path / "none.safetensors").exists()


# ----------------------------------------------------------------------------------------- 5. output suffix


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_single_file_output_must_be_safetensors(cli, tmp_path, suffix):
    out = tmp_path / f"o{suffix}"
    fails1(cli, "convert", SAMPLES / "peft_lora", "--to", "kohya", "-o", out, match=".safetensors")
    fails1(cli, "convert", SAMPLES / "peft_lora", "--to", "diffusers", "-o", out, match=".safetensors")
    fails1(cli, "resize", KOHYA, "--rank", "2", "-o", out, match=".safetensors")
    fails1(cli, "merge", KOHYA, KOHYA, "-o", out, match=".safetensors")
    fails1(cli, "extract", "--base", SAMPLES / "base", "--tuned", SAMPLES / "tuned", "--format", "kohya", "-o", out,
           match=".safetensors")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_with_a_bin_name_is_read_by_content(cli, tmp_path):
    f = tmp_path / "renamed.bin"
    f.write_bytes(KOHYA.read_bytes())
    doc = json.loads(cli.ok("inspect", f, "--json").stdout)
    assert doc["format"] == "kohya" and len(doc["layers"]) == 14
    torch.save(load_file(str(KOHYA)), str(tmp_path / "real.bin"))  # a real pickle still goes through torch.load
    assert len(load_adapter(tmp_path / "real.bin").layers) == 14


# ----------------------------------------------------------------------------------------- 6. config, shard index


BAD_FIELDS = [
    ("r", "eight"), ("r", 0), ("r", True), ("r", 2.5), ("lora_alpha", [1]), ("lora_alpha", "16"),
    ("lora_alpha", None), ("rank_pattern", 5), ("rank_pattern", {"q_proj": "4"}), ("rank_pattern", {"(": 4}),
    ("alpha_pattern", [1, 2]), ("alpha_pattern", {"v_proj": "x"}), ("target_modules", 3),
    ("target_modules", ["q_proj", 7]), ("use_rslora", "yes"), ("use_dora", 1), ("modules_to_save", "lm_head"),
    ("peft_type", 3), ("fan_in_fan_out", "no"),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={json.dumps(v)}" for f, v in BAD_FIELDS])
def test_badly_typed_config_field(cli, tmp_path, field, value):
    shutil.copytree(SAMPLES / "peft_lora", tmp_path / "a")
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[field] = value
    cfg_path.write_text(json.dumps(cfg))
    res = fails1(cli, "inspect", tmp_path / "a", match=field)
    assert "adapter_config.json" in res.stderr
    fails1(cli, "convert", tmp_path / "a", "--to", "kohya", "-o", tmp_path / "o.safetensors", match=field)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sh")
    tiny_llama().save_pretrained(str(root / "s"), max_shard_size="20KB")
    return root / "s"


BAD_INDEXES = {
    "not-json": "{ nope",
    "a-list": "[1, 2]",
    "no-weight-map": json.dumps({"metadata": {}}),
    "weight-map-list": json.dumps({"weight_map": ["model-00001.safetensors"]}),
    "weight-map-empty": json.dumps({"weight_map": {}}),
    "non-string-shard": json.dumps({"weight_map": {"model.norm.weight": 5}}),
    "null-shard": json.dumps({"weight_map": {"model.norm.weight": None}}),
    "escaping-shard": json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}}),
    "missing-shard": json.dumps({"weight_map": {"model.norm.weight": "nothere.safetensors"}}),
}


@pytest.mark.parametrize("case", sorted(BAD_INDEXES))
def test_bad_shard_index(cli, tmp_path, sharded, case):
    d = tmp_path / "m"
    shutil.copytree(sharded, d)
    (d / "model.safetensors.index.json").write_text(BAD_INDEXES[case])
    res = fails1(cli, "extract", "--base", d, "--tuned", d, "-o", tmp_path / "out")
    assert "model.safetensors.index.json" in res.stderr
    fails1(cli, "convert", KOHYA, "--to", "peft", "--base", d, "-o", tmp_path / "out2")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()
