"""Library side of ``verify``: are two adapters (any formats we read) the same weight change?

Per module, the difference is measured on ΔW in factored form, never densely:

    ‖ΔW_A − ΔW_B‖_F² = ‖[L_A, −L_B] [R_A, R_B]ᵀ‖_F² = factored_norm2([L_A, −L_B], [R_A, R_B])

(float64 Grams of the concatenated factors: O((m+n)(k_A+k_B)²), whatever the layer size), reported
**relative to ‖ΔW_A‖_F** (A is the reference; when ΔW_A = 0, relative to ‖ΔW_B‖_F, and 0 when both are zero).

DoRA layers rescale ``W + ΔW``, so ΔW alone does not say what the model computes:

* with a base checkpoint, each side's effective change ``W' − W`` is built through its own DoRA formula
  (:func:`loratools.dora.effective_delta`: PEFT or LyCORIS, output or input axis, eps) and compared (dense, one
  layer at a time: the norm of ``W + ΔW`` is not a low-rank quantity);
* without one, ΔW is compared in factored form and the magnitude vectors are compared as stored when both sit on
  the same axis (a magnitude on another axis, or on one side only, is a finding). PEFT and LyCORIS output-axis
  magnitudes differ by ``eps/‖W+ΔW‖`` relative, which only the base can remove: a note says so.

A shape mismatch (A/B swapped, a transposed rectangular pair) is a finding, never a crash; a module present in
one adapter only is a finding. Where the two ΔW differ, cheap factored checks name the likely cause: B a scalar
multiple of A (alpha, rsLoRA, a lost alpha_pattern entry), or B the transpose of A.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from loratools import dora
from loratools.adapter import Adapter, FullLayer, Layer, LoraLayer
from loratools.checkpoint import Checkpoint
from loratools.formats.naming import mangle, split_component, split_prefix
from loratools.linalg import factored_norm2
from loratools.stats import layer_type

Progress = Callable[[Iterable, int], Iterable]
DEFAULT_TOL = 1e-5
#: a scale or transpose explanation is offered when it leaves less than this relative residual
EXPLAINS = 1e-4
F64 = torch.float64


def _shape(layer: Layer) -> list[int]:
    return [int(s) for s in layer.shape]


def scale_rule(layer: Layer) -> str:
    """The scale convention a layer was read with: ``alpha/r``, ``alpha/sqrt(r)`` (rsLoRA), ``1 (no alpha)``…"""
    if isinstance(layer, LoraLayer):
        if layer.alpha is None:
            return "1 (no alpha)"
        return "alpha/sqrt(r)" if layer.rslora else "alpha/r"
    if isinstance(layer, FullLayer):
        return "1 (full diff)"
    return "alpha/dim" if getattr(layer, "alpha", None) is not None else "1 (no alpha)"


def scale_text(layer: Layer) -> str:
    """``alpha 16 / r 8 = 2`` (the numbers behind a layer's scale), for notes on a differing module."""
    rule = scale_rule(layer)
    if isinstance(layer, LoraLayer):
        if layer.alpha is None:
            return f"rank {layer.rank}, no alpha: scale 1"
        div = f"√{layer.rank}" if layer.rslora else str(layer.rank)
        return f"alpha {layer.alpha:g} / {div}{' (rsLoRA)' if layer.rslora else ''} = {layer.scale:.6g}"
    scale = getattr(layer, "scale", None)
    if scale is None or rule.startswith("1"):
        return f"{layer_type(layer)}: {rule}"
    return f"{layer_type(layer)} alpha {layer.alpha:g} / dim {getattr(layer, 'dim', '?')} = {scale:.6g}"


def _dora_text(layer: Layer) -> str:
    axis = "per output row" if layer.magnitude_axis == "out" else "per input column"
    return f"{dora.convention(layer)} ({layer.magnitude_axis} axis, {axis})"


def conventions(adapter: Adapter) -> dict[str, Any]:
    """What one side's scales and DoRA magnitudes follow, as read (``conventions.a`` / ``.b`` of the report)."""
    layers = adapter.layers.values()
    out: dict[str, Any] = {
        "format": adapter.format,
        "names_resolved": adapter.resolved,
        "layers": len(adapter.layers),
        "types": dict(Counter(layer_type(la) for la in layers)),
        "scale_rules": dict(Counter(scale_rule(la) for la in layers)),
        "ranks": sorted({int(la.rank) for la in layers}),
        "alphas": sorted({float(a) for la in layers if (a := getattr(la, "alpha", None)) is not None}),
        "rslora": any(getattr(la, "rslora", False) for la in layers),
        "dtypes": sorted({_dt(la.dtype) for la in layers}),
    }
    cfg = adapter.config or {}
    if cfg:
        keys = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "use_dora")
        out["config"] = {k: cfg[k] for k in keys if k in cfg}
        out["config_generated"] = adapter.config_generated
    meta = {k: v for k, v in adapter.metadata.items() if k in ("ss_network_dim", "ss_network_alpha", "ss_network_module",
                                                                "ss_network_args")}
    if meta:
        out["metadata"] = meta
    mags = [la for la in layers if la.magnitude is not None]
    if mags:
        out["dora"] = {
            "layers": len(mags),
            "convention": dict(Counter(dora.convention(la) for la in mags)),
            "axis": dict(Counter(la.magnitude_axis for la in mags)),
        }
    else:
        out["dora"] = None
    out["warnings"] = list(adapter.warnings)
    return out


