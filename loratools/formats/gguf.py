"""GGUF LoRA adapters, as llama.cpp (``--lora``, ``llama-export-lora``) and Ollama (``ADAPTER``) load them: write only.

What llama.cpp expects (``src/llama-adapter.cpp``: ``llama_adapter_lora_init_impl`` and ``get_scale``;
``convert_lora_to_gguf.py``; ``tools/export-lora/export-lora.cpp``):

* metadata ``general.type = "adapter"``, ``adapter.type = "lora"``, ``general.architecture`` equal to the base GGUF's
  (else "model arch and LoRA arch mismatch") and one float32 ``adapter.lora.alpha`` for the whole file;
* per patched base tensor ``T`` (the base GGUF's name, e.g. ``blk.3.attn_q.weight``) two tensors ``T.lora_a`` and
  ``T.lora_b``; any other tensor is an error ("unexpected suffix"; ``*_norm.weight`` is skipped);
* shapes, torch order (GGUF stores the dims reversed, ``ne``): ``lora_a`` [r, in] and ``lora_b`` [out, r], so that
  ``ΔW = scale · lora_b @ lora_a``; the token embedding is flipped: ``lora_a`` [vocab, r], ``lora_b`` [dim, r],
  ``ΔE[vocab, dim] = scale · lora_a @ lora_bᵀ`` (``llm_build_inp_embd`` gathers rows of ``lora_a``);
* ``scale = alpha / r`` with ``r`` the tensor's own rank (``lora_b``'s ne[0]); alpha 0 means scale 1.

Names come from the ``gguf`` package's own map (``get_tensor_name_map(arch, n_blocks)``: HF module → GGUF tensor).
For Llama-family bases (Llama, Mistral) llama.cpp's model converter reorders the rows of ``q_proj`` / ``k_proj``
(``LlamaModel.modify_tensors``: within each head, the two rotary halves are interleaved; ``k_proj`` counts
``num_key_value_heads`` heads), so the base GGUF holds ``P·W``; the LoRA's ΔW must be ``P·ΔW``, i.e. the rows of
``lora_b`` are reordered and ``lora_a`` is untouched. Qwen2 / Qwen3 keep HF's row order.

One alpha for every layer: each layer's own scale (rank_pattern / alpha_pattern, rsLoRA, any rank) is kept exactly by
folding ``scale / (alpha / r)`` into its ``lora_b``; the alpha written is the most common ``scale · r`` among the
layers, so a plain adapter (one lora_alpha, no rsLoRA) is written with its own alpha and unscaled factors.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats.common import atomic_path, check_resolved
from loratools.formats.spec import AdapterFormat, WriteOptions

INSTALL = "pip install 'loratools[gguf]'"
#: HF ``architectures[0]`` → (the gguf package's ``MODEL_ARCH`` member, whether llama.cpp reorders the q/k rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}
MAGIC = b"GGUF"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise LoraToolsError(f"GGUF output needs the gguf package: {INSTALL}") from None
    return gguf


@dataclass(frozen=True)
class BaseModel:
    """What a GGUF adapter needs to know of its base model (from its ``config.json``)."""

    config: Path
    hf_arch: str
    arch: str  # gguf MODEL_ARCH member name
    permute_qk: bool
    n_layers: int
    n_head: int
    n_head_kv: int
    tied: bool


def base_model(path: Path | None) -> BaseModel:
    """Read and check the base model's ``config.json`` (one-line errors)."""
    if path is None:
        raise LoraToolsError("GGUF output needs --base HF_MODEL_DIR: the base model's config.json gives the "
                             "architecture, tensor names and attention head counts")
    config = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config.is_file():
        raise LoraToolsError(f"{path}: no config.json {'in it' if path.is_dir() else 'next to it'}; GGUF output needs "
                             "--base to be the base model's Hugging Face folder")
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoraToolsError(f"{config}: cannot read it as JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise LoraToolsError(f"{config}: not a JSON object")
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise LoraToolsError(f"{config}: names no architectures; GGUF output needs one of {', '.join(ARCHITECTURES)}")
    hf_arch = archs[0]
    if hf_arch not in ARCHITECTURES:
        raise LoraToolsError(f"{config}: architecture {hf_arch} is not supported for GGUF output "
                             f"(supported: {', '.join(ARCHITECTURES)})")
    arch, permute = ARCHITECTURES[hf_arch]

    def count(key: str) -> int:
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise LoraToolsError(f"{config}: {key} must be a positive integer, got {v!r}")
        return v

    n_head = count("num_attention_heads")
    n_head_kv = n_head if cfg.get("num_key_value_heads") is None else count("num_key_value_heads")
    return BaseModel(config=config, hf_arch=hf_arch, arch=arch, permute_qk=permute,
                     n_layers=count("num_hidden_layers"), n_head=n_head, n_head_kv=n_head_kv,
                     tied=bool(cfg.get("tie_word_embeddings", False)))


def check_base(path: Path | None) -> None:
    _gguf()
    base_model(path)


def interleave_halves(t: torch.Tensor, n_head: int, label: str) -> torch.Tensor:
    """Rows of ``t`` in llama.cpp's q/k order: per head of ``d`` rows, row ``2i + j`` takes HF row ``j·d/2 + i``."""
    rows = t.shape[0]
    if rows % (2 * n_head):
        raise LoraToolsError(f"{label}: {rows} output rows do not split into {n_head} heads of an even size")
    idx = torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)
    return t[idx]


def llama_alpha(layer: LoraLayer) -> float:
    """The alpha that gives ``layer`` its own scale under llama.cpp's ``alpha / r``: ``scale · r``."""
    if layer.alpha is None:
        return float(layer.rank)
    return float(layer.alpha) * math.sqrt(layer.rank) if layer.rslora else float(layer.alpha)


