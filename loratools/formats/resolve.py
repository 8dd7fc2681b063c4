"""Layer names: from a format's convention to canonical module names, and against a base checkpoint.

Readers name layers as their files do (kohya stems, ComfyUI keys, module paths). Here they get the names every
operation uses (DESIGN.md §8):

1. **A model family** (:mod:`loratools.families`) that knows the names — given by ``--family``, taken from the base
   checkpoint, or detected from the layer names — renames every layer it knows to its canonical name
   (``unet.down_blocks.0.attentions.0.proj_in``, ``text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj``),
   whichever convention it came in: kohya stems of either style, ComfyUI keys, diffusers keys, original checkpoint
   keys. The source stem stays in ``layer.meta["kohya_stem"]`` so a kohya file written back is bit-exact.
2. **Against a base**, whatever the family did not name is matched generically: module paths as they are, kohya
   stems by their mangled form (with or without a wrapper prefix; several candidates is an error).
3. A base that none of the layers matches is an error naming a few of them and the family detected (the adapter
   would silently do nothing); partial matches are listed in a warning.
"""

from __future__ import annotations

import re

from loratools.adapter import Adapter
from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError
from loratools.families import FAMILIES, detect_adapter, family_name, naming_for, naming_for_layers
from loratools.families.dit import DiTFamilyMixin, original_conventions
from loratools.formats.experts import expert_matcher
from loratools.formats.fused import is_grouped, row_blocks, split_layer
from loratools.formats.naming import KOHYA_PREFIXES, mangle, split_component, split_prefix

AUTO = "auto"


def resolve(adapter: Adapter, base: Checkpoint | None, family: str | None = None) -> None:
    """Canonical names for ``adapter``'s layers, in place (see the module docstring)."""
    naming, fam, source = family_naming(adapter, base, family)
    if naming is not None:
        _apply_family(adapter, naming, fam, base)
        if adapter.family:  # how sure the family is: SD1 and SD2 share every name; a base, --family or metadata tells
            adapter.provenance["family_from"] = source
    if base is not None:
        resolve_names(adapter, base)


def check_family(base, family: str | None) -> None:
    """Refuse an explicit ``--family`` that is unknown or contradicts the family of the ``base`` checkpoint."""
    family_naming(Adapter(layers={}, format=""), None if base is None else Checkpoint(base), family)


def family_naming(adapter: Adapter, base: Checkpoint | None, family: str | None):
    """``(naming, family name, where it came from)`` that names ``adapter``'s layers, or ``(None, None, None)``.

    In order: the base checkpoint's family ("base"), ``--family`` ("option"), the family the adapter's own metadata
    names (``adapter.provenance["family"]``, e.g. kohya's ``ss_base_model_version``: "metadata"), the family whose
    names the adapter uses ("names")."""
    explicit = family not in (None, AUTO)
    family = family_name(family) if explicit else family
    if explicit and family not in FAMILIES:
        raise LoraToolsError(f"unknown --family {family!r}; expected auto or one of {', '.join(FAMILIES)}")
    base_family = base.family() if base is not None else None
    if explicit and base_family is not None and base_family[0] != family:
        raise LoraToolsError(f"--family {family}, but the base {base.path} is a {base_family[0]} checkpoint")
    if base is not None and base.naming() is not None:
        _check_same_family(adapter, base_family[0], base)
        return base.naming(), base_family[0], "base"
    if explicit:
        return layer_naming(family, adapter), family, "option"
    if base_family is not None:  # a diffusers layout: the names of a pipeline folder's own structure where known
        return base.family_naming() or layer_naming(base_family[0], adapter), base_family[0], "base"
    fits = [f for f in FAMILIES if all(_lookup(naming_for(f), n, la) or _text_encoder_lookup(f, n, la)
                                       for n, la in adapter.layers.items())]
    if not fits:  # a family names an adapter only if it knows every one of its layers (LLM, CLIPModel: none)
        return None, None, None
    hint = adapter.provenance.get("family")
    if hint in fits:  # the adapter's own metadata says which (kohya ss_base_model_version)
        return layer_naming(hint, adapter), hint, "metadata"
    by_width = family_by_width(adapter) if len(fits) > 1 else None
    if by_width not in fits:
        by_width = _dit_by_width(fits, adapter)
    chosen = by_width if by_width in fits else fits[0]
    if by_width not in fits and len({type(FAMILIES[f]) for f in fits}) > 1:  # the families name modules differently
        adapter.warnings.append(f"layer names fit {', '.join(fits)}; read as {chosen} (pass --family or --base to "
                                "choose: conversions write each family's own names)")
    return (layer_naming(chosen, adapter), chosen,
            "names" if len(fits) == 1 or by_width in fits else "names-ambiguous")