def _loose_key(name: str, layer: Layer, resolved: bool) -> tuple[str | None, str]:
    """(component, mangled module path): how an unresolved kohya stem and a module path can still be paired."""
    if not resolved:
        stem = layer.meta.get("kohya_stem") or name
        return layer.meta.get("component"), split_prefix(stem)[1]
    comp, path = split_component(name)
    return comp or layer.meta.get("component"), mangle(path)


def match_modules(a: Adapter, b: Adapter) -> tuple[list[tuple[str, str, str]], list[str], list[str], bool]:
    """Pairs ``(shown name, name in A, name in B)``, names only in A, only in B, and whether stems were used.

    Equal names pair first. When one side's names are unresolved kohya stems (no ``--base``), the rest pair by
    mangled module path (``.`` → ``_``), where that is unambiguous and the pipeline components agree.
    """
    pairs = [(n, n, n) for n in a.layers if n in b.layers]
    rest_a = [n for n in a.layers if n not in b.layers]
    rest_b = [n for n in b.layers if n not in a.layers]
    loose = False
    if rest_a and rest_b and (not a.resolved or not b.resolved):
        def index(ad: Adapter, names: list[str]) -> dict[str, list[tuple[str | None, str]]]:
            idx: dict[str, list[tuple[str | None, str]]] = {}
            for n in names:
                comp, path = _loose_key(n, ad.layers[n], ad.resolved)
                idx.setdefault(path, []).append((comp, n))
            return idx

        ia, ib = index(a, rest_a), index(b, rest_b)
        for path, cands in ia.items():
            other = ib.get(path)
            if len(cands) != 1 or not other or len(other) != 1:
                continue
            (ca, na), (cb, nb) = cands[0], other[0]
            if ca and cb and ca != cb:
                continue
            shown = na if a.resolved or not b.resolved else nb
            pairs.append((shown, na, nb))
            rest_a.remove(na)
            rest_b.remove(nb)
            loose = True
    return pairs, rest_a, rest_b, loose