def global_alpha(layers: dict[str, Layer]) -> float:
    """The alpha to write: the most common non-zero ``scale · r`` (1 if every layer has scale 0)."""
    counts = Counter(a for la in layers.values() if (a := llama_alpha(la)) != 0)  # type: ignore[arg-type]
    return counts.most_common(1)[0][0] if counts else 1.0


_DTYPES = {None: "F32", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}


def _array(t: torch.Tensor, kind: str) -> np.ndarray:
    t = t.detach().to("cpu")
    if kind == "BF16":  # numpy has no bfloat16: the raw 16-bit words, typed by raw_dtype
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.to(torch.float32 if kind == "F32" else torch.float16).contiguous().numpy()


def write(adapter: Adapter, out: Path, force: bool = False, options: WriteOptions = WriteOptions()) -> None:
    gguf = _gguf()
    check_resolved(adapter)
    base = base_model(options.base)
    if options.dtype not in _DTYPES:
        raise LoraToolsError(f"GGUF LoRA tensors are f32, f16 or bf16, not {options.dtype}; pass --dtype fp32/fp16/bf16")
    kind = _DTYPES[options.dtype]
    # PEFT's save_embedding_layers copies of the base layer (``….base_layer.weight``) are the base's own weights:
    # dropped, as llama.cpp's converter skips them; modules_to_save tensors *replace* weights: refused
    copies = [k for k in adapter.extra_tensors if k.endswith(".base_layer.weight")]
    replaced = [k for k in adapter.extra_tensors if k not in copies]
    if replaced:
        raise LoraToolsError(
            f"{len(replaced)} modules_to_save tensor(s) (e.g. {replaced[0]}) replace base weights, which a GGUF "
            "LoRA cannot hold (llama.cpp loads only lora_a/lora_b pairs); bake them into the base model or drop them "
            "from the adapter first"
        )
    if copies:
        adapter.warnings.append(
            f"{len(copies)} saved base-layer copies (e.g. {copies[0]}; PEFT save_embedding_layers) not written: a GGUF "
            "LoRA holds only lora_a/lora_b pairs; if the vocabulary was resized, convert the base GGUF from that model"
        )
    arch = getattr(gguf.MODEL_ARCH, base.arch)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    names = gguf.get_tensor_name_map(arch, base.n_layers)
    T = gguf.MODEL_TENSOR
    alpha = float(np.float32(global_alpha(adapter.layers)))
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    folded: list[str] = []
    for name, layer in adapter.layers.items():
        assert isinstance(layer, LoraLayer)  # refuse() turned the others away
        found = names.get_type_and_name(name + ".weight", try_suffixes=(".weight",))
        if found is None:
            raise LoraToolsError(f"{name}: llama.cpp's {arch_name} model has no tensor for this module "
                                 f"({base.hf_arch}, {base.n_layers} layers)")
        ttype, target = found
        if target in tensors:
            raise LoraToolsError(f"{name}: a second layer for GGUF tensor {target}")
        if base.tied and ttype in (T.OUTPUT, T.TOKEN_EMBD):
            raise LoraToolsError(
                f"{name}: the base ties lm_head to embed_tokens (tie_word_embeddings), so llama.cpp has one tensor "
                "(token_embd.weight) for both and cannot apply a LoRA to just one of them"
            )
        r = layer.rank
        up = layer.up.reshape(layer.up.shape[0], r)
        down = layer.down.reshape(r, -1)
        llama_scale = float(np.float32(alpha) / np.float32(r))  # what llama.cpp computes, in float32
        fold = layer.scale / llama_scale
        if fold != 1.0:
            up = up.double() * fold
            folded.append(name)
        if base.permute_qk and ttype == T.ATTN_Q:
            up = interleave_halves(up, base.n_head, name)
        elif base.permute_qk and ttype == T.ATTN_K:
            up = interleave_halves(up, base.n_head_kv, name)
        # torch order; GGUF reverses the dims (lora_a ne = [in, r], lora_b ne = [r, out])
        tensors[target] = (up, down.T) if ttype == T.TOKEN_EMBD else (down, up)
    if folded:
        adapter.warnings.append(
            f"GGUF holds one alpha ({alpha:g}) and llama.cpp scales each layer by alpha / rank: {len(folded)} layer(s) "
            f"with another scale (rank/alpha patterns, rsLoRA; e.g. {folded[0]}) have it folded into lora_b"
        )
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    with atomic_path(out, force, is_dir=False) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)  # writes general.architecture
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[kind])))
        for target, (a, b) in tensors.items():
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                writer.add_tensor(target + suffix, _array(t, kind), raw_dtype=qtype if kind == "BF16" else None)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def refuse(name: str, layer: Layer) -> str | None:
    if not isinstance(layer, LoraLayer):
        return f"{layer.kind} layers have no GGUF LoRA form; convert them to LoRA first"
    if layer.magnitude is not None:
        return "DoRA magnitudes cannot be written to GGUF (llama.cpp applies plain LoRA); use --fold-dora --base"
    if layer.is_conv:
        return "conv layers have no GGUF LoRA form (llama.cpp patches 2-D weights only)"
    return None


def detect(path: Path) -> bool:
    """A GGUF file (by its magic), so that reading one says so instead of failing as safetensors."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


FORMAT = AdapterFormat(
    name="gguf", summary="llama.cpp / Ollama GGUF LoRA (blk.N.<tensor>.weight.lora_a/lora_b, adapter.lora.alpha)",
    folder=False, read=None, write=write, detect=detect, refuse=refuse, suffix=".gguf", check_base=check_base,
)