def _dit_by_width(fits: list[str], adapter: Adapter) -> str | None:
    """Among DiT families whose names all fit (Flux, SD3, Qwen-Image share ``transformer_blocks.N.attn.to_q``), the
    one family whose own widths the layers have (SD3 1536 / 2432 against Flux's 3072), else None. Only families
    whose structure is read from widths take part (Wan and Qwen-Image fuse nothing: they read none)."""
    sized = [f for f in fits if hasattr(FAMILIES[f], "naming_for_shapes")
             and getattr(type(FAMILIES[f]), "structure_for_shapes", None) is not DiTFamilyMixin.structure_for_shapes]
    if len({type(FAMILIES[f]) for f in sized}) < 2:  # nothing to tell apart by widths
        return None
    own = [f for f in sized if layer_naming(f, adapter).structure == naming_for(f).structure]
    return own[0] if own and len({type(FAMILIES[f]) for f in own}) == 1 else None  # variants of one family: the first


def layer_naming(family: str, adapter: Adapter):
    """The family's name maps in the structure ``adapter``'s layer shapes imply (DiT row slices depend on them)."""
    return naming_for_layers(family, {c: la.shape for n, la in adapter.layers.items() for c in _candidates(n, la)})


#: SD1.x and SD2.x share every canonical name but not their text encoder: the width of the text encoder and of the
#: UNet's cross-attention inputs tells them apart (CLIP-L 768, OpenCLIP-H 1024)
WIDTHS = {768: "sd15", 1024: "sd2"}
_WIDTH_LAYER = re.compile(r"(^|\.)(?:unet\..*\.attn2\.to_[kv]|attn2\.to_[kv]|text_model\.encoder\.layers\.\d+\."
                          r"(?:self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc1))$")


def family_by_width(adapter: Adapter) -> str | None:
    """sd15 or sd2 from the input width of cross-attention k/v and text-encoder layers, None if they do not say."""
    widths: set[int] = set()
    naming = naming_for("sd15")  # SD1 and SD2 share every name
    for name, la in adapter.layers.items():
        found = _lookup(naming, name, la)
        canonical = found[0] if found else name  # a canonical name of a layer the default structure lacks
        if _WIDTH_LAYER.search(canonical) and len(la.shape) >= 2:
            widths.add(la.shape[1])
    found = {WIDTHS.get(w) for w in widths}
    return found.pop() if len(found) == 1 else None


def _candidates(name: str, layer) -> list[str]:
    """Names a layer may be known by: with the component its source file gave it first (a diffusers file of one
    component drops it: ``text_encoder_2`` must not become the first text encoder), then as read, then its stem."""
    out = []
    component = layer.meta.get("component")
    if component and split_component(name)[0] is None:
        out.append(f"{component}.{name}")
    out.append(name)
    if layer.meta.get("kohya_stem"):
        out.append(layer.meta["kohya_stem"])
    return out


def _lookup(naming, name: str, layer, groups: bool = True):
    """``(canonical, convention)`` of a layer in a family's naming (with ``groups``: the first module of a fused
    name, for telling which family knows a layer), or None."""
    for cand in _candidates(name, layer):
        found = naming.lookup(cand)
        if found:
            return found
    group = _group(naming, name, layer) if groups else None
    return (group[0][0].canonical, group[1]) if group else None


def _text_encoder_lookup(family: str, name: str, layer):
    """``(canonical, convention)`` of a text-encoder layer of a family that borrows another family's text-encoder
    names (Flux's CLIP-L: SD1.x's), or None."""
    other = getattr(FAMILIES.get(family), "text_encoder_family", None)
    found = _lookup(naming_for(other), name, layer, groups=False) if other else None
    return found if found and found[0].startswith("text_encoder.") else None


def _group(naming, name: str, layer):
    """``(modules, convention)`` of a layer named after a fused or reordered tensor of the family, else None."""
    if not is_grouped(naming):
        return None
    for cand in _candidates(name, layer):
        found = naming.lookup_group(cand)
        if found:
            mods, convention = found
            if len(mods) > 1 or (row_blocks(mods[0]) is not None and convention in original_conventions(naming)):
                return found
            return None
    return None


def _check_same_family(adapter: Adapter, family: str, base: Checkpoint) -> None:
    """Refuse an adapter whose names another family knows better than the base's (an SDXL LoRA on an SD1.5 file)."""
    found = detect_adapter([n for name, la in adapter.layers.items() for n in (name, la.meta.get("kohya_stem")) if n])
    if found is None or found[0] == family:
        return

    def hits(fam: str) -> int:
        nm = naming_for(fam)
        return sum(1 for n, la in adapter.layers.items() if _lookup(nm, n, la))

    theirs, ours = hits(found[0]), hits(family)
    if theirs > ours:
        raise LoraToolsError(
            f"{adapter.source}: a {found[0]} adapter ({theirs} of {len(adapter.layers)} layers have {found[0]} names, "
            f"{ours} fit {family}), but the base {base.path} is a {family} checkpoint"
        )


