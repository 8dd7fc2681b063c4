"""``convert --to gguf``: LoRA GGUF files as llama.cpp (``--lora``, ``llama-export-lora``) and Ollama load them.

The files are read back with the ``gguf`` package's own ``GGUFReader`` and checked against what llama.cpp's loader
requires (``llama-adapter.cpp``): the metadata keys, the base GGUF's tensor names, ``lora_a`` ne = [in, r] and
``lora_b`` ne = [r, out] (token embedding flipped), and ΔW = alpha / r · lora_b @ lora_a equal to PEFT's own
``get_delta_weight`` for every module, with llama.cpp's q/k row order for Llama-family bases.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import SAMPLES  # noqa: E402

ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


# ------------------------------------------------------------------ helpers: llama.cpp's side, written from its docs


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp's HF converter gives q_proj / k_proj of Llama-family models: in each head of d rows,
    the first and second rotary halves are interleaved (row 2i ← i, row 2i+1 ← d/2 + i)."""
    d = w.shape[0] // n_head
    out = torch.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


def read_gguf(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def llama_cpp_deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW per base tensor as llama.cpp applies the file: scale = alpha / rank, rank = lora_b's ne[0]."""
    fields, tensors = read_gguf(path)
    alpha = fields["adapter.lora.alpha"]
    out = {}
    for name, a in tensors.items():
        if not name.endswith(".lora_a"):
            continue
        base = name[: -len(".lora_a")]
        b = tensors[base + ".lora_b"]
        ta = torch.from_numpy(np.array(a.data, dtype=np.float64))  # torch order: reversed ne
        tb = torch.from_numpy(np.array(b.data, dtype=np.float64))
        rank = int(b.shape[0])  # ne[0]
        scale = np.float32(alpha) / np.float32(rank) if alpha else 1.0
        if base.startswith("token_embd"):
            out[base] = float(scale) * ta @ tb.T  # [vocab, dim]
        else:
            assert int(a.shape[1]) == int(b.shape[0]), f"{base}: lora_a is not transposed"
            out[base] = float(scale) * tb @ ta  # [out, in]
    return out


def gguf_name(module: str) -> str:
    if module.endswith("embed_tokens"):
        return "token_embd.weight"
    if module == "lm_head":
        return "output.weight"
    parts = module.split(".")
    return f"blk.{parts[2]}.{GGUF_NAMES[parts[-1]]}.weight"


def peft_deltas(model) -> dict[str, torch.Tensor]:
    """PEFT's own ΔW per adapted module (scaling, rank/alpha patterns and rsLoRA included)."""
    out = {}
    for name, mod in model.named_modules():
        if not hasattr(mod, "get_delta_weight"):
            continue
        if "default" in getattr(mod, "lora_A", {}) or "default" in getattr(mod, "lora_embedding_A", {}):
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach().double()
    return out


def expected_gguf_deltas(deltas: dict[str, torch.Tensor], config: dict, permute: bool) -> dict[str, torch.Tensor]:
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    out = {}
    for module, d in deltas.items():
        if permute and module.endswith("q_proj"):
            d = llama_permute(d, n_head)
        elif permute and module.endswith("k_proj"):
            d = llama_permute(d, n_kv)
        out[gguf_name(module)] = d
    return out


def assert_deltas_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].shape == w.shape, name
        err = float((got[name] - w).norm() / w.norm())
        assert err <= tol, f"{name}: relative error {err:.3g}"


# ------------------------------------------------------------------ the bundled Llama sample (rank/alpha patterns)


def sample_peft_deltas():
    from transformers import LlamaForCausalLM

    model = peft.PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(str(SAMPLES / "base")),
                                           str(SAMPLES / "peft_lora"))
    return peft_deltas(model)


def test_sample_llama_adapter_metadata_names_and_deltas(cli, tmp_path):
    out = tmp_path / "out.gguf"
    res = cli.ok("convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", out, "--base", SAMPLES / "base")
    # v_proj has r=4, alpha=8 (scale 2 = 16/8): llama.cpp would give it 16/4, so its scale is folded into lora_b
    assert "one alpha (16)" in res.output and "model.layers.0.self_attn.v_proj" in res.output
    fields, tensors = read_gguf(out)
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 16.0, "general.file_type": 0}
    want_names = {f"blk.{i}.{GGUF_NAMES[m]}.weight.lora_{ab}" for i in range(2) for m in ATTN_MLP for ab in "ab"}
    assert set(tensors) == want_names
    cfg = json.loads((SAMPLES / "base" / "config.json").read_text())
    for name, t in tensors.items():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        kind = name.split(".")[2]
        out_dim = {"attn_k": 32, "attn_v": 32, "ffn_gate": 128, "ffn_up": 128}.get(kind, 64)
        in_dim = 128 if kind == "ffn_down" else 64
        rank = 4 if kind == "attn_v" else 8
        # llama.cpp's shape checks: lora_a ne = [in, r], lora_b ne = [r, out]
        want = [in_dim, rank] if name.endswith("lora_a") else [rank, out_dim]
        assert [int(x) for x in t.shape] == want, name
    assert_deltas_match(llama_cpp_deltas(out), expected_gguf_deltas(sample_peft_deltas(), cfg, permute=True))


