"""Library side of ``convert``: any canonical layer → plain LoRA, DoRA moved between PEFT and LyCORIS, folded.

Per layer (the CLI only renders the returned report):

* a plain LoRA layer without a rank rule is kept as it is (bit-exact copy);
* without a rule, a LoHa or Tucker LoCon layer whose factor count (r₁r₂, r) is below min(m, n) is written from its
  own exact factors, no SVD at all (:func:`loratools.linalg.lora_from_factors`: LoHa's Khatri–Rao products
  ``(L₁ • L₂)(R₁ • R₂)ᵀ``, each rank-one term balanced), rank = the structural rank;
* any other layer (LoKr, full, LoHa above that rank) or any layer under a rank rule becomes
  ``lora_from_svd(U, Σ, Vᵀ)`` of its **exact** SVD, computed from the structure and never from the dense
  delta (:func:`loratools.layers.exact_svd`: factored SVD of the exact factors; LoKr through the Kronecker
  identity, building only the kept singular vectors). Without a rule every structural singular value is kept
  (ΔW reproduced to float precision); with a rule the truncation is the Eckart–Young optimum, and the
  retained energy and relative error are exact because the spectrum is complete. Full-diff layers go through
  :func:`loratools.linalg.truncated_svd` (their delta *is* dense);
* DoRA magnitudes stay on the layer and are moved to the target library's formula (:mod:`loratools.dora`);
  an input-axis LyCORIS magnitude cannot be written to PEFT (use ``fold_dora``);
* ``fold_dora``: ``W' − W = m·(W+ΔW)/‖W+ΔW‖ − W`` (dense, one layer at a time) → truncated SVD under the rank
  rule (default: the layer's own rank) → plain LoRA; the achieved error is reported next to the optimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace

import torch

from loratools import dora
from loratools.adapter import Adapter, FullLayer, Layer, LoraLayer
from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError
from loratools.layers import LohaLayer, LokrLayer, TuckerLoraLayer, exact_svd, spectrum
from loratools.linalg import (
    RankRule,
    compute_dtype,
    factored_norm2,
    lora_from_factors,
    lora_from_svd,
    svd,
    truncated_svd,
)
from loratools.stats import layer_type

Progress = Callable[[Iterable, int], Iterable]
#: fold-dora reports the Eckart–Young optimum from an exact SVD up to this min(m, n)
OPTIMUM_EXACT_BELOW = 1024
#: truncated_svd's default: exact SVD up to this min(m, n)
EXACT_BELOW = 256


@dataclass
class LayerConversion:
    name: str
    source_type: str
    shape: list[int]
    source_rank: int
    rank: int
    retained_energy: float | None
    relative_error: float | None
    optimal_error: float | None = None
    action: str = "copied"


def _base_weight(base: Checkpoint | None, name: str) -> torch.Tensor | None:
    if base is None:
        return None
    return base.module_weight(name)


def check_convertible(adapter: Adapter, to_format: str, fold_dora: bool, base: Checkpoint | None) -> None:
    """Refuse before any work: what the target format cannot hold and what needs --base."""
    from loratools.formats import writer_of

    spec = writer_of(to_format)
    if fold_dora and base is None:
        raise LoraToolsError("--fold-dora needs --base CKPT (the DoRA norm is taken over W + ΔW)")
    for name, layer in adapter.layers.items():
        diff_b = layer.meta.get("diff_b")
        if diff_b is not None and bool((diff_b != 0).any()):
            raise LoraToolsError(
                f"{name}: full layer has a bias difference diff_b {tuple(diff_b.shape)}; plain LoRA cannot hold a bias change"
            )
        if layer.magnitude is None or fold_dora:
            continue
        # the layer as it will be written (plain LoRA, same magnitude): does the target hold that magnitude?
        probe = LoraLayer(down=torch.zeros(1, 1), up=torch.zeros(1, 1), magnitude=layer.magnitude,
                          magnitude_axis=layer.magnitude_axis)
        if spec.dora is None:  # the format's own reason where it gives one
            why = spec.refuse(name, probe) or (f"DoRA magnitudes cannot be written in {spec.name} format "
                                               "(use --to peft or kohya, or --fold-dora)")
            raise LoraToolsError(f"{name}: {why}")
        if spec.dora_all_or_none and base is None and not all(la.magnitude is not None for la in adapter.layers.values()):
            plain = sum(la.magnitude is None for la in adapter.layers.values())
            raise LoraToolsError(
                f"{spec.dora_all_or_none} is adapter-wide but {plain} layer(s) have no DoRA magnitude (e.g. {name} has one): "
                "pass --base to give the plain layers the exact identity magnitude ‖W+ΔW‖, or --fold-dora"
            )
        why = spec.refuse(name, probe)
        if why:
            raise LoraToolsError(f"{name}: {why}")


HALF = (torch.float16, torch.bfloat16)


def stored_error(layer: Layer, new: LoraLayer, dtype: torch.dtype) -> float:
    """‖ΔW_stored − ΔW‖_F / ‖ΔW‖_F for ``new`` with its factors rounded to ``dtype``, from the factors."""
    stored = replace(new, down=new.down.to(dtype), up=new.up.to(dtype))
    l0, r0 = layer.factors(torch.float64)
    l1, r1 = stored.factors(torch.float64)
    total = factored_norm2(l0, r0)
    return math.sqrt(factored_norm2(torch.cat([l1, -l0], 1), torch.cat([r1, r0], 1)) / total) if total > 0 else 0.0


def _to_lora(layer: Layer, rule: RankRule | None, out_dtype: torch.dtype | None = None
             ) -> tuple[LoraLayer | None, float, float]:
    """Exact SVD from the structure → (LoRA layer, retained energy fraction, relative error).

    The layer is None when nothing is kept (a zero delta, or a rule that keeps no singular value): rank 0,
    which no format can hold; the caller drops the layer and says so.
    """
    dtype = compute_dtype(layer.dtype)
    if isinstance(layer, FullLayer):
        m, n = layer.matrix_shape
        if rule is None:  # exact: every singular value of the dense diff (structural rank min(m, n))
            u, s, vh = svd(layer.diff.reshape(m, n))
            total = float(s.double().square().sum())
            tail = 0.0
        else:
            info: dict = {}
            u, s, vh, total = truncated_svd(layer.diff.reshape(m, n), rule, info=info)
            tail = info["discarded_energy"]
    elif rule is None and isinstance(layer, (LohaLayer, TuckerLoraLayer)) and layer.rank < min(layer.matrix_shape):
        # exact without any SVD: the structure's own factors (LoHa: Khatri–Rao products), balanced per column;
        # ``rank`` is the factor count capped at min(m, n), so below the cap it is the factor count itself
        left, right = layer.factors(dtype)
        if not bool(((left.norm(dim=0) > 0) & (right.norm(dim=0) > 0)).any()):
            return None, 0.0, 0.0
        return lora_from_factors(left, right, layer.shape, out_dtype or layer.dtype), 1.0, 0.0
    else:
        if isinstance(layer, LokrLayer):  # spectrum first (products), then only the kept Kronecker vectors
            s_all = spectrum(layer, dtype)
            u = vh = None
        else:  # one exact SVD from the factors
            u, s_all, vh = exact_svd(layer, dtype)
        energies = s_all.double().square()
        total = float(energies.sum())
        keep = s_all.numel() if rule is None else rule.choose(s_all, total, complete=True)
        tail = float(energies[keep:].sum())  # the exact discarded energy, no cancellation
        if u is None:
            u, s, vh = exact_svd(layer, dtype, keep=max(keep, 1))
        u, s, vh = u[:, :keep], s_all[:keep], vh[:keep]
    if s.numel() == 0 or float(s.max()) <= 0:
        return None, 1.0 - tail / total if total > 0 else 0.0, math.sqrt(tail / total) if total > 0 else 0.0
    energy = 1.0 - tail / total if total > 0 else 1.0
    err = math.sqrt(tail / total) if total > 0 else 0.0
    out = lora_from_svd(u, s, vh, layer.shape, out_dtype or layer.dtype)  # new factors: rounded once, to the output
    return out, energy, err


def fold_layer(layer: Layer, w: torch.Tensor, rule: RankRule) -> tuple[LoraLayer, float, float, float | None]:
    """Plain LoRA for the effective DoRA change ``W' − W``: (layer, retained energy, error, optimal error)."""
    d = dora.effective_delta(layer, w, torch.float32)
    m, n = layer.matrix_shape
    d2 = d.reshape(m, n)
    u, s, vh, total = truncated_svd(d2, rule)
    if s.numel() == 0:
        raise LoraToolsError(f"rank rule {rule.describe()} keeps nothing of a layer {tuple(layer.shape)}")
    approx = (u * s) @ vh
    err = float((d2 - approx).double().norm()) / math.sqrt(total) if total > 0 else 0.0
    optimal = None
    if min(m, n) <= OPTIMUM_EXACT_BELOW:
        s_full = svd(d2)[1].double()
        optimal = math.sqrt(max(float(s_full[s.numel():].square().sum()), 0.0) / total) if total > 0 else 0.0
    energy = min(float(s.double().square().sum()) / total, 1.0) if total > 0 else 1.0
    return lora_from_svd(u, s, vh, layer.shape, layer.dtype), energy, err, optimal


