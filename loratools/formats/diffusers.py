"""diffusers-style LoRA keys: ``<component>.<module>.lora.down.weight`` / ``.lora.up.weight``
(older diffusers), ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT-backed
diffusers), optional ``<component>.<module>.alpha``, and the attention-processor form
``<attn>.processor.to_q_lora.down.weight`` (→ module ``<attn>.to_q``, ``to_out_lora`` → ``to_out.0``).

Without an alpha, diffusers applies scale 1 (alpha = r); we write ``.alpha`` only when it differs.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats.common import (
    atomic_path,
    check_resolved,
    embed_extra_tensors,
    embed_peft_config,
    embedding_metadata,
    lora_from_parts,
    note_zero_alphas,
    read_single_file,
    save_safetensors,
    take_embedding_marks,
    take_peft_config,
)
from loratools.formats.naming import COMPONENTS, layer_component, split_component
from loratools.formats.spec import AdapterFormat, WriteOptions

_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?:lora\.(?P<du>down|up)\.weight|(?P<ab>lora_A|lora_B)\.weight|(?P<alpha>alpha))$"
)
_PROC = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")


def is_diffusers_key(key: str) -> bool:
    return key.split(".", 1)[0] in COMPONENTS and (_KEY.match(key) is not None or _PROC.match(key) is not None)


def read_tensors_map(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PROC.match(key)
        if m:
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            parts.setdefault(f"{m['attn']}.{proj}", {})[m["du"]] = t
            continue
        m = _KEY.match(key)
        if m is None:
            raise LoraToolsError(f"{source}: unknown key layout {key!r} (expected <component>.<module>.lora_A.weight / .lora.down.weight)")
        slot = m["du"] or {"lora_A": "down", "lora_B": "up"}.get(m["ab"] or "", "alpha")
        parts.setdefault(m["mod"], {})[slot] = t
    adapter = Adapter(layers={}, format="diffusers", metadata=dict(metadata), source=source)
    take_peft_config(adapter)
    for mod, p in parts.items():
        layer = lora_from_parts(p, f"{source}: {mod}", ("lora down", "lora up"))
        layer.meta["component"] = split_component(mod)[0]
        adapter.layers[mod] = layer
    take_embedding_marks(adapter)
    note_zero_alphas(adapter)
    components = {layer.meta["component"] for layer in adapter.layers.values()}
    if len(components) == 1 and None not in components:
        # one model only: name layers by their module path in that model; the writer re-adds the prefix
        adapter.layers = {split_component(n)[1]: la for n, la in adapter.layers.items()}
    return adapter


def write(adapter: Adapter, out: Path, force: bool = False, options: WriteOptions = WriteOptions()) -> None:
    dtype, component, force_component = options.dtype, options.component, options.force_component
    check_resolved(adapter)
    tensors: dict[str, torch.Tensor] = {}
    embeddings: list[str] = []
    for name, layer in adapter.layers.items():
        stem = f"{layer_component(name, layer, component, force_component)}.{split_component(name)[1]}"
        if layer.embedding:
            embeddings.append(stem)
        tensors[stem + ".lora_A.weight"] = layer.down if dtype is None else layer.down.to(dtype)
        tensors[stem + ".lora_B.weight"] = layer.up if dtype is None else layer.up.to(dtype)
        if abs(layer.scale - 1.0) > 0 or layer.meta.get("alpha_dtype") is not None:
            plain = layer.alpha is not None and not layer.rslora
            alpha = layer.alpha if plain else layer.scale * layer.rank
            kept = layer.meta.get("alpha_dtype") if plain and dtype is None else None
            tensors[stem + ".alpha"] = torch.tensor(alpha, dtype=kept or torch.float32)
    extra_meta = embed_extra_tensors(adapter, tensors, "diffusers")
    with atomic_path(out, force, is_dir=False) as tmp:
        save_safetensors(tensors, tmp, {**embed_peft_config(adapter, adapter.metadata), **embedding_metadata(embeddings),
                                        **extra_meta})


def refuse(name: str, layer: Layer) -> str | None:
    if not isinstance(layer, LoraLayer):
        return f"{layer.kind} layers have no diffusers LoRA form; convert them to LoRA first"
    if layer.magnitude is not None:
        return "DoRA magnitudes cannot be written in diffusers format (use --to peft, or --fold-dora)"
    return None


FORMAT = AdapterFormat(
    name="diffusers", summary="diffusers single .safetensors (<component>.<module>.lora_A/B.weight)",
    folder=False, read=lambda path: read_single_file(path, read_tensors_map), write=write, claims=is_diffusers_key,
    refuse=refuse,
)
