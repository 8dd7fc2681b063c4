"""LyCORIS files (and the tensors of PEFT's own LoHa / LoKr folders) → canonical layers.

Keys are ``<stem>.<param>`` with kohya-style stems (``lora_unet_…``, ``lora_te_…``, ``lora_te1_/2_…``,
``lycoris_…`` or any ``<prefix>_<module path with underscores>``, resolved against ``--base``):

* LoRA / LoCon: ``lora_down.weight``, ``lora_up.weight``, Tucker ``lora_mid.weight``;
* LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, Tucker ``hada_t1``, ``hada_t2``;
* LoKr: ``lokr_w1`` | ``lokr_w1_a`` + ``lokr_w1_b``, ``lokr_w2`` | ``lokr_w2_a`` + ``lokr_w2_b`` (+ Tucker ``lokr_t2``);
* full: ``diff`` (+ ``diff_b``, the bias difference);
* ``alpha`` (0-d) and ``dora_scale`` on any of them; ``scalar`` is ignored (saved factors are
  pre-multiplied and LyCORIS resets it to 1 on load).

Scales follow LyCORIS 4.1.3's forward pass (``modules/{locon,loha,lokr}.py``): ``alpha ∈ {None, 0} → dim``,
``scale = alpha / dim`` with dim = the LoRA rank (``lora_down``/``hada_w1_b`` rows, ``lokr_w1_a`` columns, else
``lokr_t2``'s first dimension, else ``lokr_w2_a`` columns); a LoKr with **both** ``lokr_w1`` and ``lokr_w2`` full
ignores alpha (scale 1). rsLoRA needs no rule: LyCORIS saves ``alpha·√dim`` so that alpha/dim is the scale.
PEFT's LoHa/LoKr use ``alpha / r`` from ``adapter_config.json`` in every case (also for a both-full LoKr).

``dora_scale`` shapes: ``[out, 1(, 1, 1)]`` = magnitude per output row (``wd_on_output``), ``[1, in(, 1, 1)]`` =
per input column. LyCORIS's forward is ``W' = (W + ΔW)·m / (‖W + ΔW‖ + eps)``, eps = ``finfo(dora_scale.dtype).eps``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from loratools.adapter import Adapter, FullLayer, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats.common import (
    check_factor,
    family_of_metadata,
    note_zero_alphas,
    read_single_file,
    stored_alpha,
    take_embedding_marks,
    take_peft_config,
)
from loratools.formats.naming import tag_stem
from loratools.formats.spec import AdapterFormat
from loratools.layers import LohaLayer, LokrLayer, TuckerLoraLayer

LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
FULL_KEYS = ("diff", "diff_b")
COMMON_KEYS = ("alpha", "dora_scale", "scalar")
ALL_KEYS = LOHA_KEYS + LOKR_KEYS + LORA_KEYS + FULL_KEYS + COMMON_KEYS
STRUCTURED_MARKERS = ("hada_", "lokr_", "lora_mid", "diff", "dora_scale")


def is_lycoris_suffix(suffix: str) -> bool:
    return suffix in ALL_KEYS


def _shapes(p: dict[str, torch.Tensor]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in p.items())


def _need(p: dict[str, torch.Tensor], where: str, kind: str, *names: str) -> None:
    for n in names:
        if n not in p:
            raise LoraToolsError(f"{where}: {kind} layer has no {n} tensor (has {_shapes(p)})")


def _matmul_fits(where: str, a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
        raise LoraToolsError(
            f"{where}: inner dimensions do not match: {a_name} {tuple(a.shape)} @ {b_name} {tuple(b.shape)}"
        )


def _tucker_fits(where: str, t_name: str, t: torch.Tensor, a_name: str, a: torch.Tensor,
                 b_name: str, b: torch.Tensor) -> None:
    if t.dim() < 3:
        raise LoraToolsError(
            f"{where}: Tucker core {t_name} {tuple(t.shape)} has order {t.dim()}, expected [r, r, kh, kw] (order ≥ 3)"
        )
    if a.dim() != 2 or b.dim() != 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
        raise LoraToolsError(
            f"{where}: Tucker core {t_name} {tuple(t.shape)} does not fit {a_name} {tuple(a.shape)} "
            f"and {b_name} {tuple(b.shape)} (expected [{a.shape[0]}, {b.shape[0]}, kh, kw])"
        )


def _scale(alpha: float | None, dim: int, peft: tuple[float, int] | None) -> float:
    """LyCORIS: alpha ∈ {None, 0} means alpha = dim; PEFT: (alpha, r) from the config."""
    if peft is not None:
        return peft[0] / peft[1]
    if alpha is None or alpha == 0:
        return 1.0
    return alpha / dim


def _loha(p: dict[str, torch.Tensor], where: str, alpha: float | None, peft) -> LohaLayer:
    _need(p, where, "LoHa", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    if ("hada_t1" in p) != ("hada_t2" in p):
        _need(p, where, "Tucker LoHa", "hada_t1", "hada_t2")
    w1a, w1b, w2a, w2b = (p[k] for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in p:
        t1, t2 = p["hada_t1"], p["hada_t2"]
        _tucker_fits(where, "hada_t1", t1, "hada_w1_a", w1a, "hada_w1_b", w1b)
        _tucker_fits(where, "hada_t2", t2, "hada_w2_a", w2a, "hada_w2_b", w2b)
        shape1 = (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        shape2 = (w2a.shape[1], w2b.shape[1], *t2.shape[2:])
    else:
        t1 = t2 = None
        _matmul_fits(where, "hada_w1_a", w1a, "hada_w1_b", w1b)
        _matmul_fits(where, "hada_w2_a", w2a, "hada_w2_b", w2b)
        shape1 = (w1a.shape[0], math.prod(w1b.shape[1:]))
        shape2 = (w2a.shape[0], math.prod(w2b.shape[1:]))
    if tuple(shape1) != tuple(shape2):
        raise LoraToolsError(f"{where}: LoHa branches have different shapes {tuple(shape1)} and {tuple(shape2)} ({_shapes(p)})")
    dim = int(w1b.shape[0])
    return LohaLayer(w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, t1=t1, t2=t2, out_shape=tuple(int(s) for s in shape1),
                     scale=_scale(alpha, dim, peft), alpha=alpha)


def _lokr(p: dict[str, torch.Tensor], where: str, alpha: float | None, peft) -> LokrLayer:
    if "lokr_w1" not in p:
        _need(p, where, "LoKr", "lokr_w1_a", "lokr_w1_b")
        _matmul_fits(where, "lokr_w1_a", p["lokr_w1_a"], "lokr_w1_b", p["lokr_w1_b"])
        w1_shape = (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    else:
        if p["lokr_w1"].dim() != 2:
            raise LoraToolsError(f"{where}: lokr_w1 {tuple(p['lokr_w1'].shape)} must be 2-D [out_l, in_m]")
        w1_shape = tuple(p["lokr_w1"].shape)
    kernel: tuple[int, ...] = ()
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
        if w2.dim() < 2:
            raise LoraToolsError(f"{where}: lokr_w2 {tuple(w2.shape)} must be at least 2-D")
        w2_out, w2_in, kernel = w2.shape[0], w2.shape[1], tuple(w2.shape[2:])
    else:
        _need(p, where, "LoKr", "lokr_w2_a", "lokr_w2_b")
        a, b = p["lokr_w2_a"], p["lokr_w2_b"]
        if "lokr_t2" in p:
            _tucker_fits(where, "lokr_t2", p["lokr_t2"], "lokr_w2_a", a, "lokr_w2_b", b)
            w2_out, w2_in, kernel = a.shape[1], b.shape[1], tuple(p["lokr_t2"].shape[2:])
        else:
            _matmul_fits(where, "lokr_w2_a", a, "lokr_w2_b", b)
            w2_out, w2_in = a.shape[0], math.prod(b.shape[1:])
    shape = (int(w1_shape[0] * w2_out), int(w1_shape[1] * w2_in), *map(int, kernel))
    both_full = "lokr_w1" in p and "lokr_w2" in p
    if "lokr_w1_a" in p:
        dim = int(p["lokr_w1_a"].shape[1])
    elif "lokr_t2" in p:
        dim = int(p["lokr_t2"].shape[0])
    elif "lokr_w2_a" in p:
        dim = int(p["lokr_w2_a"].shape[1])
    else:
        dim = 0
    if peft is None and both_full:
        scale = 1.0  # LyCORIS: `if use_w1 and use_w2: alpha = lora_dim`
    else:
        scale = _scale(alpha, dim, peft)
    return LokrLayer(out_shape=shape, w1=p.get("lokr_w1"), w1a=p.get("lokr_w1_a"), w1b=p.get("lokr_w1_b"),
                     w2=p.get("lokr_w2"), w2a=p.get("lokr_w2_a"), w2b=p.get("lokr_w2_b"), t2=p.get("lokr_t2"),
                     scale=scale, alpha=alpha, dim=dim)


def _lora(p: dict[str, torch.Tensor], where: str, alpha: float | None) -> Layer:
    _need(p, where, "LoRA", "lora_down.weight", "lora_up.weight")
    down, up = p["lora_down.weight"], p["lora_up.weight"]
    if "lora_mid.weight" in p:
        mid = p["lora_mid.weight"]
        if mid.dim() < 3:
            raise LoraToolsError(
                f"{where}: Tucker core lora_mid.weight {tuple(mid.shape)} has order {mid.dim()}, expected [r, r, kh, kw]"
            )
        try:
            return TuckerLoraLayer(down=down, mid=mid, up=up, scale=_scale(alpha, down.shape[0], None), alpha=alpha)
        except LoraToolsError as exc:
            raise LoraToolsError(f"{where}: {exc}") from None
    try:
        return LoraLayer(down=down, up=up, alpha=None if not alpha else alpha)
    except LoraToolsError as exc:
        raise LoraToolsError(f"{where}: {exc}") from None


def _full(p: dict[str, torch.Tensor], where: str) -> FullLayer:
    _need(p, where, "full", "diff")
    layer = FullLayer(diff=p["diff"])
    if "diff_b" in p:
        b = p["diff_b"]
        if b.numel() != layer.shape[0]:
            raise LoraToolsError(f"{where}: diff_b {tuple(b.shape)} does not fit diff {tuple(layer.shape)}")
        layer.meta["diff_b"] = b
    return layer


def attach_dora_scale(layer: Layer, d: torch.Tensor, where: str) -> None:
    """Set ``layer.magnitude`` (flattened) and its axis from a LyCORIS ``dora_scale`` tensor's shape."""
    out, n = layer.shape[0], layer.shape[1] if len(layer.shape) > 1 else 1
    flat_cols = layer.matrix_shape[1]
    ones_after = all(s == 1 for s in d.shape[1:])
    if d.numel() == out and d.shape[0] == out and ones_after:
        axis = "out"
    elif d.dim() >= 2 and d.shape[0] == 1 and all(s == 1 for s in d.shape[2:]) and (
            d.shape[1] == n or (len(layer.shape) == 2 and flat_cols % d.shape[1] == 0)):
        axis = "in"
    else:
        raise LoraToolsError(
            f"{where}: dora_scale {tuple(d.shape)} fits neither axis of the layer {tuple(layer.shape)}: expected "
            f"[{out}, 1] (per output row, wd_on_output) or [1, {n}] (per input column)"
        )
    layer.magnitude = d.reshape(-1)
    layer.magnitude_axis = axis
    layer.meta["dora"] = "lycoris"
    layer.meta["dora_dtype"] = d.dtype