def _move_magnitude(new: LoraLayer, old: Layer, w: torch.Tensor | None, target: str,
                    dtype: torch.dtype | None) -> bool:
    """Carry ``old``'s magnitude to ``new`` in the ``target`` DoRA convention. Returns False if inexact."""
    out_dtype = dtype or old.magnitude.dtype
    new.magnitude, new.magnitude_axis = old.magnitude, old.magnitude_axis
    new.meta["dora"] = old.meta.get("dora", dora.PEFT)
    if "dora_dtype" in old.meta:
        new.meta["dora_dtype"] = old.meta["dora_dtype"]
    eps_dtype = w.dtype if w is not None else out_dtype  # LyCORIS computes the norm in the model's dtype
    mag = dora.moved_magnitude(new, w, target, out_dtype, eps_dtype).reshape(-1)
    exact = w is not None or dora.layer_eps(new) == (dora.lycoris_eps(out_dtype) if target == dora.LYCORIS else 0.0)
    if target == dora.PEFT and new.is_conv:
        mag = mag.reshape(1, -1, *([1] * (len(new.shape) - 2)))  # PEFT conv DoRA: [1, out, 1, 1]
    new.magnitude = mag
    new.meta["dora"] = target
    new.meta["dora_dtype"] = eps_dtype
    return exact