def _apply_family(adapter: Adapter, naming, family: str, base: Checkpoint | None) -> None:
    renamed: dict = {}
    hits = 0
    for name, layer in adapter.layers.items():
        group = _group(naming, name, layer)
        if group is not None and (base is None or all(base.module_ref(m.canonical) for m in group[0])):
            mods, convention = group  # fused → split, exact (formats/fused.py)
            for canonical, part in split_layer(layer, mods, f"{adapter.source}: {name}", len(mods) > 1).items():
                part.meta["component"] = split_component(canonical)[0]
                part.meta["convention"] = convention
                _put(renamed, canonical, part, name)
            hits += 1
            continue
        found = _lookup(naming, name, layer, groups=False) or _text_encoder_lookup(family, name, layer)
        if found is None or (base is not None and base.module_ref(found[0]) is None):
            _put(renamed, name, layer, name)
            continue
        canonical, convention = found
        layer.meta["component"] = split_component(canonical)[0]
        layer.meta["convention"] = convention
        _put(renamed, canonical, layer, name)
        hits += 1
    adapter.layers = renamed
    if hits:
        adapter.family = family
    adapter.resolved = not any(la.meta.get("kohya_stem") == n for n, la in adapter.layers.items())


def _put(layers: dict, name: str, layer, source_name: str) -> None:
    if name in layers:
        raise LoraToolsError(f"{source_name}: names the module {name}, which another layer of the adapter already targets")
    layers[name] = layer


def resolve_names(adapter: Adapter, base: Checkpoint) -> list[str]:
    """Match the layers no family named to the base's modules, in place. Returns the unmatched names.

    A kohya stem matches a module when their mangled forms are equal, or when one is a ``_``-suffix of
    the other (a base with or without a wrapper prefix); several candidates is an error. No layer matching
    at all is an error: the adapter is for another model.
    """
    refs = base.module_refs()
    by_mangled: dict[str, list[str]] = {}
    for m in refs:
        by_mangled.setdefault(mangle(split_component(m)[1]), []).append(m)
        by_mangled.setdefault(mangle(m), []).append(m)
    named_components = any(split_component(m)[0] for m in refs)
    held = expert_matcher(base)  # per-expert layers of a base with fused 3-D experts
    unmatched: list[str] = []
    renamed: dict = {}
    for name, layer in adapter.layers.items():
        stem = layer.meta.get("kohya_stem")
        if stem is None or stem != name:
            if base.module_ref(name) is None and not held(name):
                unmatched.append(name)
            _put(renamed, name, layer, name)
            continue
        prefix, tail = split_prefix(stem)
        cands = sorted(set(by_mangled.get(tail) or by_mangled.get(stem) or [
            m for mm, ms in by_mangled.items() for m in ms if mm.endswith("_" + tail) or tail.endswith("_" + mm)
        ]))
        component = KOHYA_PREFIXES.get(prefix) if prefix else None
        if component and named_components:  # a base with pipeline components: only the stem's own component
            cands = [c for c in cands if c.startswith(component + ".")]
        shape_ok = [m for m in cands if base.module_shape(m)[: len(layer.shape)] == layer.shape
                    or base.module_shape(m) == layer.shape]
        cands = shape_ok or cands
        if len(cands) > 1:
            raise LoraToolsError(f"{stem}: ambiguous against base, matches {', '.join(cands[:4])}")
        if not cands:
            unmatched.append(name)
            _put(renamed, name, layer, name)
            continue
        _put(renamed, cands[0], layer, stem)
    adapter.layers = renamed
    adapter.resolved = not any(adapter.layers[n].meta.get("kohya_stem") == n for n in unmatched)
    if unmatched and len(unmatched) == len(adapter.layers):
        fam = base.family()
        what = f"a {fam[0]} checkpoint, {fam[1]} layout" if fam else "no known model family"
        raise LoraToolsError(
            f"{adapter.source}: none of its {len(unmatched)} layer(s) matches a module of the base {base.path} ({what}); "
            f"e.g. {', '.join(unmatched[:3])}: an adapter for another model (or pass the right --base / --family)"
        )
    if unmatched:
        adapter.warnings.append(
            f"{len(unmatched)} of {len(adapter.layers)} layer(s) match no module of the base checkpoint: "
            f"{', '.join(unmatched[:5])}{', …' if len(unmatched) > 5 else ''}"
        )
    return unmatched