def build_layer(p: dict[str, torch.Tensor], where: str, peft: tuple[float, int] | None = None) -> Layer:
    """One canonical layer from the tensors of one stem (``peft=(alpha, r)`` for PEFT LoHa/LoKr scaling)."""
    alpha = stored_alpha(p["alpha"], where) if "alpha" in p else None
    for key, t in p.items():
        if key not in COMMON_KEYS or key == "dora_scale":
            check_factor(t, where, key)
    kinds = {k for k, keys in (("loha", LOHA_KEYS), ("lokr", LOKR_KEYS), ("lora", LORA_KEYS), ("full", FULL_KEYS))
             if any(x in p for x in keys)}
    if len(kinds) != 1:
        what = "no weight tensors" if not kinds else f"tensors of several kinds ({', '.join(sorted(kinds))})"
        raise LoraToolsError(f"{where}: {what}: {_shapes(p)}")
    kind = kinds.pop()
    if kind == "loha":
        layer: Layer = _loha(p, where, alpha, peft)
    elif kind == "lokr":
        layer = _lokr(p, where, alpha, peft)
    elif kind == "lora":
        layer = _lora(p, where, alpha)
    else:
        layer = _full(p, where)
    if "alpha" in p:
        layer.meta["alpha_dtype"] = p["alpha"].dtype
        if alpha is None and peft is None:
            layer.meta["alpha_zero"] = True
    if "dora_scale" in p:
        attach_dora_scale(layer, p["dora_scale"], where)
    return layer