def _factors(layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    return layer.factors(F64)


def _inner(la: torch.Tensor, ra: torch.Tensor, lb: torch.Tensor, rb: torch.Tensor) -> float:
    """⟨L_A R_Aᵀ, L_B R_Bᵀ⟩_F = Σ (L_AᵀL_B) ⊙ (R_AᵀR_B), without either product."""
    return float(((la.T @ lb) * (ra.T @ rb)).sum())


def _relative(diff2: float, na2: float, nb2: float, notes: list[str]) -> float:
    """‖A − B‖ / ‖A‖ (‖B‖ when A = 0, noted; 0 when both are zero)."""
    diff = math.sqrt(max(diff2, 0.0))
    if na2 > 0:
        return diff / math.sqrt(na2)
    if nb2 > 0:
        notes.append("ΔW_A is zero: relative to ‖ΔW_B‖")
        return diff / math.sqrt(nb2)
    return 0.0


def _explain(la: Layer, lb: Layer, fa, fb, na2: float, nb2: float, notes: list[str]) -> None:
    """Name the likely cause of a difference: B = c·A (a scale convention), or B = Aᵀ (a transposed pair)."""
    if na2 <= 0 or nb2 <= 0:
        return
    ip = _inner(*fa, *fb)
    c = ip / na2
    resid2 = max(nb2 - ip * ip / na2, 0.0)
    if math.sqrt(resid2 / nb2) < EXPLAINS:
        hint = f"ΔW_B = {c:.6g} × ΔW_A: a scale difference"
        sa, sb = getattr(la, "scale", None), getattr(lb, "scale", None)
        if getattr(la, "rslora", False) != getattr(lb, "rslora", False):
            hint += "; rsLoRA on one side only (alpha/√r vs alpha/r)"
        elif sa is not None and sb is not None and not math.isclose(sa, sb, rel_tol=1e-6):
            hint += "; the scales read differ (alpha in the config / alpha_pattern / .alpha tensor / metadata?)"
        elif la.rank == lb.rank and la.rank > 1 and any(
                math.isclose(c, x, rel_tol=1e-4) for x in (math.sqrt(la.rank), 1 / math.sqrt(la.rank))):
            hint += f"; ×√{la.rank}: an rsLoRA scale folded into one side's factors?"
        notes.append(hint + f" (A: {scale_text(la)}; B: {scale_text(lb)})")
        return
    m, n = la.matrix_shape
    if m == n and not la.is_conv:
        (l_a, r_a), (l_b, r_b) = fa, fb
        t2 = factored_norm2(torch.cat([l_a, -r_b], 1), torch.cat([r_a, l_b], 1))
        if math.sqrt(t2 / na2) < EXPLAINS:
            notes.append("ΔW_B is ΔW_A transposed (lora_A/lora_B transposed or up/down read the wrong way round?)")


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _storage_rounding(da: torch.dtype, db: torch.dtype) -> tuple[str, float] | None:
    """(dtype, typical relative rounding of a product of factors) of the coarser side when the dtypes differ."""
    if da == db:
        return None
    coarse = max((da, db), key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)
    if not coarse.is_floating_point:
        return None
    return _dt(coarse), float(torch.finfo(coarse).eps)


def _magnitude(layer: Layer) -> torch.Tensor:
    return layer.magnitude.reshape(-1).to(F64)


def compare_layers(la: Layer, lb: Layer, w: torch.Tensor | None = None) -> dict[str, Any]:
    """One module: ``relative_difference`` (None when not comparable), ``comparable``, ``compared``, ``notes``."""
    notes: list[str] = []
    row: dict[str, Any] = {"shape_a": _shape(la), "shape_b": _shape(lb)}
    if tuple(la.shape) != tuple(lb.shape):
        if la.matrix_shape == lb.matrix_shape:
            notes.append(f"shapes {list(la.shape)} and {list(lb.shape)} flatten to the same matrix "
                         f"{list(la.matrix_shape)} (a conv read without its kernel shape?); compared as matrices")
        else:
            hint = ""
            if tuple(lb.shape) == tuple(reversed(la.shape)):
                hint = " (transposed: lora_A/lora_B swapped or transposed?)"
            elif la.rank in lb.shape or lb.rank in la.shape:
                hint = " (lora_A/lora_B swapped?)"
            notes.append(f"shape mismatch: A {list(la.shape)} vs B {list(lb.shape)}{hint}")
            row.update(relative_difference=None, comparable=False, compared="shape", notes=notes)
            return row
    has_mag = la.magnitude is not None or lb.magnitude is not None
    if has_mag and w is not None:
        ea = dora.effective_delta(la, w, F64).reshape(la.matrix_shape)
        eb = dora.effective_delta(lb, w, F64).reshape(la.matrix_shape)
        na2, nb2 = float((ea * ea).sum()), float((eb * eb).sum())
        rel = _relative(float(((ea - eb) ** 2).sum()), na2, nb2, notes)
        sides = ", ".join(f"{s}: {_dora_text(x) if x.magnitude is not None else 'no magnitude'}"
                          for s, x in (("A", la), ("B", lb)))
        notes.append(f"DoRA: compared W'−W through each side's DoRA formula ({sides})")
        row.update(relative_difference=rel, comparable=True, compared="effective", notes=notes)
        if la.magnitude is not None and lb.magnitude is not None and la.magnitude_axis != lb.magnitude_axis:
            notes.append(f"DoRA magnitude axis differs: A {la.magnitude_axis}, B {lb.magnitude_axis}")
        return row

    fa, fb = _factors(la), _factors(lb)
    na2, nb2 = factored_norm2(*fa), factored_norm2(*fb)
    diff2 = factored_norm2(torch.cat([fa[0], -fb[0]], 1), torch.cat([fa[1], fb[1]], 1))
    rel = _relative(diff2, na2, nb2, notes)
    row.update(delta_relative_difference=rel)
    comparable = True
    compared = "delta"
    if rel > 0:
        _explain(la, lb, fa, fb, na2, nb2, notes)
    if has_mag:
        compared = "delta+magnitude"
        if la.magnitude is None or lb.magnitude is None:
            side = "A" if la.magnitude is not None else "B"
            notes.append(f"DoRA magnitude only in {side} ({_dora_text(la if side == 'A' else lb)}); "
                         "pass --base to compare the effective weights")
            comparable = False
        elif la.magnitude_axis != lb.magnitude_axis:
            notes.append(f"DoRA magnitude on different axes: A {_dora_text(la)}, B {_dora_text(lb)}")
            comparable = False
        else:
            ma, mb = _magnitude(la), _magnitude(lb)
            if ma.numel() != mb.numel():
                notes.append(f"DoRA magnitude sizes differ: A {ma.numel()}, B {mb.numel()}")
                comparable = False
            else:
                na = float(ma.norm())
                mrel = float((ma - mb).norm()) / na if na > 0 else float(mb.norm() > 0)
                row["magnitude_relative_difference"] = mrel
                rel = max(rel, mrel)
                what = "DoRA without --base: compared ΔW (factored) and the magnitude vectors as stored"
                if dora.convention(la) != dora.convention(lb):
                    what += (f" (A {dora.convention(la)}, B {dora.convention(lb)}: their formulas differ by "
                             "eps/‖W+ΔW‖ relative, exact only with --base)")
                notes.append(what)
    row.update(relative_difference=rel if comparable else None, comparable=comparable, compared=compared,
               notes=notes)
    return row


def verify_adapters(
    a: str | Path,
    b: str | Path,
    base: str | Path | Checkpoint | None = None,
    tol: float = DEFAULT_TOL,
    format: str | None = None,
    family: str | None = None,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Compare two adapters module by module (see the module docstring). Returns the ``--json`` document."""
    from loratools.formats import load_adapter

    ckpt = None if base is None else base if isinstance(base, Checkpoint) else Checkpoint(base)
    ad_a = load_adapter(a, format=format, base=ckpt, allow_nonfinite=allow_nonfinite, family=family)
    ad_b = load_adapter(b, format=format, base=ckpt, allow_nonfinite=allow_nonfinite, family=family)
    return compare_adapters(ad_a, ad_b, ckpt, tol, progress)


def compare_adapters(ad_a: Adapter, ad_b: Adapter, base: Checkpoint | None = None, tol: float = DEFAULT_TOL,
                     progress: Progress | None = None) -> dict[str, Any]:
    """:func:`verify_adapters` on adapters already read."""
    pairs, only_a, only_b, loose = match_modules(ad_a, ad_b)
    warnings: list[str] = []
    if loose:
        warnings.append("some module names are unresolved kohya stems: paired by mangled module path "
                        "(pass --base to resolve them)")
    items: Iterable = pairs
    if progress is not None:
        items = progress(pairs, len(pairs))
    rows: list[dict[str, Any]] = []
    for shown, na, nb in items:
        la, lb = ad_a.layers[na], ad_b.layers[nb]
        w = None
        if base is not None and (la.magnitude is not None or lb.magnitude is not None):
            if base.module_ref(na) is not None:
                w = base.module_weight(na)
            elif base.module_ref(nb) is not None:
                w = base.module_weight(nb)
            else:
                warnings.append(f"{shown}: no base weight for this DoRA module; compared ΔW and magnitudes instead")
        row = compare_layers(la, lb, w)
        rel = row["relative_difference"]
        ok = row["comparable"] and rel is not None and rel <= tol
        if not ok and row["comparable"]:
            if scale_text(la) != scale_text(lb) and not any("scale difference" in n for n in row["notes"]):
                row["notes"].append(f"scales read: A {scale_text(la)}; B {scale_text(lb)}")
            coarse = _storage_rounding(la.dtype, lb.dtype)
            if coarse is not None and rel is not None and rel < 10 * coarse[1]:
                row["notes"].append(f"stored as A {_dt(la.dtype)}, B {_dt(lb.dtype)}: {coarse[0]} rounding alone "
                                    f"gives about {coarse[1]:.0e} relative (raise --tol to accept it)")
        out = {"name": shown, "relative_difference": rel, "only_in": None, "notes": row.pop("notes"), "within_tol": ok,
               "compared": row.pop("compared"), "type_a": layer_type(la), "type_b": layer_type(lb),
               "rank_a": int(la.rank), "rank_b": int(lb.rank), **{k: v for k, v in row.items() if k != "comparable"}}
        if na != nb:
            out["name_a"], out["name_b"] = na, nb
        rows.append(out)
    for side, names, ad in (("A", only_a, ad_a), ("B", only_b, ad_b)):
        for n in names:
            rows.append({"name": n, "relative_difference": None, "only_in": side,
                         "notes": [f"module only in {side} ({layer_type(ad.layers[n])}, {list(ad.layers[n].shape)})"],
                         "within_tol": False, "compared": None})
    failing = [r for r in rows if not r["within_tol"]]

    def badness(r: dict) -> tuple[int, float]:
        rel = r["relative_difference"]
        return (0, 0.0) if rel is None else (1, -rel)

    worst = [r["name"] for r in sorted(failing, key=badness)]
    compared = [r for r in rows if r["only_in"] is None and r["relative_difference"] is not None]
    max_rel = max((r["relative_difference"] for r in compared), default=0.0)
    return {
        "equal": not failing,
        "tol": tol,
        "relative_to": "‖ΔW_A‖_F (A is the reference; ‖ΔW_B‖_F where ΔW_A = 0)",
        "a": ad_a.source,
        "b": ad_b.source,
        "modules": rows,
        "only_in_a": only_a,
        "only_in_b": only_b,
        "worst": worst,
        "summary": {"compared": len(pairs), "within_tol": len(pairs) - sum(1 for r in failing if r["only_in"] is None),
                    "max_relative_difference": max_rel, "base": None if base is None else str(base.path)},
        "conventions": {"a": conventions(ad_a), "b": conventions(ad_b)},
        "warnings": warnings,
    }
