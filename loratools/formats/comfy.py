"""ComfyUI-native LoRA keys: the model's own state-dict key without ``.weight``, one ``.safetensors``.

Keys: ``<key>.lora_down.weight`` [r, in(, kh, kw)], ``<key>.lora_up.weight`` [out, r(, 1, 1)] and ``<key>.alpha``
(0-d), where ``<key>`` is the module's key in ComfyUI's model: ``diffusion_model.<original UNet path>``
(``diffusion_model.input_blocks.1.1.proj_in``) or ``text_encoders.<clip>.transformer.<HF path>`` (``clip_l`` SD1.x
and SDXL's CLIP-L, ``clip_h`` SD2's OpenCLIP-H, ``clip_g`` SDXL's bigG). These are the generic keys ComfyUI's
``comfy/lora.py`` maps for every weight of its models (``model_lora_keys_unet``: ``diffusion_model.X`` for each
``diffusion_model.X.weight``; ``model_lora_keys_clip``: ``text_encoders.<clip key minus .weight>``). The reader also
takes ``.lora_B.weight`` / ``.lora_A.weight``, which ``load_lora`` accepts too.

Alpha: ``load_lora`` reads ``<key>.alpha`` and ``calculate_weight`` applies ``alpha / rank`` (rank = the down
factor's rows); without one the scale is 1, and a stored 0 gives scale 0 (loratools reads 0 as alpha = rank, as
sd-scripts does, and warns). The writer always writes ``.alpha`` (alpha = rank where the layer has none: scale 1).

DoRA is refused: ComfyUI's ``dora_scale`` formula (``weight_adapter/base.py`` ``weight_decompose``) takes the norm of
the *base* weight for an output-axis magnitude, which is neither PEFT's nor LyCORIS's DoRA (use ``--fold-dora``).

Readers name layers by their ComfyUI key; :mod:`loratools.formats.resolve` renames the ones a Stable Diffusion family
knows to canonical names. The writer maps canonical names back through the adapter's family
(``SDNaming.comfy_key``); a layer that still carries a ComfyUI key (a module no family describes) is written as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.families import DIT_FAMILIES, FAMILIES, naming_for
from loratools.formats.common import (
    atomic_path,
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
from loratools.formats.fused import fuse_for_writing, is_grouped
from loratools.formats.resolve import family_by_width, layer_naming
from loratools.formats.spec import AdapterFormat, WriteOptions

#: the roots of ComfyUI's LoRA keys: the diffusion model and the text encoders (and the checkpoint's own
#: ``model.diffusion_model.`` keys, which DiT LoRAs saved from a full ComfyUI state dict carry)
ROOTS = ("diffusion_model.", "text_encoders.", "model.diffusion_model.")
#: on-disk suffix → part; the first two are what the writer writes
SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
            ".lora_A.weight": "down", ".lora_B.weight": "up"}
#: ComfyUI CLIP name → pipeline component (SDXL's CLIP-L is ``clip_l``, its bigG ``clip_g``)
CLIP_COMPONENTS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
NEEDS_FAMILY = "comfy output needs a Stable Diffusion family adapter; pass --base CKPT (the SD checkpoint it is for) or --family"


def split_key(key: str) -> tuple[str, str] | None:
    """``(module key, part)`` of a ComfyUI LoRA tensor key, or None if it is not one."""
    if not key.startswith(ROOTS):
        return None
    for suffix, part in SUFFIXES.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            mod = key[: -len(suffix)]
            if mod not in ROOTS and "." in mod:
                return mod, part
    return None


def is_comfy_key(key: str) -> bool:
    return split_key(key) is not None


def is_comfy_name(name: str) -> bool:
    """A layer name that is a ComfyUI module key itself (written as it is)."""
    return name.startswith(ROOTS) and name not in ROOTS


def _component(key: str) -> str | None:
    if key.startswith("diffusion_model."):
        return "unet"
    return CLIP_COMPONENTS.get(key.split(".")[1])


def read_tensors_map(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    disk: dict[str, dict[str, str]] = {}
    for key, t in tensors.items():
        got = split_key(key)
        if got is None:
            raise LoraToolsError(f"{source}: unknown key layout {key!r} (expected diffusion_model.<module> or "
                                 "text_encoders.<clip>.<module> + .lora_down.weight / .lora_up.weight / .alpha)")
        mod, part = got
        if part in groups.setdefault(mod, {}):
            raise LoraToolsError(f"{source}: {mod} has two {part} tensors ({disk[mod][part]!r} and {key!r})")
        groups[mod][part] = t
        disk.setdefault(mod, {})[part] = key
    adapter = Adapter(layers={}, format="comfy", metadata=dict(metadata), source=source)
    take_peft_config(adapter)
    for mod, parts in groups.items():
        names = tuple(disk[mod].get(p, f"{mod}.lora_{p}.weight")[len(mod) + 1:] for p in ("down", "up"))
        layer = lora_from_parts(parts, f"{source}: {mod}", names)
        layer.meta["component"] = _component(mod)
        adapter.layers[mod] = layer
    if not adapter.layers:
        raise LoraToolsError(f"{source}: no LoRA tensors found")
    take_embedding_marks(adapter)
    note_zero_alphas(adapter)
    return adapter


def _canonical_in(family: str, name: str) -> bool:
    return naming_for(family).is_canonical(name)


def _family(adapter: Adapter) -> str | None:
    """The family whose ComfyUI keys the adapter's canonical layers get: the one a base, ``--family``, ComfyUI keys or
    the caller gave; else (a family detected from names, or none) the one every SD family that knows all of its names
    agrees on; where they disagree (SD1 and SD2 share their names but not their CLIP), the one the layer widths tell;
    else an error asking for ``--base``."""
    named = [n for n in adapter.layers if not is_comfy_name(n)]
    sure = not str(adapter.provenance.get("family_from", "")).startswith("names") or all(  # ComfyUI keys name the CLIP
        adapter.layers[n].meta.get("convention") == "comfy" for n in named)
    if not named or (adapter.family is not None and sure):
        return adapter.family
    fits = [f for f in FAMILIES if all(_canonical_in(f, n) for n in named)]
    if adapter.family in fits and adapter.family in DIT_FAMILIES:  # DiTs sharing diffusers names (a Flux LoRA on
        return adapter.family  # the blocks is also a HunyuanVideo one): the detected family (Flux's names on a tie)
    if adapter.family in fits:
        fits.remove(adapter.family)
        fits.insert(0, adapter.family)
    if len({tuple(naming_for(f).comfy_key(n) for n in named) for f in fits}) <= 1:
        return fits[0] if fits else adapter.family
    by_width = family_by_width(adapter)  # ComfyUI's clip_l vs clip_h
    if by_width in fits:
        return by_width
    raise LoraToolsError(f"comfy output: the layers fit several model families ({', '.join(fits)}) whose ComfyUI keys "
                         "differ; pass --base CKPT (the SD checkpoint it is for) or --family")


def _text_encoder_naming(family: str | None):
    """The names of a family's text encoder where it borrows another family's (Flux's CLIP-L: SD1.x's), else None."""
    other = getattr(FAMILIES.get(family or ""), "text_encoder_family", None)
    return naming_for(other) if other else None


def comfy_keys(adapter: Adapter, layers: dict[str, Layer] | None = None) -> dict[str, str]:
    """Layer name → ComfyUI module key (of ``layers``, default the adapter's), or a one-line error for a layer no
    family names."""
    family = _family(adapter)
    naming = naming_for(family) if family in FAMILIES else None
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name in adapter.layers if layers is None else layers:
        if is_comfy_name(name):
            key = name
        elif naming is not None and naming.is_canonical(name):
            key = naming.comfy_key(name)
        elif (te := _text_encoder_naming(family)) is not None and te.is_canonical(name):  # Flux's CLIP-L: clip_l
            key = te.comfy_key(name)
        elif naming is None:
            raise LoraToolsError(f"{name}: {NEEDS_FAMILY}")
        else:
            raise LoraToolsError(f"{name}: not a module of the {family} family, so it has no ComfyUI key")
        if key in seen:
            raise LoraToolsError(f"{name}: names the ComfyUI module {key}, which {seen[key]} already targets")
        seen[key] = name
        out[name] = key
    return out


def fused_layers(adapter: Adapter, options: WriteOptions) -> tuple[dict[str, Layer], list[str]] | None:
    """A DiT family's layers as ComfyUI keys hold them: one block-diagonal LoRA per fused BFL tensor; else None."""
    family = _family(adapter)
    if family not in FAMILIES or not is_grouped(naming_for(family)):
        return None
    return fuse_for_writing(adapter.layers, layer_naming(family, adapter))


def write(adapter: Adapter, out: Path, force: bool = False, options: WriteOptions = WriteOptions()) -> None:
    if options.force_component:
        raise LoraToolsError("--component does not apply to comfy output: ComfyUI keys come from the model family")
    if options.kohya_prefix:
        raise LoraToolsError("--kohya-prefix does not apply to comfy output")
    dtype = options.dtype
    fused = fused_layers(adapter, options)
    layers = adapter.layers if fused is None else fused[0]
    if fused is not None:
        adapter.warnings.extend(fused[1])
    keys = comfy_keys(adapter, layers)
    tensors: dict[str, torch.Tensor] = {}
    embeddings: list[str] = []
    for name, layer in layers.items():
        key = keys[name]
        if layer.embedding:
            embeddings.append(key)
        tensors[key + ".lora_down.weight"] = layer.down if dtype is None else layer.down.to(dtype)
        tensors[key + ".lora_up.weight"] = layer.up if dtype is None else layer.up.to(dtype)
        # ComfyUI applies alpha / rank and scale 1 without an alpha: always write the alpha that gives the scale.
        # A stored alpha keeps its dtype on a plain copy (bit-exact round trips); a computed one is float32.
        plain = layer.alpha is not None and not layer.rslora
        alpha = layer.scale * layer.rank if layer.rslora else layer.effective_alpha
        kept = layer.meta.get("alpha_dtype") if plain and dtype is None else None
        tensors[key + ".alpha"] = torch.tensor(alpha, dtype=kept or torch.float32)
    extra_meta = embed_extra_tensors(adapter, tensors, "comfy")
    meta = {**embed_peft_config(adapter, adapter.metadata), **embedding_metadata(embeddings), **extra_meta}
    with atomic_path(out, force, is_dir=False) as tmp:
        save_safetensors(tensors, tmp, meta)


def refuse(name: str, layer: Layer) -> str | None:
    if not isinstance(layer, LoraLayer):
        return f"{layer.kind} layers have no comfy LoRA form; convert them to LoRA first"
    if layer.magnitude is not None:
        return ("DoRA magnitudes cannot be written in comfy format: ComfyUI's dora_scale formula is neither PEFT's "
                "nor LyCORIS's (use --fold-dora)")
    if not is_comfy_name(name) and not any(_canonical_in(f, name) for f in FAMILIES):
        return NEEDS_FAMILY
    return None


FORMAT = AdapterFormat(
    name="comfy", summary="ComfyUI-native single .safetensors (diffusion_model.… / text_encoders.clip_l.… keys, .alpha)",
    folder=False, read=lambda path: read_single_file(path, read_tensors_map), write=write, claims=is_comfy_key,
    refuse=refuse, fused_layers=fused_layers,
)
