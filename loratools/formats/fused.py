"""Fused ↔ split projections, exactly (DESIGN.md §8): one LoRA on a fused checkpoint tensor ↔ LoRAs on its modules.

A model family may store several canonical modules in one tensor by rows (Flux ``double_blocks.N.img_attn.qkv`` =
``attn.to_q``, ``to_k``, ``to_v``; ``single_blocks.N.linear1`` = q, k, v, ``proj_mlp``) or a module's rows in another
order (Flux ``final_layer.adaLN_modulation.1`` = ``norm_out.linear`` with its two halves swapped). The family's module
maps say which (``rows`` / ``row_order``; :func:`loratools.families.flux.take_rows` / ``place_rows``). Conventions
that name those tensors (kohya "original" stems, ComfyUI keys, checkpoint keys) hold one LoRA per *tensor*:

* **fused → split** (:func:`split_layer`, when reading): each module's ``up`` is its rows of the fused ``up``; ``down``
  (and alpha, so the scale) is shared, the rank unchanged. Columns of a module's ``up`` that are exactly zero (a
  block-diagonal stack, see below) are dropped with their ``down`` rows, and a module whose rows are all zero is not
  adapted at all: both change nothing in ΔW, and they make split → fused → split give back the same factors. LoHa /
  LoKr / Tucker layers hand out exact factors ``L, R`` (ΔW = L Rᵀ): ``L``'s rows become a LoRA of that rank. A DoRA
  magnitude per output row is sliced the same way; one per input column has no exact split (an error).
* **split → fused** (:func:`fuse_layers`, when writing): ``down`` = the members' downs stacked, ``up`` =
  block-diagonal (each member's rows, its own columns; members the adapter lacks are zero rows), so the rank is the
  sum of the members' ranks — except where every member has the same ``down`` and scale (an sd-scripts LoRA split
  by diffusers' converter or by loratools): then ``up`` is the members' ups stacked by rows and the rank is kept. Members with one scale keep their factors as they are (alpha = scale × total rank);
  otherwise each member's scale is folded into its block and alpha = total rank (scale 1). A group that came from one
  fused layer unchanged is written as that layer (bit-exact round trips).

Imports nothing from other format modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from loratools.adapter import Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.families.dit import is_canonical
from loratools.families.flux import place_rows, take_rows

#: layer.meta key of a layer on a whole fused / reordered tensor: the canonical modules it holds
FUSED = "fused"
#: layer.meta key: the fused layer a split layer was read from (so an unchanged group is written back as it was)
SPLIT_FROM = "split_from"


def is_grouped(naming: Any) -> bool:
    """Whether a family's naming has modules stored in a shared or reordered tensor (fused ↔ split applies)."""
    return hasattr(naming, "lookup_group")


def row_blocks(m: Any) -> tuple[tuple[int, int], ...] | None:
    """The original row blocks forming module ``m``'s canonical rows, None for a plain 1:1 tensor."""
    blocks = getattr(m, "row_blocks", None)
    if blocks is not None:
        return blocks()
    return (m.rows,) if m.rows is not None else None


def _as_lora(layer: Layer, source: str) -> LoraLayer:
    """A LoRA with the same ΔW as ``layer`` (its own object if it is one): LoHa/LoKr/Tucker through their exact factors."""
    if isinstance(layer, LoraLayer):
        return layer
    if layer.magnitude is not None:
        raise LoraToolsError(f"{source}: a {layer.kind} layer with a DoRA magnitude on a fused tensor has no exact "
                             "split into its modules")
    dtype = layer.dtype if layer.dtype in (torch.float32, torch.float64) else torch.float32
    left, right = layer.factors(torch.float64)
    return LoraLayer(down=right.T.contiguous().to(dtype), up=left.contiguous().to(dtype), alpha=None,
                     meta=dict(layer.meta))


