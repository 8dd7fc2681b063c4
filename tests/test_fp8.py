"""fp8 checkpoints (loratools.quant): every scale convention read exactly, extraction from / bake into them.

Each checkpoint is built here: float weights quantized to fp8 with the scales each tool writes (ComfyUI scaled fp8,
musubi-tuner per channel / per block, compressed-tensors per tensor / per channel, block fp8 128×128 and from
config.json), and compared with a float64 dequantization written independently of the library.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError
from loratools.extract import ExtractOptions, TensorStream, extract, spectrum
from loratools.formats import load_adapter
from loratools.linalg import RankRule

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
# non-multiples of 128 (block fp8 has partial last blocks) and of musubi's block 64 only where it divides
SHAPES = {"a.q_proj": (300, 192), "a.o_proj": (192, 300), "b.up": (130, 64)}
CONVENTIONS = ["comfy", "comfy_e5m2", "musubi_row", "musubi_block", "ct_tensor", "ct_channel", "block", "block_cfg"]


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {f"{m}.weight": torch.randn(*s, generator=g, dtype=torch.float64) * 0.05 for m, s in SHAPES.items()}
    out["a.norm.weight"] = torch.ones(192, dtype=torch.float64)
    return out


def fp8_max(dt: torch.dtype) -> float:
    return torch.finfo(dt).max


def expand_block(scale: torch.Tensor, shape: tuple[int, int], bo: int, bi: int) -> torch.Tensor:
    """s[i // bo, j // bi] for every (i, j): the block scale written out element by element (float64)."""
    i = torch.arange(shape[0]) // bo
    j = torch.arange(shape[1]) // bi
    return scale.double()[i][:, j]


def quantize(w: torch.Tensor, conv: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({suffix: tensor} to store for weight ``w`` under convention ``conv``, float64 dequantized reference)."""
    dt = E5M2 if conv.endswith("e5m2") else E4M3
    out, inn = w.shape
    if conv.startswith("comfy") or conv == "ct_tensor":
        s = (w.abs().max() / fp8_max(dt)).float().reshape(() if conv.startswith("comfy") else (1,))
        full = s.double()
    elif conv in ("musubi_row", "ct_channel"):
        s = (w.abs().amax(1, keepdim=True) / fp8_max(dt)).float()
        full = s.double()
    elif conv == "musubi_block" and inn % 64:  # musubi falls back to one scale per tensor, shape [1]
        s = (w.abs().max() / fp8_max(dt)).float().reshape(1)
        full = s.double()
    elif conv == "musubi_block":
        blocks = w.reshape(out, inn // 64, 64).abs().amax(2, keepdim=True) / fp8_max(dt)  # [out, nb, 1]
        tensor = blocks.max().float()
        s = (blocks / tensor).float()
        total = (s * tensor).repeat_interleave(64, dim=1).reshape(out, inn)  # musubi's float32 total scale
        q = (w.float() / total).clamp(-fp8_max(dt), fp8_max(dt)).to(dt)
        return {"weight": q, "scale_weight": s, "scale_weight_tensor": tensor}, q.double() * s.double().repeat_interleave(
            64, dim=1).reshape(out, inn) * tensor.double()
    else:
        bo, bi = (64, 32) if conv == "block_cfg" else (128, 128)
        nb_o, nb_i = math.ceil(out / bo), math.ceil(inn / bi)
        s = torch.empty(nb_o, nb_i)
        for a in range(nb_o):
            for b in range(nb_i):
                s[a, b] = w[a * bo : (a + 1) * bo, b * bi : (b + 1) * bi].abs().max() / fp8_max(dt)
        full = expand_block(s, (out, inn), bo, bi)
    q = (w.float() / full.float()).clamp(-fp8_max(dt), fp8_max(dt)).to(dt)  # quantizers divide in float32
    ref = q.double() * full
    name = {"comfy": "scale_weight", "comfy_e5m2": "scale_weight", "musubi_row": "scale_weight",
            "musubi_block": "scale_weight",
            "ct_tensor": "weight_scale", "ct_channel": "weight_scale"}.get(conv, "weight_scale_inv")
    return {"weight": q, name: s}, ref


def write_fp8(root: Path, name: str, ws: dict[str, torch.Tensor], conv: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """Quantize every 2-D weight of ``ws`` under ``conv``; returns (checkpoint path, float64 references)."""
    sd, refs = {}, {}
    for key, w in ws.items():
        if w.dim() < 2:
            sd[key] = w.to(torch.bfloat16)
            refs[key] = sd[key].double()
            continue
        mod = key[: -len(".weight")]
        stored, refs[key] = quantize(w, conv)
        sd.update({f"{mod}.{k}": v.contiguous() for k, v in stored.items()})
        if conv.startswith("comfy"):
            sd[f"{mod}.scale_input"] = torch.ones(())
        if conv == "ct_tensor":
            sd[f"{mod}.input_scale"] = torch.tensor([0.02])
    if conv.startswith("comfy"):
        sd["scaled_fp8"] = torch.empty(0, dtype=E5M2 if conv.endswith("e5m2") else E4M3)
    if conv == "block_cfg":  # an HF folder whose config.json gives the block size
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"quantization_config": {
            "quant_method": "fp8", "weight_block_size": [64, 32]}}))
        save_file(sd, folder / "model.safetensors")
        return folder, refs
    save_file(sd, root / f"{name}.safetensors")
    return root / f"{name}.safetensors", refs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("conv", CONVENTIONS)
def test_reads_are_dequantized(tmp_path, conv):
    path, refs = write_fp8(tmp_path, "m", weights(), conv)
    ck = Checkpoint(path)
    stream = TensorStream(ck)
    assert sorted(ck.module_refs()) == sorted(k[: -len(".weight")] for k in refs if refs[k].dim() == 2)
    for key, ref in refs.items():
        for got in (ck.get(key), stream.read(key), stream.read(key, slot=0)):
            assert got.dtype == (torch.float32 if ref.dim() == 2 else torch.bfloat16)
            assert rel(got, ref) <= 1e-7, key
        if ref.dim() == 2:
            assert ck.module_shape(key[: -len(".weight")]) == tuple(ref.shape)
            assert rel(ck.module_weight(key[: -len(".weight")]), ref) <= 1e-7
    # the quantization is real: the fp8 grid rounding is far above float32 rounding
    assert all(rel(refs[k], w) > 1e-3 for k, w in weights().items() if w.dim() == 2)


def low_rank_change(ws: dict[str, torch.Tensor], seed: int = 5, rank: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in ws.items():
        if w.dim() == 2:
            a = torch.randn(w.shape[0], rank, generator=g, dtype=torch.float64)
            b = torch.randn(w.shape[1], rank, generator=g, dtype=torch.float64)
            w = w + 0.02 * (a @ b.T) / math.sqrt(rank)
        out[k] = w
    return out


def reconstruct(layer) -> torch.Tensor:
    left, right = layer.factors(torch.float64)
    return left @ right.T


EXACT = ExtractOptions(rule=RankRule("rank", 1000), exact=True, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("conv", CONVENTIONS)
def test_extract_bf16_base_fp8_tuned(tmp_path, conv):
    """ΔW = deq(tuned) − base, exactly: full-rank factors reproduce the float64 ΔW to float32 precision."""
    base = {k: v.to(torch.bfloat16) for k, v in weights().items()}
    save_file(base, tmp_path / "base.safetensors")
    tuned, refs = write_fp8(tmp_path, "tuned", low_rank_change(weights()), conv)
    res = extract(tmp_path / "base.safetensors", tuned, EXACT)
    assert sorted(res.adapter.layers) == sorted(SHAPES)
    for row in res.layers:
        key = row["key"]
        delta = refs[key] - base[key].double()
        # ‖L Rᵀ − ΔW₆₄‖ ≤ (float32 SVD residual against our ΔW, measured and reported) + 1e-6: our ΔW is exact
        assert row["error_measured"] and row["relative_error"] < 3e-6
        assert rel(reconstruct(res.adapter.layers[row["name"]]), delta) <= row["relative_error"] + 1e-6, key
        assert row["fro_norm"] == pytest.approx(float(delta.norm()), rel=1e-6)
        assert 0 < row["fp8_noise_floor"] < 1
    reasons = {s["name"]: s["reason"] for s in res.skipped}
    scale_keys = [k for k in load_file(tuned if tuned.is_file() else tuned / "model.safetensors")
                  if not k.endswith(".weight")]
    assert scale_keys and all("not a module" in reasons[k] for k in scale_keys)
    assert not any(n.endswith(("scale_weight", "weight_scale", "weight_scale_inv", "scaled_fp8", "input_scale"))
                   for n in res.adapter.layers)


def test_extract_both_fp8_different_scales(tmp_path):
    """Base per-row musubi scales, tuned block-128 scales: ΔW is the difference of the two dequantizations."""
    base, brefs = write_fp8(tmp_path, "base", weights(), "musubi_row")
    tuned, trefs = write_fp8(tmp_path, "tuned", low_rank_change(weights()), "block")
    res = extract(base, tuned, EXACT)
    assert sorted(res.adapter.layers) == sorted(SHAPES)
    for row in res.layers:
        delta = trefs[row["key"]] - brefs[row["key"]]
        assert rel(reconstruct(res.adapter.layers[row["name"]]), delta) <= row["relative_error"] + 1e-6
    # default factor dtype with both sides fp8: bfloat16, never fp8
    res16 = extract(base, tuned, ExtractOptions(rule=RankRule("rank", 4), device="cpu"))
    assert {la.up.dtype for la in res16.adapter.layers.values()} == {torch.bfloat16}


def test_quantization_noise_alone_is_no_change(tmp_path):
    """A tuned checkpoint that is the base quantized with its own scales has only fp8 noise as ΔW: nothing to extract,
    and spectrum lists every module as unchanged; the same bytes with one weight really changed are extracted."""
    ws = {k: v.to(torch.bfloat16).double() for k, v in weights().items()}
    save_file({k: v.to(torch.bfloat16) for k, v in ws.items()}, tmp_path / "base.safetensors")
    for conv in ("comfy", "musubi_row", "block"):
        tuned, _ = write_fp8(tmp_path, conv, ws, conv)
        with pytest.raises(LoraToolsError, match="nothing to extract"):
            extract(tmp_path / "base.safetensors", tuned, EXACT)
        doc = spectrum(tmp_path / "base.safetensors", tuned, device="cpu")
        assert doc["layers"] == []
        assert sum("quantized to float8_e4m3fn" in s["reason"] for s in doc["skipped"]) == len(SHAPES)
    changed = dict(ws, **{"b.up.weight": low_rank_change(ws)["b.up.weight"]})
    tuned, _ = write_fp8(tmp_path, "changed", changed, "comfy")
    res = extract(tmp_path / "base.safetensors", tuned, EXACT)
    assert list(res.adapter.layers) == ["b.up"]


def test_missing_scale_is_an_error(tmp_path, cli):
    save_file({k: v.to(torch.bfloat16) for k, v in weights().items()}, tmp_path / "base.safetensors")
    path, _ = write_fp8(tmp_path, "tuned", low_rank_change(weights()), "comfy")
    sd = load_file(path)
    del sd["a.o_proj.scale_weight"]
    save_file(sd, tmp_path / "broken.safetensors")
    res = cli.fails("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "broken.safetensors",
                    "-o", tmp_path / "out", match="float8_e4m3fn weight without a scale_weight/weight_scale/"
                    "weight_scale_inv beside it")
    assert "broken.safetensors" in res.stderr and "a.o_proj.weight" in res.stderr
    assert not (tmp_path / "out").exists()
    # also as the base, and for inspect-style module reads
    with pytest.raises(LoraToolsError, match="a.o_proj.weight"):
        Checkpoint(tmp_path / "broken.safetensors").module_weight("a.q_proj")
    cli.fails("spectrum", "--base", tmp_path / "broken.safetensors", "--tuned", path, match="without a scale")


def test_scale_that_does_not_fit_is_an_error(tmp_path, cli):
    path, _ = write_fp8(tmp_path, "m", weights(), "block")
    sd = load_file(path)
    sd["a.q_proj.weight_scale_inv"] = torch.ones(2, 5)  # 300×192 in 128-blocks is 3×2
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(LoraToolsError, match=r"weight_scale_inv \[2, 5\] does not fit weight a.q_proj.weight"):
        Checkpoint(tmp_path / "bad.safetensors").get("a.q_proj.weight")


def test_plain_fp8_read_as_stored_with_a_warning(tmp_path, cli):
    """No scale anywhere: a plain fp8 cast (as ComfyUI loads it), with a warning in the report."""
    save_file({k: v.to(torch.bfloat16) for k, v in weights().items()}, tmp_path / "base.safetensors")
    tuned = {k: v.to(E4M3) if v.dim() == 2 else v.to(torch.bfloat16) for k, v in low_rank_change(weights()).items()}
    save_file(tuned, tmp_path / "plain.safetensors")
    res = cli.ok("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "plain.safetensors",
                 "-o", tmp_path / "out", "--rank", "4", "--json")
    doc = json.loads(res.stdout)
    assert any("read as plain fp8 casts" in w for w in doc["warnings"])
    assert {r["name"] for r in doc["layers"]} == set(SHAPES)
    assert all(r["fp8_noise_floor"] > 0 for r in doc["layers"])
    # an fp8 weight with a scale key beside others without: that is a scaled checkpoint, so an error
    tuned["b.up.scale_weight"] = torch.tensor(1.0)
    save_file(tuned, tmp_path / "mixed.safetensors")
    cli.fails("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "mixed.safetensors",
              "-o", tmp_path / "out2", match="without a scale_weight")
    # baking into the plain fp8 file: fp8 output would round the ΔW away, so --dtype is required
    cli.fails("bake", tmp_path / "out", "--base", tmp_path / "plain.safetensors", "-o", tmp_path / "b.safetensors",
              match="pass --dtype bf16")
    cli.ok("bake", tmp_path / "out", "--base", tmp_path / "plain.safetensors", "-o", tmp_path / "b.safetensors",
           "--dtype", "bf16", "-q")


def test_bake_into_scaled_fp8_base(tmp_path, cli):
    """Refused without --dtype (fp8 weights would keep a stale scale); with --dtype bf16 every weight is written
    dequantized + ΔW, and the scales and marker are gone."""
    base, refs = write_fp8(tmp_path, "base", weights(), "comfy")
    tuned = {k: v.to(torch.bfloat16) for k, v in low_rank_change(weights()).items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    cli.ok("extract", "--base", base, "--tuned", tmp_path / "tuned.safetensors", "-o", tmp_path / "lora",
           "--rank", "8", "--dtype", "fp32")
    cli.fails("bake", tmp_path / "lora", "--base", base, "-o", tmp_path / "baked.safetensors",
              match="pass --dtype bf16")
    assert not (tmp_path / "baked.safetensors").exists()
    cli.ok("bake", tmp_path / "lora", "--base", base, "-o", tmp_path / "baked.safetensors", "--dtype", "bf16")
    out = load_file(tmp_path / "baked.safetensors")
    assert sorted(out) == sorted(weights())
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    lora = load_adapter(tmp_path / "lora")
    for k, v in out.items():
        if v.dim() == 2:  # dequantized base + ΔW, rounded once to bf16
            want = refs[k] + reconstruct(lora.layers[k[: -len(".weight")]])
            assert rel(v, want) <= 2e-3
            assert rel(v, tuned[k]) < rel(refs[k], tuned[k])  # closer to the fine-tune than the base was


def test_block_size_from_compressed_tensors_config(tmp_path):
    path, refs = write_fp8(tmp_path, "m", weights(), "block_cfg")
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {
        "group_0": {"weights": {"block_structure": [64, 32], "type": "float"}}}}}
    (path / "config.json").write_text(json.dumps(cfg))
    ck = Checkpoint(path)
    assert rel(ck.get("a.q_proj.weight"), refs["a.q_proj.weight"]) <= 1e-7


def test_block_scales_in_ue8m0_and_pickles_and_prefixed_marker(tmp_path):
    """Block scales stored as float8_e8m0fnu powers of two (DeepSeek ``scale_fmt: ue8m0``); the same tensors in a
    ``.pt`` pickle; a ComfyUI file under ``model.diffusion_model.`` with its marker there."""
    w = weights()["a.q_proj.weight"]
    s = torch.exp2(torch.ceil(torch.log2(torch.tensor([[w[:128, :128].abs().max(), w[:128, 128:].abs().max()]] * 3)
                                         / fp8_max(E4M3)))).float()
    q = (w / expand_block(s, (300, 192), 128, 128)).clamp(-448, 448).to(E4M3)
    ref = q.double() * expand_block(s, (300, 192), 128, 128)
    sd = {"a.q_proj.weight": q, "a.q_proj.weight_scale_inv": s.to(torch.float8_e8m0fnu)}
    save_file(sd, tmp_path / "ue8m0.safetensors")
    torch.save(sd, tmp_path / "ue8m0.pt")
    for name in ("ue8m0.safetensors", "ue8m0.pt"):
        ck = Checkpoint(tmp_path / name)
        assert ck.dtype("a.q_proj.weight_scale_inv") == torch.float8_e8m0fnu
        assert rel(ck.get("a.q_proj.weight"), ref) <= 1e-7
        assert rel(TensorStream(ck).read("a.q_proj.weight"), ref) <= 1e-7
        assert list(ck.module_refs()) == ["a.q_proj"]
    prefixed, refs = write_fp8(tmp_path, "comfy", weights(), "comfy")
    stored = {f"model.diffusion_model.{k}": v for k, v in load_file(prefixed).items()}
    save_file(stored, tmp_path / "prefixed.safetensors")
    ck = Checkpoint(tmp_path / "prefixed.safetensors")
    assert ck.quant.reason("model.diffusion_model.scaled_fp8") == "scaled-fp8 marker: not a module"
    assert rel(ck.get("model.diffusion_model.b.up.weight"), refs["b.up.weight"]) <= 1e-7


def test_inspect_base_reads_dequantized_weights(tmp_path, cli):
    """``inspect --base`` with a scaled-fp8 base: ‖ΔW‖/‖W‖ uses the dequantized weight."""
    base, refs = write_fp8(tmp_path, "base", weights(), "musubi_row")
    tuned = {k: v.to(torch.bfloat16) for k, v in low_rank_change(weights()).items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    cli.ok("extract", "--base", base, "--tuned", tmp_path / "tuned.safetensors", "-o", tmp_path / "lora",
           "--rank", "4", "--dtype", "fp32")
    doc = json.loads(cli.ok("inspect", tmp_path / "lora", "--base", base, "--json").stdout)
    for row in doc["layers"]:
        w = refs[f"{row['name']}.weight"]
        assert row["base_fro_norm"] == pytest.approx(float(w.norm()), rel=1e-5)  # inspect's float32 norm: ~1e-6


@pytest.mark.parametrize("conv", ["musubi_row", "musubi_block", "block"])
def test_noise_analysis_row_blocks_agree(tmp_path, monkeypatch, conv):
    """The noise floor and the requantization check work on row blocks (bounded memory): blocks of a few rows,
    starting inside a scale block, give the same answers as the whole layer."""
    from loratools import quant

    ws = {k: v.to(torch.bfloat16).double() for k, v in weights().items()}
    save_file({k: v.to(torch.bfloat16) for k, v in ws.items()}, tmp_path / "base.safetensors")
    same, _ = write_fp8(tmp_path, "same", ws, conv)
    changed, _ = write_fp8(tmp_path, "changed", low_rank_change(ws), conv)
    base = Checkpoint(tmp_path / "base.safetensors")
    results = []
    for elems in (quant.BLOCK_ELEMS, 3 * 192 + 5):
        monkeypatch.setattr(quant, "BLOCK_ELEMS", elems)
        got = {}
        for name, path in (("same", same), ("changed", changed)):
            ck = Checkpoint(path)
            for key in SHAPES:
                k = f"{key}.weight"
                wb, wt = base.get(k), ck.get(k)
                got[name, k, "noise"] = quant.noise_only(base, ck, k, wb, wt, base.get, ck.get)
                got[name, k, "floor"] = quant.noise_floor_sq(base, ck, k, wb, wt, base.get, ck.get)
        results.append(got)
    whole, blocks = results
    for k in whole:
        if k[2] == "noise":
            assert whole[k] == blocks[k]
            assert (whole[k] is not None) == (k[0] == "same")
        else:
            assert torch.allclose(whole[k], blocks[k], rtol=1e-12, atol=0)


def test_bake_into_sharded_block_fp8_folder(tmp_path, cli):
    """A sharded HF folder in block fp8 (config.json quantization_config): baked with --dtype bf16, the shards, the
    index and config.json lose every scale and the quantization_config; the weights are dequantized + ΔW."""
    path, refs = write_fp8(tmp_path, "one", weights(), "block_cfg")
    sd = load_file(path / "model.safetensors")
    folder = tmp_path / "sharded"
    folder.mkdir()
    cfg = json.loads((path / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "bfloat16"}))
    shards = {"model-00001-of-00002.safetensors": [k for k in sd if k.startswith("a.")],
              "model-00002-of-00002.safetensors": [k for k in sd if not k.startswith("a.")]}
    for name, keys in shards.items():
        save_file({k: sd[k] for k in keys}, folder / name)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: n for n, keys in shards.items() for k in keys}}))
    tuned = {k: v.to(torch.bfloat16) for k, v in low_rank_change(weights()).items()}
    save_file(tuned, tmp_path / "tuned.safetensors")
    cli.ok("extract", "--base", folder, "--tuned", tmp_path / "tuned.safetensors", "-o", tmp_path / "lora",
           "--rank", "8", "--dtype", "fp32")
    cli.fails("bake", tmp_path / "lora", "--base", folder, "-o", tmp_path / "baked", match="scaled-fp8 checkpoint")
    cli.ok("bake", tmp_path / "lora", "--base", folder, "-o", tmp_path / "baked", "--dtype", "bf16")
    out = tmp_path / "baked"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(weights())
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    got = {k: v for name in shards for k, v in load_file(out / name).items()}
    assert sorted(got) == sorted(weights())
    lora = load_adapter(tmp_path / "lora")
    for k, v in got.items():
        if v.dim() == 2:
            assert rel(v, refs[k] + reconstruct(lora.layers[k[: -len(".weight")]])) <= 2e-3


def test_other_quantized_weights_with_scales_are_refused(tmp_path, cli):
    """An int8 (W8A8) weight with a weight_scale is not silently skipped as 'not a float tensor': a one-line error."""
    save_file({k: v.to(torch.bfloat16) for k, v in weights().items()}, tmp_path / "base.safetensors")
    sd = {k: v.to(torch.bfloat16) for k, v in weights().items()}
    sd["a.q_proj.weight"] = torch.randint(-127, 127, (300, 192), dtype=torch.int8)
    sd["a.q_proj.weight_scale"] = torch.full((300, 1), 1e-3)
    save_file(sd, tmp_path / "int8.safetensors")
    cli.fails("extract", "--base", tmp_path / "base.safetensors", "--tuned", tmp_path / "int8.safetensors",
              "-o", tmp_path / "out", match="int8 weight a.q_proj.weight [300, 192] has a scale (a.q_proj.weight_scale)")
