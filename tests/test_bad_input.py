"""Bad input: one-line errors naming the file/key/shape, non-zero exit, nothing written, inputs untouched."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import SAMPLES, error_line


def kohya_file(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def lora_pair(r=4, out=6, inp=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g)


def outputs_left(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".", "out")))


def test_missing_path(cli, tmp_path):
    cli.fails("inspect", tmp_path / "nope.safetensors", match="no such file")
    cli.fails("convert", tmp_path / "nope", "--to", "peft", "-o", tmp_path / "out", match="no such file")
    assert outputs_left(tmp_path) == []


def test_folder_without_adapter(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    cli.fails("inspect", tmp_path / "empty", match="no adapter found")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(cli, tmp_path, damage):
    bad = tmp_path / "bad.safetensors"
    data = (SAMPLES / "kohya_lora.safetensors").read_bytes()
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    res = cli.fails("inspect", bad)
    assert "bad.safetensors" in res.stderr
    cli.fails("convert", bad, "--to", "peft", "-o", tmp_path / "out")
    assert outputs_left(tmp_path) == []


def test_config_json_that_does_not_parse(cli, tmp_path):
    shutil.copytree(SAMPLES / "peft_lora", tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text('{"r": 8, "lora_alpha": ')
    cli.fails("inspect", tmp_path / "a", match="adapter_config.json: invalid JSON")


def test_rank_mismatch(cli, tmp_path):
    d, _ = lora_pair(r=4)
    f = kohya_file(tmp_path / "x.safetensors", {"lora_unet_a.lora_down.weight": d,
                                                 "lora_unet_a.lora_up.weight": torch.randn(6, 3)})
    cli.fails("inspect", f, match="rank mismatch: down (4, 8) has rank 4, up (6, 3) has rank 3")


def test_conv_linear_mixup(cli, tmp_path):
    f = kohya_file(tmp_path / "x.safetensors", {"lora_unet_a.lora_down.weight": torch.randn(4, 8, 3, 3),
                                                 "lora_unet_a.lora_up.weight": torch.randn(6, 4)})
    res = cli.fails("inspect", f, match="conv/linear mix-up")
    assert "(4, 8, 3, 3)" in res.stderr and "lora_unet_a" in res.stderr


def test_adapter_shape_conflicts_with_base(cli, tmp_path):
    d, u = lora_pair(r=4, out=64, inp=32)  # base q_proj is 64×64
    f = kohya_file(tmp_path / "x.safetensors", {"lora_unet_model_layers_0_self_attn_q_proj.lora_down.weight": d,
                                                 "lora_unet_model_layers_0_self_attn_q_proj.lora_up.weight": u})
    res = cli("inspect", f, "--base", SAMPLES / "base", "--json")
    assert "(64, 32)" in res.stderr and "(64, 64)" in res.stderr


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights(cli, tmp_path, value):
    d, u = lora_pair()
    u[2, 1] = value
    f = kohya_file(tmp_path / "x.safetensors", {"lora_unet_a.lora_down.weight": d, "lora_unet_a.lora_up.weight": u})
    cli.fails("inspect", f, match="non-finite")
    cli.fails("convert", f, "--to", "kohya", "-o", tmp_path / "out.safetensors", match="--allow-nonfinite")
    assert outputs_left(tmp_path) == []
    res = cli.ok("inspect", f, "--allow-nonfinite", "--json")
    assert "non-finite" in res.stderr
    json.loads(res.stdout)  # still valid JSON (NaN mapped to null)


def test_unknown_key_layout(cli, tmp_path):
    f = kohya_file(tmp_path / "x.safetensors", {"transformer.h.0.attn.weight": torch.randn(4, 4)})
    cli.fails("inspect", f, match="unknown key layout: 'transformer.h.0.attn.weight'")


def test_mixed_key_conventions(cli, tmp_path):
    d, u = lora_pair()
    f = kohya_file(tmp_path / "x.safetensors", {
        "lora_unet_a.lora_down.weight": d, "lora_unet_a.lora_up.weight": u,
        "unet.b.lora_A.weight": d.clone(), "unet.b.lora_B.weight": u.clone()})
    res = cli.fails("inspect", f, match="mixed key conventions")
    assert "kohya" in res.stderr and "diffusers" in res.stderr


def test_missing_factor(cli, tmp_path):
    d, _ = lora_pair()
    f = kohya_file(tmp_path / "x.safetensors", {"lora_unet_a.lora_down.weight": d})
    cli.fails("inspect", f, match="lora_unet_a has no lora_up.weight")


class Payload:
    """Unpickling this runs os.system: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["adapter", "base"])