def test_plain_layers_are_copied_bit_exactly(cli, tmp_path):
    """Layers whose scale is alpha / r already (everything but v_proj here) keep their factors bit for bit, with
    only the q/k rows of lora_b reordered."""
    from safetensors.torch import load_file

    out = tmp_path / "out.gguf"
    cli.ok("convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", out, "--base", SAMPLES / "base")
    _, tensors = read_gguf(out)
    src = load_file(str(SAMPLES / "peft_lora" / "adapter_model.safetensors"))
    pre = "base_model.model.model.layers.1."
    up = src[pre + "mlp.up_proj.lora_B.weight"].numpy()
    assert np.array_equal(tensors["blk.1.ffn_up.weight.lora_b"].data, up)
    assert np.array_equal(tensors["blk.1.ffn_up.weight.lora_a"].data, src[pre + "mlp.up_proj.lora_A.weight"].numpy())
    q_b = torch.from_numpy(src[pre + "self_attn.q_proj.lora_B.weight"].numpy())
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_b"].data, llama_permute(q_b, 4).numpy())
    k_b = torch.from_numpy(src[pre + "self_attn.k_proj.lora_B.weight"].numpy())
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"].data, llama_permute(k_b, 2).numpy())


def test_f16_output(cli, tmp_path):
    out = tmp_path / "out.gguf"
    cli.ok("convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", out, "--base", SAMPLES / "base", "--dtype", "fp16")
    fields, tensors = read_gguf(out)
    assert fields["general.file_type"] == 1
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in tensors.values())
    cfg = json.loads((SAMPLES / "base" / "config.json").read_text())
    assert_deltas_match(llama_cpp_deltas(out), expected_gguf_deltas(sample_peft_deltas(), cfg, permute=True), tol=2e-3)


# ------------------------------------------------------------------ tiny Mistral / Qwen2 / Qwen3 built here


def tiny_base(kind: str, path: Path, **overrides) -> dict:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    cls_cfg, cls_model = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[kind]
    if kind == "qwen3":
        cfg.setdefault("head_dim", 8)
    model = cls_model(cls_cfg(**cfg))
    model.save_pretrained(str(path))
    return model


def tiny_adapter(model, path: Path, targets: list[str], **kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)
    pm = peft.get_peft_model(model, config)
    pm.save_pretrained(str(path))
    return peft_deltas(pm)


CASES = {
    # GQA, embedding + lm_head LoRA, alpha/rank patterns
    "mistral": dict(arch="llama", permute=True, targets=[*ATTN_MLP, "embed_tokens", "lm_head"],
                    kw=dict(rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3})),
    # rsLoRA (scale alpha/√r) with a rank pattern
    "qwen2": dict(arch="qwen2", permute=False, targets=ATTN_MLP, kw=dict(use_rslora=True, rank_pattern={"up_proj": 2})),
    "qwen3": dict(arch="qwen3", permute=False, targets=ATTN_MLP, kw=dict(use_rslora=True)),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_tiny_models_deltas_match_peft(cli, tmp_path, kind):
    case = CASES[kind]
    model = tiny_base(kind, tmp_path / "base")
    deltas = tiny_adapter(model, tmp_path / "adapter", case["targets"], **case["kw"])
    out = tmp_path / "out.gguf"
    cli.ok("convert", tmp_path / "adapter", "--to", "gguf", "-o", out, "--base", tmp_path / "base")
    fields, tensors = read_gguf(out)
    assert fields["general.architecture"] == case["arch"]
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    # the most common scale·r: 8 for plain layers, 8·√4 = 16 under rsLoRA
    assert fields["adapter.lora.alpha"] == (16.0 if case["kw"].get("use_rslora") else 8.0)
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    assert_deltas_match(llama_cpp_deltas(out), expected_gguf_deltas(deltas, cfg, permute=case["permute"]))
    if kind == "mistral":  # llama.cpp's token_embd convention: lora_a ne = [r, vocab], lora_b ne = [r, dim]
        assert [int(x) for x in tensors["token_embd.weight.lora_a"].shape] == [4, 96]
        assert [int(x) for x in tensors["token_embd.weight.lora_b"].shape] == [4, 32]
        assert [int(x) for x in tensors["output.weight.lora_a"].shape] == [32, 4]
        assert [int(x) for x in tensors["output.weight.lora_b"].shape] == [4, 96]


