"""Lazy checkpoint reader: HF folders (single, sharded), single files, safe .bin, errors."""

from __future__ import annotations

import json

import pytest
import torch

from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError
from tests.conftest import SAMPLES, tiny_llama


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama()
    root = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(str(root / "single"))
    model.save_pretrained(str(root / "sharded"), max_shard_size="20KB")
    torch.save(model.state_dict(), str(root / "model.bin"))
    return model, root


def test_single_sharded_and_bin_agree(saved):
    model, root = saved
    sd = model.state_dict()
    assert (root / "sharded" / "model.safetensors.index.json").exists()
    for path in (root / "single", root / "sharded", root / "single" / "model.safetensors", root / "model.bin"):
        ck = Checkpoint(path)
        assert set(sd) <= set(ck.keys()) | {"lm_head.weight"}
        for k in ("model.layers.1.mlp.down_proj.weight", "model.norm.weight"):
            assert torch.equal(ck.get(k), sd[k])
            assert ck.shape(k) == tuple(sd[k].shape)
            assert ck.dtype(k) == sd[k].dtype
    assert len(Checkpoint(root / "sharded").files) > 1


def test_modules_view():
    ck = Checkpoint(SAMPLES / "base")
    mods = ck.modules()
    assert mods["model.layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    assert "model.norm" not in mods  # 1-D weights are not LoRA targets


def test_lazy_only_reads_what_is_asked(saved):
    _, root = saved
    ck = Checkpoint(root / "sharded")
    ck.get("model.norm.weight")
    assert ck._pickles == {}
    assert len(ck._handles) == 1  # only the shard holding the key was opened (memory-mapped)


def test_missing_shard(saved, tmp_path):
    import shutil

    _, root = saved
    shutil.copytree(root / "sharded", tmp_path / "s")
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "s" / victim).unlink()
    with pytest.raises(LoraToolsError, match=f"shard\\(s\\) missing: {victim}"):
        Checkpoint(tmp_path / "s")


def test_folder_without_weights(tmp_path):
    with pytest.raises(LoraToolsError, match="no model weights found"):
        Checkpoint(tmp_path)


def test_bf16_dtype_reported(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, str(tmp_path / "x.safetensors"))
    assert Checkpoint(tmp_path / "x.safetensors").dtype("a.weight") == torch.bfloat16