def read_tensors_map(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    """A LyCORIS / kohya single file with any mix of LoRA, LoCon, LoHa, LoKr, full and DoRA layers."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, _, suffix = key.partition(".")
        if not is_lycoris_suffix(suffix):
            raise LoraToolsError(f"{source}: unknown key layout {key!r} (not a LoRA/LyCORIS tensor name)")
        groups.setdefault(stem, {})[suffix] = t
    adapter = Adapter(layers={}, format="lycoris", metadata=dict(metadata), source=source, resolved=False,
                      provenance={"family": family_of_metadata(metadata)})
    take_peft_config(adapter)
    for stem, p in groups.items():
        p.pop("scalar", None)
        adapter.layers[stem] = tag_stem(build_layer(p, f"{source}: {stem}"), stem)
    if not adapter.layers:
        raise LoraToolsError(f"{source}: no LoRA/LyCORIS tensors found")
    take_embedding_marks(adapter)
    note_zero_alphas(adapter)
    return adapter


def fit_base(adapter: Adapter, base) -> None:
    """After name resolution: every LyCORIS stem must have a module, and flattened convs get the kernel shape.

    LoHa / LoKr conv layers without a Tucker core store ``[r, in·kh·kw]`` factors, so only the base weight
    tells the kernel shape (PEFT's LoHa/LoKr folders too).
    """
    for name, layer in adapter.layers.items():
        stem = layer.meta.get("kohya_stem") or name
        if adapter.format != "lycoris" and not hasattr(layer, "set_shape"):
            continue
        if adapter.format == "lycoris" and stem == name and layer.meta.get("kohya_stem"):
            raise LoraToolsError(
                f"{adapter.source}: {stem}: no module of the base checkpoint {base.path} matches this LyCORIS key "
                f"(layer shape {tuple(layer.shape)})"
            )
        ref = base.module_ref(name)
        if ref is None:
            continue
        key = ref.key
        if layer.magnitude is not None and layer.meta.get("dora") == "lycoris":
            layer.meta["dora_dtype"] = base.dtype(key)  # LyCORIS's loader gives dora_scale the model's dtype
        wshape = tuple(int(s) for s in base.module_shape(name))
        if wshape == tuple(layer.shape):
            continue
        if math.prod(wshape) != math.prod(layer.shape) or wshape[0] != layer.shape[0]:
            raise LoraToolsError(
                f"{adapter.source}: {stem}: layer shape {tuple(layer.shape)} does not fit base weight {key} {wshape}"
            )
        if hasattr(layer, "set_shape"):
            layer.set_shape(wshape)
        elif isinstance(layer, LoraLayer) and len(layer.shape) == 2 and len(wshape) > 2:
            layer.down = layer.down.reshape(layer.rank, *wshape[1:])
            layer.up = layer.up.reshape(*layer.up.shape, *([1] * (len(wshape) - 2)))
        elif isinstance(layer, FullLayer):
            layer.diff = layer.diff.reshape(wshape)


def peft_lycoris_layers(parts: dict[str, dict[str, torch.Tensor]], config: dict, source: Path | str,
                        pattern_key) -> dict[str, Layer]:
    """Layers of a PEFT LOHA / LOKR folder: ``base_model.model.<module>.hada_w1_a`` etc.; alpha/r from the config."""
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    layers: dict[str, Layer] = {}
    for mod, p in parts.items():
        rk, ak = pattern_key(rank_pattern, mod), pattern_key(alpha_pattern, mod)
        r = int(rank_pattern[rk]) if rk is not None else r_default
        alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
        layer = build_layer(p, f"{source}: module {mod}", peft=(alpha, r))
        layer.alpha = alpha
        layer.meta["peft_r"] = r
        layers[mod] = layer
    return layers


def claims(key: str) -> bool:
    """A kohya-layout key (``<stem>.<param>``, no dot in the stem) of any LoRA / LyCORIS parameter."""
    stem, _, suffix = key.partition(".")
    return bool(stem) and "." not in stem and is_lycoris_suffix(suffix)


def plain_lora_metadata(meta: dict[str, str], layers: dict[str, Layer]) -> dict[str, str]:
    """kohya metadata of a LyCORIS file once its layers are plain LoRA: network module and algo updated."""
    has_dora = any(la.magnitude is not None for la in layers.values())
    if not has_dora and "ss_network_module" in meta:
        meta["ss_network_module"] = "networks.lora"
    if "ss_network_args" in meta:
        try:
            args = json.loads(meta["ss_network_args"])
        except json.JSONDecodeError:
            args = None
        if isinstance(args, dict) and "algo" in args:
            args["algo"] = "lora"
            meta["ss_network_args"] = json.dumps(args)
    return meta


FORMAT = AdapterFormat(
    name="lycoris", summary="LyCORIS single file (LoHa, LoKr, LoCon, Tucker, full, DoRA; kohya-layout keys)",
    folder=False, read=lambda path: read_single_file(path, read_tensors_map), claims=claims, writes_as="kohya",
    plain_lora_metadata=plain_lora_metadata,
)