# ------------------------------------------------------------------ refusals: one line, exit 1, nothing written


def _nothing_written(folder: Path) -> None:
    assert list(folder.iterdir()) == [], list(folder.iterdir())


def _refused(cli, args, match, folder: Path):
    res = cli.fails(*args, match=match)
    assert res.exit_code == 1
    _nothing_written(folder)
    return res


def test_no_base_is_refused(cli, tmp_path):
    out = tmp_path / "out" / "a.gguf"
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", out], "needs --base", tmp_path / "out")


def test_base_without_config_is_refused(cli, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(SAMPLES / "base" / "model.safetensors", base)
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", tmp_path / "out" / "a.gguf", "--base", base],
             "no config.json", tmp_path / "out")


def test_unsupported_architecture_is_refused(cli, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(SAMPLES / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", tmp_path / "out" / "a.gguf", "--base", base],
             "architecture GPTNeoXForCausalLM is not supported", tmp_path / "out")


def test_dora_is_refused(cli, tmp_path):
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", SAMPLES / "peft_dora", "--to", "gguf", "-o", tmp_path / "out" / "a.gguf",
                   "--base", SAMPLES / "base"], "--fold-dora", tmp_path / "out")


def test_dora_folded_is_written(cli, tmp_path):
    out = tmp_path / "a.gguf"
    cli.ok("convert", SAMPLES / "peft_dora", "--to", "gguf", "-o", out, "--base", SAMPLES / "base", "--fold-dora")
    assert read_gguf(out)[0]["general.type"] == "adapter"


def test_wrong_suffix_is_refused(cli, tmp_path):
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", tmp_path / "out" / "a.safetensors",
                   "--base", SAMPLES / "base"], "name it *.gguf", tmp_path / "out")


def test_tied_lm_head_is_refused(cli, tmp_path):
    model = tiny_base("qwen2", tmp_path / "base", tie_word_embeddings=True)
    tiny_adapter(model, tmp_path / "adapter", ["q_proj", "lm_head"])
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", tmp_path / "adapter", "--to", "gguf", "-o", tmp_path / "out" / "a.gguf",
                   "--base", tmp_path / "base"], "tie_word_embeddings", tmp_path / "out")


def test_modules_to_save_is_refused(cli, tmp_path):
    model = tiny_base("qwen2", tmp_path / "base")
    tiny_adapter(model, tmp_path / "adapter", ["q_proj"], modules_to_save=["lm_head"])
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", tmp_path / "adapter", "--to", "gguf", "-o", tmp_path / "out" / "a.gguf",
                   "--base", tmp_path / "base"], "modules_to_save", tmp_path / "out")


def test_without_the_gguf_package(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf → ImportError
    (tmp_path / "out").mkdir()
    _refused(cli, ["convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", tmp_path / "out" / "a.gguf",
                   "--base", SAMPLES / "base"], "pip install 'loratools[gguf]'", tmp_path / "out")


def test_reading_gguf_is_a_clear_error(cli, tmp_path):
    out = tmp_path / "a.gguf"
    cli.ok("convert", SAMPLES / "peft_lora", "--to", "gguf", "-o", out, "--base", SAMPLES / "base")
    cli.fails("inspect", out, match="reading GGUF adapters is not supported")


def test_gguf_is_imported_lazily():
    code = "import sys, loratools.formats, loratools.cli\nassert 'gguf' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_extract_resize_merge_write_gguf_too(cli, tmp_path):
    """--to gguf is a format like the others: extract (its --base), resize and merge (--base) write it."""
    cli.ok("extract", "--base", SAMPLES / "base", "--tuned", SAMPLES / "tuned", "--to", "gguf", "-o", tmp_path / "e.gguf",
           "--rank", "4")
    cli.ok("resize", SAMPLES / "peft_lora", "--rank", "4", "--to", "gguf", "-o", tmp_path / "r.gguf", "--base",
           SAMPLES / "base")
    cli.ok("merge", SAMPLES / "peft_lora", SAMPLES / "kohya_lora.safetensors", "--to", "gguf", "-o",
           tmp_path / "m.gguf", "--base", SAMPLES / "base")
    for name in ("e", "r", "m"):
        fields, tensors = read_gguf(tmp_path / f"{name}.gguf")
        assert fields["general.architecture"] == "llama" and "blk.1.ffn_down.weight.lora_b" in tensors
    cli.fails("resize", SAMPLES / "peft_lora", "--rank", "4", "--to", "gguf", "-o", tmp_path / "x.gguf",
              match="needs --base")
    assert not (tmp_path / "x.gguf").exists()
