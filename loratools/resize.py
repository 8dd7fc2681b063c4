"""Library side of ``resize``: exact rank reduction and pruning of an adapter, in factored space.

Algorithm, per layer (any kind: LoRA, LoHa, LoKr, full — all hand out exact factors):

1. ``L, R = layer.factors()`` with ``ΔW = L Rᵀ`` (scale folded in).
2. :func:`loratools.linalg.factored_svd` — thin QR of both factors and a k×k SVD — gives the exact
   spectrum ``ΔW = U Σ Vᵀ`` without ever forming the m×n product. ``‖ΔW‖_F² = Σ σᵢ²`` exactly.
3. The shared :class:`~loratools.linalg.RankRule` (the same code ``extract`` uses) picks k; by
   Eckart–Young the truncation ``U_k Σ_k V_kᵀ`` is the best rank-k approximation, with relative
   Frobenius error ``√(Σ_{i>k} σᵢ²) / ‖ΔW‖_F``.
4. :func:`loratools.linalg.lora_from_svd` writes it back as a LoRA with a balanced split
   ``up = U_k √Σ_k``, ``down = √Σ_k V_kᵀ`` and alpha = k (rsLoRA: alpha = √k), i.e. scale 1, so the
   scaled product is exactly the truncated delta and both factors stay at magnitude √σ (fp16-safe).

A layer whose chosen rank equals its current rank is copied unchanged (bit-exact). Pruning
(``prune_below``) drops layers by ‖ΔW‖_F; include/exclude globs keep or drop layers by name.
DoRA magnitudes are kept as they are (with a warning: the normalisation of ``W + ΔW_k`` differs
slightly from that of ``W + ΔW``, so the result is an approximation).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.device import on_device, resolve_device
from loratools.distributed import parallel_map
from loratools.errors import LoraToolsError
from loratools.layers import exact_svd
from loratools.linalg import RankRule, factored_norm2, lora_from_svd

Progress = Callable[[Iterable, int], Iterable]


@dataclass
class Prune:
    """Drop layers with ‖ΔW‖_F below ``value`` (``relative``: below value × the largest layer norm)."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str, relative: bool = False) -> Prune:
        """``"0.05"`` (absolute, or relative with ``relative``), ``"5%"`` (relative to the largest)."""
        t = text.strip()
        pct = t.endswith("%")
        try:
            value = float(t[:-1] if pct else t)
        except ValueError:
            raise LoraToolsError(f"--prune-below {text!r} is not a number (use e.g. 0.01 or 5%)") from None
        if not math.isfinite(value) or value < 0:
            raise LoraToolsError(f"--prune-below must be a finite value ≥ 0, got {text!r}")
        return cls(value / 100.0 if pct else value, relative or pct)


@dataclass
class LayerResize:
    name: str
    kind: str
    shape: list[int]
    old_rank: int
    new_rank: int
    fro_norm: float
    retained_energy: float
    relative_error: float
    action: str  # resized | kept | pruned | excluded
    params_before: int
    params_after: int


@dataclass
class ResizeReport:
    layers: list[LayerResize] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rule: str = ""

    def totals(self, bytes_before: int, bytes_after: int) -> dict:
        total = sum(r.fro_norm**2 for r in self.layers)
        lost = sum((r.relative_error * r.fro_norm) ** 2 for r in self.layers)
        out_layers = [r for r in self.layers if r.action in ("resized", "kept")]
        return {
            "layers_in": len(self.layers),
            "layers_out": len(out_layers),
            "resized": sum(r.action == "resized" for r in self.layers),
            "pruned": sum(r.action == "pruned" for r in self.layers),
            "excluded": sum(r.action == "excluded" for r in self.layers),
            "params_before": sum(r.params_before for r in self.layers),
            "params_after": sum(r.params_after for r in self.layers),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "retained_energy": (total - lost) / total if total > 0 else 1.0,
            "relative_error": math.sqrt(lost / total) if total > 0 else 0.0,
        }

    def as_dict(self) -> dict:
        return {"rule": self.rule, "layers": [asdict(r) for r in self.layers], "warnings": list(self.warnings)}


def _selected(name: str, layer: Layer, include: list[str], exclude: list[str]) -> bool:
    names = {name, layer.meta.get("kohya_stem") or name}
    if include and not any(fnmatch.fnmatchcase(n, g) for n in names for g in include):
        return False
    return not any(fnmatch.fnmatchcase(n, g) for n in names for g in exclude)


def _compute_dtype(layer: Layer) -> torch.dtype:
    return torch.float64 if layer.dtype == torch.float64 else torch.float32