def _identity_magnitude(new: LoraLayer, w: torch.Tensor, dtype: torch.dtype | None) -> None:
    """PEFT DoRA magnitude ``m = ‖W + ΔW‖`` per output row: ``m·V/‖V‖ = V``, i.e. plain LoRA, exactly."""
    v = w.double().reshape(new.shape) + new.delta(torch.float64).reshape(new.shape)
    mag = dora.norms(v, "out").to(dtype or torch.float32)
    new.magnitude = mag.reshape(1, -1, *([1] * (len(new.shape) - 2))) if new.is_conv else mag
    new.magnitude_axis = "out"
    new.meta["dora"] = dora.PEFT


def convert_adapter(
    adapter: Adapter,
    to_format: str,
    rule: RankRule | None = None,
    fold_dora: bool = False,
    base: Checkpoint | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
) -> tuple[Adapter, list[dict]]:
    """Plain-LoRA adapter for ``to_format`` and one report row per layer (see module docstring)."""
    from loratools.formats import writer_of

    check_convertible(adapter, to_format, fold_dora, base)
    items = list(adapter.layers.items())
    layers: dict[str, Layer] = {}
    rows: list[dict] = []
    inexact: list[str] = []
    dropped: list[str] = []
    mags = [la.magnitude is not None for la in adapter.layers.values()]
    target = writer_of(to_format)
    identity_dora = target.dora_all_or_none and not fold_dora and any(mags) and not all(mags)
    for name, layer in (progress(items, len(items)) if progress else items):
        src_type = layer_type(layer)
        w = _base_weight(base, name) if layer.magnitude is not None else None
        if layer.magnitude is not None and fold_dora:
            fold_rule = rule or RankRule("rank", float(max(layer.rank, 1)))
            new, energy, err, opt = fold_layer(layer, w, fold_rule)
            row = LayerConversion(name, src_type, list(layer.shape), layer.rank, new.rank, energy, err, opt, "folded")
        else:
            if isinstance(layer, LoraLayer) and rule is None:
                new = LoraLayer(down=layer.down, up=layer.up, alpha=layer.alpha, rslora=layer.rslora,
                                magnitude=layer.magnitude, magnitude_axis=layer.magnitude_axis,
                                embedding=layer.embedding, meta=dict(layer.meta))
                energy, err, action = 1.0, 0.0, "copied"
                math_err = 0.0
            else:
                if getattr(layer, "embedding", False):
                    raise LoraToolsError(f"{name}: rank rules on embedding LoRA layers are not supported")
                lora, energy, err = _to_lora(layer, rule, dtype)
                if lora is None:  # rank 0: nothing to write
                    dropped.append(name)
                    rows.append(asdict(LayerConversion(name, src_type, list(layer.shape), layer.rank, 0, energy, err,
                                                       None, "dropped")))
                    continue
                new = lora
                action = "exact" if rule is None else "truncated"
                math_err = err
                if (dtype or new.dtype) in HALF:  # report what is stored: fp16/bf16 rounding included
                    err = stored_error(layer, new, dtype or new.dtype)
            # an exact spectrum makes the truncation Eckart–Young optimal; a large full diff may be randomized
            randomized = isinstance(layer, FullLayer) and rule is not None and min(layer.matrix_shape) > EXACT_BELOW
            optimum = None if randomized else math_err
            row = LayerConversion(name, src_type, list(layer.shape), layer.rank, new.rank, energy, err, optimum, action)
            if layer.magnitude is not None:
                if dora.convention(layer) != target.dora or action != "copied":
                    if not _move_magnitude(new, layer, w, target.dora, dtype):
                        inexact.append(name)
        if identity_dora and new.magnitude is None:
            _identity_magnitude(new, _base_weight(base, name), dtype)
            row.action += "+identity magnitude"
        for key in ("kohya_stem", "component", "alpha_dtype", "fused"):
            if key in layer.meta and key not in new.meta:
                new.meta[key] = layer.meta[key]
        layers[name] = new
        rows.append(asdict(row))
    if dropped and not layers:
        raise LoraToolsError(
            f"every layer has rank 0 after {'the rule ' + rule.describe() if rule else 'conversion'} "
            f"(a zero delta, e.g. {dropped[0]}); nothing to write"
        )
    out = replace(adapter, layers=layers, metadata=_metadata(adapter, layers), config=_config(adapter),
                  extra_tensors=dict(adapter.extra_tensors), warnings=list(adapter.warnings))
    flat = [n for n, la in adapter.layers.items()
            if base is None and not la.is_conv and isinstance(la, (LohaLayer, LokrLayer))]
    if flat:
        out.warnings.append(
            f"{len(flat)} LoHa/LoKr layer(s) (e.g. {flat[0]}) have 2-D factors and no --base: a conv stored "
            "flattened as [r, in·kh·kw] is written as a linear LoRA; pass --base to get its kernel shape"
        )
    if dropped:
        out.warnings.append(
            f"{len(dropped)} layer(s) have rank 0 after {'the rule ' + rule.describe() if rule else 'conversion'} "
            f"(e.g. {dropped[0]}: nothing of its delta is kept); dropped"
        )
    if inexact:
        out.warnings.append(
            f"{len(inexact)} DoRA layer(s) (e.g. {inexact[0]}) moved between PEFT (no eps) and LyCORIS (‖V‖ + eps) "
            "without --base: outputs differ by about eps/‖W+ΔW‖ relative per row; pass --base for an exact transform"
        )
    return out, rows


def _config(adapter: Adapter) -> dict:
    cfg = dict(adapter.config)
    if str(cfg.get("peft_type", "LORA")).upper() in ("LOHA", "LOKR"):
        keep = ("task_type", "base_model_name_or_path", "target_modules", "modules_to_save", "revision")
        cfg = {k: cfg[k] for k in keep if k in cfg}
    return cfg


def _metadata(adapter: Adapter, layers: dict[str, Layer]) -> dict[str, str]:
    """The source's metadata, as its format describes plain-LoRA layers (LyCORIS: network module and algo)."""
    from loratools.formats import get_format

    plain = get_format(adapter.format).plain_lora_metadata if adapter.format else None
    return plain(dict(adapter.metadata), layers) if plain else dict(adapter.metadata)