def split_layer(layer: Layer, modules: list[Any], source: str, fused: bool = True) -> dict[str, LoraLayer]:
    """The layers of ``modules`` (canonical name → LoraLayer) from one layer on their shared original tensor.

    ``modules`` are the family's maps of the tensor (``lookup_group``), in row order; ``fused`` False for a name of
    one module whose rows are merely reordered (``norm_out.linear``)."""
    lora = _as_lora(layer, source)
    if lora.is_conv:
        raise LoraToolsError(f"{source}: a conv layer on a fused tensor; only Linear projections are fused")
    if lora.magnitude is not None and lora.magnitude_axis != "out":
        raise LoraToolsError(f"{source}: a DoRA magnitude per input column has no exact split into the fused "
                             f"tensor's modules ({', '.join(m.canonical for m in modules)})")
    total = max(b for m in modules for _, b in (row_blocks(m) or ((0, lora.shape[0]),)))
    if lora.shape[0] != total:
        raise LoraToolsError(f"{source}: up {tuple(lora.up.shape)} has {lora.shape[0]} rows, but the fused tensor of "
                             f"{', '.join(m.canonical for m in modules)} has {total}")
    out: dict[str, LoraLayer] = {}
    trained = bool(lora.up.ne(0).any())  # an all-zero up (a freshly initialised LoRA) keeps every member as it is
    for m in modules:
        up = take_rows(m, lora.up)
        down = lora.down
        if fused and trained:
            keep = up.ne(0).any(dim=0)
            if not bool(keep.all()):
                if not bool(keep.any()) and lora.magnitude is None:
                    continue  # all-zero rows: the adapter does not adapt this module
                up, down = up[:, keep], down[keep]
        alpha = lora.alpha
        rank = int(down.shape[0])
        if alpha is not None and rank != lora.rank:  # same scale at the new rank
            alpha = lora.scale * (math.sqrt(rank) if lora.rslora else rank)
        meta = {k: v for k, v in lora.meta.items() if k != "kohya_stem"}
        meta[SPLIT_FROM] = layer
        mag = None if lora.magnitude is None else take_rows(m, lora.magnitude)
        out[m.canonical] = LoraLayer(down=down, up=up, alpha=alpha, rslora=lora.rslora, magnitude=mag,
                                     magnitude_axis="out", embedding=False, meta=meta)
    return out


def _unchanged_source(layers: list[LoraLayer | None], modules: list[Any]) -> Layer | None:
    """The one fused layer every member was split from unchanged (same shared down), or None."""
    srcs = {id(la.meta.get(SPLIT_FROM)) for la in layers if la is not None}
    src = layers[0].meta.get(SPLIT_FROM) if layers[0] is not None else None
    if src is None or len(srcs) != 1 or not isinstance(src, LoraLayer):
        return None
    again = split_layer(src, modules, "", fused=len(modules) > 1)
    for m, la in zip(modules, layers):
        other = again.get(m.canonical)
        if (la is None) != (other is None):
            return None
        if la is not None and not (la.down is src.down or torch.equal(la.down, other.down)):
            return None
        if la is not None and not (torch.equal(la.up, other.up) and la.alpha == other.alpha
                                   and la.rslora == other.rslora):
            return None
    return src