def test_pickle_payload_is_refused_and_never_runs(cli, tmp_path, where):
    marker = tmp_path / "pwned"
    evil = {"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "boom": Payload(marker)}
    if where == "adapter":
        (tmp_path / "a").mkdir()
        shutil.copy(SAMPLES / "peft_lora" / "adapter_config.json", tmp_path / "a")
        with open(tmp_path / "a" / "adapter_model.bin", "wb") as fh:
            pickle.dump(evil, fh)
        res = cli.fails("inspect", tmp_path / "a", match="refused")
    else:
        torch.save(evil, str(tmp_path / "evil.bin"))
        res = cli.fails("inspect", SAMPLES / "peft_lora", "--base", tmp_path / "evil.bin", match="refused")
    assert "weights_only" not in res.stderr and "trust" not in res.stderr  # no advice to load it unsafely
    assert ("evil.bin" if where == "base" else "adapter_model.bin") in res.stderr
    assert not marker.exists()


def test_existing_output_needs_force_and_inputs_untouched(cli, tmp_path):
    src = tmp_path / "src.safetensors"
    shutil.copy(SAMPLES / "kohya_lora.safetensors", src)
    before = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cli.fails("convert", src, "--to", "peft", "-o", out, "--base", SAMPLES / "base", match="already exists")
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces only a folder of the kind loratools writes: not this one
    cli.fails("convert", src, "--to", "peft", "-o", out, "--base", SAMPLES / "base", "--force",
              match="no adapter or model weights")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    shutil.copytree(SAMPLES / "peft_lora", out, dirs_exist_ok=True)
    cli.ok("convert", src, "--to", "peft", "-o", out, "--base", SAMPLES / "base", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert src.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failed_write_leaves_nothing(cli, tmp_path, monkeypatch):
    import loratools.formats.common as common

    def boom(*args, **kwargs):
        raise OSError("disk full")

    # fails after the header is on disk, while the tensor data is being written
    monkeypatch.setattr(common, "_write_tensor", boom)
    res = cli("convert", SAMPLES / "peft_lora", "--to", "kohya", "-o", tmp_path / "out.safetensors")
    assert res.exit_code != 0 and "disk full" in error_line(res.stderr)
    assert list(tmp_path.iterdir()) == []


def test_kohya_to_peft_without_base_is_a_clear_error(cli, tmp_path):
    cli.fails("convert", SAMPLES / "kohya_lora.safetensors", "--to", "peft", "-o", tmp_path / "out", match="--base")
    assert list(tmp_path.iterdir()) == []


def test_bad_dtype_and_format(cli, tmp_path):
    cli.fails("convert", SAMPLES / "peft_lora", "--to", "kohya", "-o", tmp_path / "o.safetensors", "--dtype", "int3",
              match="unknown dtype")
    res = cli("convert", SAMPLES / "peft_lora", "--to", "onnx", "-o", tmp_path / "o")
    assert res.exit_code == 2 and res.stderr.startswith("error: Invalid value for '--to'")
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["convert"], ["resize", "--bogus"], ["merge", "x", "--method", "nope", "-o", "y"],
                                  ["inspect", "a", "--top", "-1"]])
def test_usage_errors_are_one_line(cli, args):
    res = cli(*args)
    assert res.exit_code == 2
    assert res.stderr.startswith("error: ") and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_peft_config_with_missing_weights(cli, tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(SAMPLES / "peft_lora" / "adapter_config.json", tmp_path / "a")
    cli.fails("inspect", tmp_path / "a", match="no adapter_model.safetensors")


def test_outputs_get_umask_permissions(cli, tmp_path):
    cli.ok("convert", SAMPLES / "peft_lora", "--to", "kohya", "-o", tmp_path / "k.safetensors")
    cli.ok("convert", SAMPLES / "peft_lora", "--to", "peft", "-o", tmp_path / "p")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "k.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o777 & ~mask


def test_output_that_is_an_input_is_refused_even_with_force(cli, tmp_path):
    import shutil

    shutil.copytree(SAMPLES / "peft_lora", tmp_path / "a")
    before = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    cli.fails("resize", tmp_path / "a", "-o", tmp_path / "a", "--rank", "2", "--force", match="output is the input")
    cli.fails("convert", tmp_path / "a", "--to", "peft", "-o", tmp_path, "--force", match="output holds the input")
    cli.fails("merge", tmp_path / "a", SAMPLES / "peft_lora", "-o", tmp_path / "a", "--force", match="output is the input")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == before


def test_output_without_extension_is_read_back_as_safetensors(cli, tmp_path):
    cli.ok("convert", SAMPLES / "peft_lora", "--to", "kohya", "-o", tmp_path / "noext")
    doc = json.loads(cli.ok("inspect", tmp_path / "noext", "--json").stdout)
    assert doc["format"] == "kohya" and len(doc["layers"]) == 14


def test_cancelling_merge_and_bad_device_and_top(cli, tmp_path):
    p = SAMPLES / "peft_lora"
    for method in ("svd", "ties_svd"):
        cli.fails("merge", f"{p}:1", f"{p}:-1", "--method", method, "--density", "0.5", "-o", tmp_path / "m",
                  match="cancel out")
    cli.fails("merge", p, p, "--device", "foo", "-o", tmp_path / "m", match="unknown device 'foo'")
    assert list(tmp_path.iterdir()) == []


def test_rslora_alpha_to_kohya_keeps_the_scale_in_fp16(cli, tmp_path):
    from loratools.formats import load_adapter

    g = torch.Generator().manual_seed(0)
    d = tmp_path / "a"
    d.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.randn(8, 16, generator=g).half(),
               "base_model.model.x.lora_B.weight": torch.randn(12, 8, generator=g).half()},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 7,
                                                       "use_rslora": True, "target_modules": ["x"]}))
    cli.ok("convert", d, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    src, out = load_adapter(d).layers["x"], load_adapter(tmp_path / "k.safetensors").layers["lora_unet_x"]
    assert out.scale == pytest.approx(src.scale, rel=1e-7)
