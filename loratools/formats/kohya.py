"""kohya / sd-scripts single-file LoRA (and LoCon): one ``.safetensors`` with mangled names.

Keys: ``<stem>.lora_down.weight`` [r, in(, kh, kw)], ``<stem>.lora_up.weight`` [out, r(, 1, 1)],
``<stem>.alpha`` (0-d; missing means alpha = r, i.e. scale 1), where ``<stem>`` is a prefix
(``lora_unet_``, ``lora_te_``, ``lora_te1_``, ``lora_te2_``...) plus the module path with ``.``
replaced by ``_``. That mangling is not invertible, so names stay as stems until they are resolved
against a base checkpoint's module list (:func:`loratools.formats.resolve_names`).
``ss_*`` metadata is kept verbatim and only rewritten where the layers changed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.families import FAMILIES, naming_for
from loratools.formats.common import (
    atomic_path,
    embed_extra_tensors,
    embed_peft_config,
    embedding_metadata,
    family_of_metadata,
    lora_from_parts,
    note_zero_alphas,
    read_single_file,
    save_safetensors,
    take_embedding_marks,
    take_peft_config,
)
from loratools.formats.fused import fuse_for_writing, is_grouped
from loratools.formats.naming import (
    COMPONENT_PREFIX,
    layer_component,
    mangle,
    split_component,
    split_prefix,
    tag_stem,
)
from loratools.formats.resolve import layer_naming
from loratools.formats.spec import AdapterFormat, WriteOptions

#: model family → (ss_base_model_version, modelspec architecture), as sd-scripts (library/sai_model_spec.py) writes them
SAI_METADATA = {
    "sd15": ("sd_v1", "stable-diffusion-v1"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
}
LORA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
def is_kohya_key(key: str) -> bool:
    """A plain kohya LoRA key: ``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (no dot in the stem)."""
    stem, _, suffix = key.partition(".")
    return bool(stem) and "." not in stem and suffix in LORA_SUFFIXES


def read_tensors_map(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, _, suffix = key.partition(".")
        if suffix not in LORA_SUFFIXES:
            raise LoraToolsError(f"{source}: unknown key layout {key!r} (expected <stem>.lora_down.weight / .lora_up.weight / .alpha)")
        groups.setdefault(stem, {})[LORA_SUFFIXES[suffix]] = t
    adapter = Adapter(layers={}, format="kohya", metadata=dict(metadata), source=source, resolved=False,
                      provenance={"family": family_of_metadata(metadata)})
    take_peft_config(adapter)
    for stem, p in groups.items():
        layer = lora_from_parts(p, f"{source}: {stem}", ("lora_down.weight", "lora_up.weight"))
        adapter.layers[stem] = tag_stem(layer, stem)
    if not adapter.layers:
        raise LoraToolsError(f"{source}: no LoRA tensors found")
    take_embedding_marks(adapter)
    note_zero_alphas(adapter)
    _check_metadata(adapter)
    return adapter


def _check_metadata(adapter: Adapter) -> None:
    """Warn where ss_network_alpha / ss_network_dim disagree with the tensors (a silent 16× trap)."""
    meta = adapter.metadata
    linear = [la for la in adapter.layers.values() if not la.is_conv]
    alphas = Counter(0.0 if la.meta.get("alpha_zero") else la.alpha for la in linear)
    ranks = Counter(la.rank for la in linear)
    if "ss_network_alpha" in meta and alphas:
        try:
            meta_alpha = float(meta["ss_network_alpha"])
        except ValueError:
            meta_alpha = None  # "Dynamic" and friends
        tensor_alpha = alphas.most_common(1)[0][0]
        if meta_alpha is not None and tensor_alpha is not None and abs(meta_alpha - tensor_alpha) > 1e-6 * abs(meta_alpha):
            adapter.warnings.append(
                f"alpha disagrees: metadata ss_network_alpha={meta['ss_network_alpha']} but .alpha tensors say {tensor_alpha:g}; using the tensors"
            )
        if meta_alpha is not None and tensor_alpha is None:
            adapter.warnings.append(
                f"no .alpha tensors (scale 1) but metadata ss_network_alpha={meta['ss_network_alpha']}; using scale 1 as loaders do"
            )
    if "ss_network_dim" in meta and ranks:
        try:
            meta_dim = int(float(meta["ss_network_dim"]))
        except ValueError:
            meta_dim = None
        if meta_dim is not None and len(ranks) == 1 and meta_dim not in ranks:
            adapter.warnings.append(
                f"rank disagrees: metadata ss_network_dim={meta_dim} but tensors have rank {next(iter(ranks))}"
            )


def stem_for(name: str, layer: LoraLayer, resolved: bool, prefix: str | None, component: str | None = None,
             force: bool = False) -> str:
    """The kohya stem of a layer. ``component`` is the pipeline component for layers that carry none; with
    ``force`` (the user's ``--component``) it replaces whatever component the layer had."""
    stem = layer.meta.get("kohya_stem")
    if force and component and prefix is None:
        prefix = COMPONENT_PREFIX[component]
        if not resolved:  # the name is a stem itself: swap its prefix
            return prefix + split_prefix(stem or name)[1]
    if stem and (not resolved or split_prefix(stem)[1] == mangle(split_component(name)[1])) and prefix is None:
        return stem
    if not resolved:
        return name
    owner = layer_component(name, layer, component)
    return (prefix or COMPONENT_PREFIX.get(owner, "lora_unet_")) + mangle(split_component(name)[1])


def family_stem(naming, name: str, layer: Layer, style: str | None) -> str | None:
    """The stem a model family gives a layer with a canonical name of that family (None if it has none): the
    layer's own source stem when it names the same module and no ``style`` is asked (bit-exact round trips),
    else the family's stem in ``style`` (default "diffusers")."""
    if naming is None or not naming.is_canonical(name):
        return None
    source = layer.meta.get("kohya_stem")
    if style is None and source and naming.resolve(source) == name:
        return source
    return naming.kohya_stem(name, style or "diffusers")


def _text_encoder_stem(family: str | None, naming, name: str, layer: Layer) -> str | None:
    """The stem of a text-encoder layer of a family that names it with its own prefix (Flux's CLIP-L:
    ``lora_te1_``), the layer's source stem where it has one; None otherwise."""
    prefix = getattr(FAMILIES.get(family or ""), "kohya_text_encoder_prefix", None)
    if naming is None or prefix is None or split_component(name)[0] != "text_encoder":
        return None
    return layer.meta.get("kohya_stem") or prefix + mangle(split_component(name)[1])


def _naming(adapter: Adapter, options: WriteOptions):
    """The adapter family's names, unless --component / --kohya-prefix ask for plain mangled stems."""
    plain = options.force_component or options.kohya_prefix is not None
    return naming_for(adapter.family) if adapter.family and not plain else None


def _style(adapter: Adapter, naming, options: WriteOptions) -> str | None:
    """The kohya stem style: asked, else (DiT families) the input's own where every layer came in OneTrainer's
    ``lora_transformer_`` stems, else the family's default (Flux: sd-scripts' "original")."""
    if options.kohya_style or naming is None or not is_grouped(naming):
        return options.kohya_style
    if all(la.meta.get("convention") == "kohya_diffusers" for la in adapter.layers.values()):
        return "diffusers"
    return getattr(naming, "kohya_default_style", "original")


def fused_layers(adapter: Adapter, options: WriteOptions) -> tuple[dict[str, Layer], list[str]] | None:
    """A DiT family's layers in "original" style: one block-diagonal LoRA per fused BFL tensor; else None."""
    naming = _naming(adapter, options)
    if naming is None or not is_grouped(naming) or _style(adapter, naming, options) != "original":
        return None
    return fuse_for_writing(adapter.layers, layer_naming(adapter.family, adapter))


def write(adapter: Adapter, out: Path, force: bool = False, options: WriteOptions = WriteOptions()) -> None:
    dtype, prefix, component, force_component = (options.dtype, options.kohya_prefix, options.component,
                                                  options.force_component)
    naming = _naming(adapter, options)
    style = _style(adapter, naming, options)
    fused = fused_layers(adapter, options)
    layers = adapter.layers if fused is None else fused[0]
    if fused is not None:
        adapter.warnings.extend(fused[1])
    tensors: dict[str, torch.Tensor] = {}
    embeddings: list[str] = []
    for name, layer in layers.items():
        stem = (family_stem(naming, name, layer, style) or _text_encoder_stem(adapter.family, naming, name, layer)
                or stem_for(name, layer, adapter.resolved, prefix, component, force_component))
        if layer.magnitude is not None:  # LyCORIS dora_scale: [out, 1, …] per output row, [1, in, …] per input column
            mag = layer.magnitude.reshape(-1)
            shape = ((layer.shape[0], *([1] * (len(layer.shape) - 1))) if layer.magnitude_axis == "out"
                     else (1, mag.numel(), *([1] * (len(layer.shape) - 2))))
            tensors[stem + ".dora_scale"] = mag.reshape(shape) if dtype is None else mag.reshape(shape).to(dtype)
        if stem + ".lora_down.weight" in tensors:
            raise LoraToolsError(f"two layers map to the same kohya name {stem}")
        if layer.embedding:
            embeddings.append(stem)
        tensors[stem + ".lora_down.weight"] = layer.down if dtype is None else layer.down.to(dtype)
        tensors[stem + ".lora_up.weight"] = layer.up if dtype is None else layer.up.to(dtype)
        alpha = layer.alpha if not layer.rslora else layer.scale * layer.rank  # kohya has no rsLoRA
        if alpha is not None:
            # alpha keeps its stored dtype on a plain copy (bit-exact round trips); any alpha that was
            # computed (rsLoRA → kohya) or re-typed is written in float32 so the scale is not rounded to fp16
            kept = layer.meta.get("alpha_dtype") if not layer.rslora and dtype is None else None
            adtype = kept or torch.float32
            tensors[stem + ".alpha"] = torch.tensor(alpha, dtype=adtype)
    extra_meta = embed_extra_tensors(adapter, tensors, "kohya")
    with atomic_path(out, force, is_dir=False) as tmp:
        save_safetensors(tensors, tmp, {**build_metadata(adapter), **embedding_metadata(embeddings), **extra_meta})


def build_metadata(adapter: Adapter) -> dict[str, str]:
    """Keep every ``ss_*`` key; rewrite dim/alpha only where they no longer describe the layers."""
    meta = embed_peft_config(adapter, adapter.metadata)
    linear = [la for la in adapter.layers.values() if not la.is_conv]
    conv = [la for la in adapter.layers.values() if la.is_conv]
    meta.setdefault("ss_network_module", "networks.lora")
    sure = adapter.provenance.get("family_from") != "names-ambiguous"  # SD1 vs SD2 undecided: say nothing
    if adapter.family in SAI_METADATA and sure:  # what A1111/Forge and ComfyUI filter LoRAs on (sd-scripts' values)
        version, arch = SAI_METADATA[adapter.family]
        meta.setdefault("ss_base_model_version", version)
        meta.setdefault("ss_v2", str(adapter.family == "sd2"))
        meta.setdefault("modelspec.sai_model_spec", "1.0.0")
        meta.setdefault("modelspec.architecture", f"{arch}/lora")
    for key, field in (("ss_training_comment", "comment"), ("ss_output_name", "output_name")):
        if adapter.provenance.get(field):
            meta.setdefault(key, str(adapter.provenance[field]))
    for layers, dim_key, alpha_key in ((linear, "ss_network_dim", "ss_network_alpha"),):
        if not layers:
            continue
        ranks = {la.rank for la in layers}
        alphas = {la.effective_alpha if not la.rslora else la.scale * la.rank for la in layers}
        dim = str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic"
        alpha = _fmt(next(iter(alphas))) if len(alphas) == 1 else "Dynamic"
        if _differs(meta.get(dim_key), dim, {float(r) for r in ranks}):
            meta[dim_key] = dim
        if _differs(meta.get(alpha_key), alpha, alphas):
            meta[alpha_key] = alpha
    if conv:
        try:
            args = json.loads(meta.get("ss_network_args", "{}"))
        except json.JSONDecodeError:
            args = {}
        ranks = {la.rank for la in conv}
        alphas = {la.effective_alpha for la in conv}
        new = {"conv_dim": str(max(ranks)), "conv_alpha": _fmt(max(alphas))}
        if any(str(args.get(k)) != v for k, v in new.items()) and not (len(ranks) > 1 and "conv_dim" in args):
            args.update(new)
            meta["ss_network_args"] = json.dumps(args)
    return meta


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _differs(old: str | None, new: str, present: set[float]) -> bool:
    """Whether metadata value ``old`` no longer describes the layers (``present``: their values)."""
    if old is None:
        return True
    if new == "Dynamic":
        try:
            return old != "Dynamic" and float(old) not in present
        except ValueError:
            return old != "Dynamic"
    try:
        return float(old) != float(new)
    except ValueError:
        return True


def refuse(name: str, layer: Layer) -> str | None:
    if not isinstance(layer, LoraLayer):
        return f"{layer.kind} layers have no kohya LoRA form; convert them to LoRA first"
    return None


FORMAT = AdapterFormat(
    name="kohya", summary="kohya / sd-scripts single .safetensors (lora_unet_… stems, .alpha; LoCon; dora_scale)",
    folder=False, read=lambda path: read_single_file(path, read_tensors_map), write=write, claims=is_kohya_key,
    refuse=refuse, dora="lycoris", priority=1, fused_layers=fused_layers,
)