def layer_svd(layer: Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact thin SVD of a layer's ΔW (2-D view) from its factors (LoKr through its Kronecker SVDs)."""
    return exact_svd(layer, _compute_dtype(layer))


def truncate_layer(layer: Layer, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int,
                   dtype: torch.dtype | None = None) -> LoraLayer:
    """LoRA layer holding the rank-k truncation of ``U Σ Vh``, keeping rsLoRA, embedding, DoRA and meta."""
    rslora = bool(getattr(layer, "rslora", False))
    new = lora_from_svd(u[:, :k], s[:k], vh[:k], layer.shape, dtype or layer.dtype, rslora=rslora)
    new.embedding = bool(getattr(layer, "embedding", False))
    new.magnitude = layer.magnitude
    new.magnitude_axis = layer.magnitude_axis
    new.meta = dict(layer.meta)
    return new


def resize_adapter(
    adapter: Adapter,
    rule: RankRule | None,
    conv_rule: RankRule | None = None,
    prune: Prune | None = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    progress: Progress | None = None,
    device: str = "cpu",
) -> tuple[Adapter, ResizeReport]:
    """Resize (``rule``; ``conv_rule`` for conv layers), prune and filter ``adapter``; the factored SVDs run on
    ``device`` (``cuda``: each torchrun rank's own GPU).

    Returns a new :class:`Adapter` (same format, metadata and config; writers update rank/alpha
    metadata) and a :class:`ResizeReport`. ``rule=None`` keeps every layer's rank (prune/filter only).
    """
    include, exclude = list(include or []), list(exclude or [])
    report = ResizeReport(rule=(rule.describe() if rule else "keep ranks")
                          + (f"; conv: {conv_rule.describe()}" if conv_rule else ""))
    items = list(adapter.layers.items())
    selected = {name for name, layer in items if _selected(name, layer, include, exclude)}
    # ‖ΔW‖_F of every selected layer from the Gram matrices of its factors (cheap, no SVD), so that a
    # relative prune threshold is known before the one streaming SVD pass below
    norms = {name: math.sqrt(factored_norm2(*layer.factors(_compute_dtype(layer))))
             for name, layer in items if name in selected} if prune is not None else {}
    threshold = None
    if prune is not None:
        threshold = prune.value * (max(norms.values(), default=0.0) if prune.relative else 1.0)

    dev, cpu = resolve_device(device), torch.device("cpu")

    def work(item: tuple[str, Layer]) -> tuple[LayerResize, Layer | None, str | None]:
        name, layer = item
        params = layer.num_params
        base = dict(name=name, kind=layer.kind + ("+dora" if layer.magnitude is not None else ""),
                    shape=list(layer.shape), old_rank=layer.rank, params_before=params)
        if name not in selected:
            return LayerResize(**base, new_rank=0, fro_norm=0.0, retained_energy=0.0, relative_error=1.0,
                               action="excluded", params_after=0), None, None
        if threshold is not None and norms[name] < threshold:
            return LayerResize(**base, new_rank=0, fro_norm=norms[name], retained_energy=0.0, relative_error=1.0,
                               action="pruned", params_after=0), None, None
        layer = on_device(layer, dev)
        u, s, vh = layer_svd(layer)
        r = conv_rule if (conv_rule is not None and layer.is_conv) else rule
        energy = s.double().square()
        total = float(energy.sum())
        norm = math.sqrt(total)
        k = layer.rank if r is None else r.choose(s, total, complete=True)
        if r is not None and k == 0:
            return LayerResize(**base, new_rank=0, fro_norm=norm, retained_energy=0.0,
                               relative_error=1.0 if total > 0 else 0.0, action="pruned", params_after=0), None, \
                f"{name}: the rank rule keeps no singular value; layer dropped"
        if r is None or (k >= layer.rank and isinstance(layer, LoraLayer)):
            return LayerResize(**base, new_rank=layer.rank, fro_norm=norm, retained_energy=1.0, relative_error=0.0,
                               action="kept", params_after=params), item[1], None
        new = on_device(truncate_layer(layer, u, s, vh, k), cpu)
        lost = float(energy[k:].sum())
        return LayerResize(**base, new_rank=k, fro_norm=norm, retained_energy=(total - lost) / total if total > 0 else 1.0,
                           relative_error=math.sqrt(lost / total) if total > 0 else 0.0, action="resized",
                           params_after=new.num_params), new, None

    layers: dict[str, Layer] = {}
    dora_resized = []
    costs = [float(math.prod(la.shape) * la.rank) if n in selected else 0.0 for n, la in items]
    for (name, layer), (row, new, warning) in zip(items, parallel_map(items, work, costs, [n for n, _ in items],
                                                                      progress=progress)):
        report.layers.append(row)
        if warning:
            report.warnings.append(warning)
        if new is not None:
            layers[name] = new
            if row.action == "resized" and layer.magnitude is not None:
                dora_resized.append(name)
    if not layers:
        raise LoraToolsError(f"{adapter.source}: nothing left to write (every layer was pruned or excluded)")
    if dora_resized:
        report.warnings.append(
            f"{len(dora_resized)} DoRA layer(s) resized (e.g. {dora_resized[0]}): the LoRA part was truncated and the "
            "magnitude vector kept unchanged; DoRA renormalises W + ΔW_k row by row, so the effective weight "
            "m·(W+ΔW_k)/‖W+ΔW_k‖ is an approximation of the original (error of the order of the reported relative error)"
        )
    out = replace(adapter, layers=layers, warnings=list(adapter.warnings))
    return out, report


def adapter_bytes(adapter: Adapter, dtype: torch.dtype | None = None) -> int:
    """Storage of the adapter's layer tensors (in ``dtype`` if given)."""
    total = 0
    for layer in adapter.layers.values():
        for t in layer.tensors().values():
            size = (torch.empty(0, dtype=dtype).element_size() if dtype is not None and t.is_floating_point()
                    else t.element_size())
            total += t.numel() * size
    return total