def fuse_layers(layers: list[LoraLayer | None], modules: list[Any], source: str) -> LoraLayer:
    """One LoRA on the original tensor of ``modules`` (row order) from their layers (None: not adapted)."""
    present = [(m, la) for m, la in zip(modules, layers) if la is not None]
    if not present:
        raise LoraToolsError(f"{source}: no layer to fuse")
    src = _unchanged_source(layers, modules)
    if src is not None:  # as it was read (a copy marked fused: a rank rule may replace its factors)
        return LoraLayer(down=src.down, up=src.up, alpha=src.alpha, rslora=src.rslora, magnitude=src.magnitude,
                         magnitude_axis=src.magnitude_axis, meta={**src.meta, FUSED: [m.canonical for m, _ in present]})
    for m, la in present:
        if not isinstance(la, LoraLayer):
            raise LoraToolsError(f"{m.canonical}: {la.kind} layers cannot be stacked into the fused tensor {source}; "
                                 "convert them to LoRA first")
        if la.is_conv:
            raise LoraToolsError(f"{m.canonical}: a conv layer cannot be stacked into the fused tensor {source}")
        want = sum(b - a for a, b in (row_blocks(m) or ((0, la.shape[0]),)))
        if la.shape[0] != want:
            raise LoraToolsError(f"{m.canonical}: ΔW has {la.shape[0]} rows, but its rows of the fused tensor "
                                 f"{source} are {want}")
    first = present[0][1]
    dtype = first.up.dtype
    rows = max(b for m in modules for _, b in (row_blocks(m) or ((0, first.shape[0]),)))
    ranks = [la.rank for _, la in present]
    total = sum(ranks)
    scales = {la.scale for _, la in present}
    same = len(scales) == 1 and all(not la.rslora for _, la in present)
    mag = _fused_magnitude(present, modules, rows, source)
    shared = len(present) > 1 and same and all(la.up.dtype == dtype and la.down.shape == first.down.shape
                                               and torch.equal(la.down, first.down) for _, la in present)
    if shared:  # one down for every member (an sd-scripts LoRA split by a converter): stack the ups, keep the rank
        up = torch.zeros((rows, first.rank), dtype=dtype)
        for m, la in present:
            place_rows(m, la.up, up)
        meta = {FUSED: [m.canonical for m, _ in present]}
        return LoraLayer(down=first.down, up=up, alpha=first.alpha, magnitude=mag, magnitude_axis="out", meta=meta)
    up = torch.zeros((rows, total), dtype=dtype)
    col = 0
    for m, la in present:
        block = la.up if same else (la.up.to(torch.float64) * la.scale).to(dtype)
        place_rows(m, block, up[:, col:col + la.rank])
        col += la.rank
    down = torch.cat([la.down.to(dtype) for _, la in present], dim=0)
    if len(present) == 1:
        alpha = first.alpha
    elif same:
        alpha = None if all(la.alpha is None for _, la in present) else first.scale * total
    else:
        alpha = float(total)
    meta = {FUSED: [m.canonical for m, _ in present]}
    if first.meta.get("alpha_dtype") is not None and same and len(present) == 1:
        meta["alpha_dtype"] = first.meta["alpha_dtype"]
    return LoraLayer(down=down, up=up, alpha=alpha, magnitude=mag, magnitude_axis="out", meta=meta)


def _fused_magnitude(present: list[tuple[Any, LoraLayer]], modules: list[Any], rows: int,
                     source: str) -> torch.Tensor | None:
    mags = [la.magnitude for _, la in present]
    if all(g is None for g in mags):
        return None
    if any(g is None for g in mags) or len(present) != len(modules) or any(
            la.magnitude_axis != "out" for _, la in present):
        raise LoraToolsError(f"{source}: DoRA magnitudes can be stacked into a fused tensor only when every module "
                             "of it has one per output row (use --fold-dora)")
    flat = [g.reshape(-1) for g in mags]
    out = torch.zeros(rows, dtype=flat[0].dtype)
    for (m, _), g in zip(present, flat):
        place_rows(m, g, out)
    return out


def fuse_for_writing(layers: Mapping[str, Layer], naming: Any) -> tuple[dict[str, Layer], list[str]]:
    """``layers`` with every family module stored in a shared or reordered tensor grouped into one layer on it.

    The result maps a representative canonical name (the group's first module in row order, so the family's
    ``kohya_stem(name, "original")`` / ``comfy_key(name)`` give the fused tensor's name) to the fused layer; other
    layers are unchanged. Also returns notes for the report (fused ranks)."""
    out: dict[str, Layer] = {}
    notes: list[str] = []
    done: set[str] = set()
    fused_count, example = 0, ""
    for name, layer in layers.items():
        if name in done:
            continue
        if not is_canonical(naming, name):
            out[name] = layer
            continue
        group = naming.by_original(naming.module(name).original)
        if layer.meta.get(FUSED):  # fused already (convert --rank truncates the fused ΔW before writing)
            out[name] = layer
            done.update(m.canonical for m in group)
            continue
        if len(group) <= 1 and row_blocks(naming.module(name)) is None:
            out[name] = layer
            continue
        members = [layers.get(m.canonical) for m in group]
        done.update(m.canonical for m in group)
        original = naming.module(name).original
        fused = fuse_layers(members, group, original)
        out[group[0].canonical] = fused
        ranks = [la.rank for la in members if la is not None]
        if len(ranks) > 1 and fused.rank > max(ranks):  # a block-diagonal stack (not a shared down)
            fused_count += 1
            if not example:
                parts = "+".join(str(la.rank) for la in members if la is not None)
                example = f"{original}: {parts} → rank {fused.rank}"
    if fused_count:
        notes.append(f"{fused_count} fused tensor(s) written as block-diagonal stacks of their modules' LoRAs: the "
                     f"rank is the sum of the members' ranks (e.g. {example})")
    return out, notes
