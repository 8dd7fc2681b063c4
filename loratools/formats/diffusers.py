"""diffusers-style LoRA keys: ``<component>.<module>.lora.down.weight`` / ``.lora.up.weight``
(older diffusers), ``<component>.<module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT-backed
diffusers), optional ``<component>.<module>.alpha`` (older tools; ComfyUI reads them), and the attention-processor
form ``<attn>.processor.to_q_lora.down.weight`` (→ module ``<attn>.to_q``, ``to_out_lora`` → ``to_out.0``).

Rank and alpha live where diffusers keeps them: the ``lora_adapter_metadata`` safetensors header entry
(``diffusers/loaders/lora_base.py``: ``_save_lora_weights`` packs each component's ``LoraConfig`` kwargs with
``_pack_dict_with_prefix``, so the JSON object is flat — ``{"unet.r": 4, "unet.lora_alpha": 8, "unet.rank_pattern":
{…}, "unet.alpha_pattern": {…}, "unet.target_modules": […], "text_encoder.r": …}``; ``load_lora_adapter`` /
``_load_lora_into_text_encoder`` strip ``<component>.`` and build ``LoraConfig(**metadata)`` from what is left).
diffusers' SD/SDXL ``load_lora_weights`` refuses any key without ``lora`` in it ("Invalid LoRA checkpoint"), so
``.alpha`` keys are never written. Without metadata this diffusers applies scale 1 per layer (``get_peft_kwargs``
mirrors the ranks into the alphas).

Text encoders: transformers 5's ``CLIPTextModel`` has no ``text_model.`` level and diffusers' text-encoder loader
strips ``text_model.`` from the keys only for a model without one (``CLIPTextModelWithProjection`` keeps it), so
CLIP layers are written ``text_encoder.text_model.encoder.layers.N…`` (loads in every version) and their metadata
names (``target_modules`` suffixes, ``rank_pattern`` / ``alpha_pattern`` regexes) match both layouts.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats.common import (
    alpha_for,
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
from loratools.formats.naming import (
    CLIP_FLAT,
    COMPONENTS,
    clip_text_model_path,
    layer_component,
    pattern_key,
    split_component,
)
from loratools.formats.spec import AdapterFormat, WriteOptions

_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?:lora\.(?P<du>down|up)\.weight|(?P<ab>lora_A|lora_B)\.weight|(?P<alpha>alpha))$"
)
#: safetensors header entry where diffusers keeps each component's LoraConfig kwargs (diffusers' own constant)
METADATA_KEY = "lora_adapter_metadata"
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
    configs = _metadata_configs(adapter.metadata.pop(METADATA_KEY, None), source)
    for mod, p in parts.items():
        layer = lora_from_parts(p, f"{source}: {mod}", ("lora down", "lora up"))
        component, path = split_component(mod)
        layer.meta["component"] = component
        config = configs.get(component) if component else configs.get(None)
        if config is not None:
            _apply_config(adapter, layer, mod, path, config, "alpha" in p)
        adapter.layers[mod] = layer
    take_embedding_marks(adapter)
    # transformers 5 CLIPTextModel paths (a file diffusers saved from one): the canonical CLIP path keeps text_model.
    renamed: dict[str, Layer] = {}
    for n, la in adapter.layers.items():
        if _canonical(n) in renamed:
            raise LoraToolsError(f"{source}: {n} and {_canonical(n)} are the same CLIP module (with and without text_model.)")
        renamed[_canonical(n)] = la
    adapter.layers = renamed
    note_zero_alphas(adapter)
    components = {layer.meta["component"] for layer in adapter.layers.values()}
    if len(components) == 1 and None not in components:
        # one model only: name layers by their module path in that model; the writer re-adds the prefix
        adapter.layers = {split_component(n)[1]: la for n, la in adapter.layers.items()}
    return adapter


def _canonical(name: str) -> str:
    component, path = split_component(name)
    if component and component.startswith("text_encoder"):
        return f"{component}.{clip_text_model_path(path)}"
    return name


def _metadata_configs(text: str | None, source: str) -> dict[str | None, dict]:
    """``lora_adapter_metadata`` → {component: LoraConfig kwargs}; a model-level file (``save_lora_adapter``: keys
    and metadata without a component) gives them under None."""
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LoraToolsError(f"{source}: metadata {METADATA_KEY} is not valid JSON ({exc.msg})") from None
    if not isinstance(meta, dict):
        raise LoraToolsError(f"{source}: metadata {METADATA_KEY} must be a JSON object")
    configs: dict[str | None, dict] = {}
    for key, value in meta.items():
        component, field = key.split(".", 1) if "." in key else (None, key)
        if component not in COMPONENTS:
            component, field = None, key
        configs.setdefault(component, {})[field] = value
    for component, config in configs.items():
        _check_config(config, f"{source}: metadata {METADATA_KEY}", f"{component}." if component else "")
    return configs


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_config(config: dict, label: str, prefix: str) -> None:
    """One line naming the field for a badly typed rank / alpha field (what LoraConfig would choke on)."""
    rank = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    checks = {
        "r": (rank, "a positive integer"),
        "lora_alpha": (_number, "a number"),
        "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
        "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(map(rank, v.values()))),
                         "an object mapping patterns to positive integer ranks"),
        "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(map(_number, v.values()))),
                          "an object mapping patterns to numbers"),
    }
    for field, (ok, what) in checks.items():
        if field in config and not ok(config[field]):
            raise LoraToolsError(f"{label}: {prefix}{field} must be {what}, got {json.dumps(config[field])[:80]}")
    for field in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(field) or {}:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LoraToolsError(f"{label}: {prefix}{field} pattern {pattern!r} is not a valid regex ({exc})") from None


def _apply_config(adapter: Adapter, layer: LoraLayer, name: str, path: str, config: dict, has_alpha: bool) -> None:
    """A layer's alpha / rsLoRA from its component's LoraConfig kwargs, as PEFT gives them to the module at ``path``
    (``rank_pattern`` / ``alpha_pattern`` through PEFT's ``get_pattern_key``; LoraConfig's defaults r = lora_alpha = 8).
    A stored ``.alpha`` tensor (older tools, ComfyUI) stays the layer's alpha; a disagreement is a warning."""
    r = config.get("r", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = pattern_key(rank_pattern, path), pattern_key(alpha_pattern, path)
    expect_r = rank_pattern[rk] if rk is not None else r
    if expect_r != layer.rank:
        adapter.warnings.append(f"{name}: tensors have rank {layer.rank} but {METADATA_KEY} says r={expect_r} "
                                f"(diffusers cannot load it); using {layer.rank}")
    alpha = float(alpha_pattern[ak] if ak is not None else config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora") or False)
    if has_alpha:
        if layer.rslora != rslora or layer.effective_alpha != alpha:
            adapter.warnings.append(f"{name}: .alpha tensor ({layer.effective_alpha:g}) disagrees with {METADATA_KEY} "
                                    f"(lora_alpha {alpha:g}{', rsLoRA' if rslora else ''}); using the .alpha tensor")
        return
    layer.alpha, layer.rslora = alpha, rslora


def _metadata_name(component: str, path: str) -> str:
    """The module name a component's LoraConfig should use: CLIP layers without ``text_model.`` (a suffix of the
    path in both transformers layouts)."""
    if component.startswith("text_encoder") and path.startswith("text_model.") and CLIP_FLAT.match(path[11:]):
        return path[11:]
    return path


def _pattern(component: str, path: str) -> str:
    """A rank / alpha pattern for exactly one module: anchored (``^``, as diffusers' own rank patterns are) so that a
    path that ends another (Flux ``proj_out`` / ``single_transformer_blocks.0.proj_out``) matches only itself; CLIP
    layers with or without ``text_model.``."""
    name = _metadata_name(component, path)
    return ("^(?:text_model\\.)?" if name != path else "^") + re.escape(name)


def _json_number(v: float) -> int | float:
    return int(v) if float(v).is_integer() and abs(v) < 2**53 else float(v)


def adapter_metadata(layers: dict[str, list[tuple[str, LoraLayer]]]) -> dict[str, object]:
    """diffusers' ``lora_adapter_metadata`` for {component: [(module path, layer)]}: each component's LoraConfig
    kwargs (r, lora_alpha, use_rslora, target_modules, rank_pattern, alpha_pattern: the most common rank and alpha,
    patterns for the others), packed ``<component>.<field>`` as diffusers' ``_pack_dict_with_prefix`` does."""
    meta: dict[str, object] = {}
    for component, items in sorted(layers.items()):
        rslora = Counter(layer.rslora for _, layer in items).most_common(1)[0][0]
        ranks = {path: layer.rank for path, layer in items}
        alphas = {path: alpha_for(layer, rslora) for path, layer in items}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        config = {
            "r": r, "lora_alpha": _json_number(alpha), "use_rslora": rslora,
            "target_modules": sorted({_metadata_name(component, p) for p in ranks}),
            "rank_pattern": {_pattern(component, p): v for p, v in ranks.items() if v != r},
            "alpha_pattern": {_pattern(component, p): _json_number(v) for p, v in alphas.items() if v != alpha},
        }
        meta.update({f"{component}.{k}": v for k, v in config.items()})
    return meta


def write(adapter: Adapter, out: Path, force: bool = False, options: WriteOptions = WriteOptions()) -> None:
    dtype, component, force_component = options.dtype, options.component, options.force_component
    check_resolved(adapter)
    tensors: dict[str, torch.Tensor] = {}
    embeddings: list[str] = []
    by_component: dict[str, list[tuple[str, LoraLayer]]] = {}
    for name, layer in adapter.layers.items():
        comp = layer_component(name, layer, component, force_component)
        path = split_component(name)[1]
        if comp.startswith("text_encoder"):
            path = clip_text_model_path(path)
        stem = f"{comp}.{path}"
        if stem + ".lora_A.weight" in tensors:
            raise LoraToolsError(f"two layers are written as {stem} (one named with text_model., one without)")
        by_component.setdefault(comp, []).append((path, layer))
        if layer.embedding:
            embeddings.append(stem)
        tensors[stem + ".lora_A.weight"] = layer.down if dtype is None else layer.down.to(dtype)
        tensors[stem + ".lora_B.weight"] = layer.up if dtype is None else layer.up.to(dtype)
    extra_meta = embed_extra_tensors(adapter, tensors, "diffusers")
    metadata = {**embed_peft_config(adapter, adapter.metadata), **embedding_metadata(embeddings), **extra_meta}
    if by_component:
        metadata[METADATA_KEY] = json.dumps(adapter_metadata(by_component), sort_keys=True)
    with atomic_path(out, force, is_dir=False) as tmp:
        save_safetensors(tensors, tmp, metadata)


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
