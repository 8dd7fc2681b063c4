"""Per-layer spectral statistics (DESIGN.md §4), returned as plain data for the CLI to render."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from loratools.adapter import Adapter, Layer
from loratools.layers import spectrum

ENERGY_LEVELS = (0.5, 0.9, 0.99)


@dataclass
class SpectrumStats:
    fro_norm: float
    spectral_norm: float
    stable_rank: float
    effective_rank: float
    energy_rank: dict[str, int]
    singular_values: list[float] = field(repr=False)


def spectrum_stats(s: torch.Tensor, total_energy: float | None = None) -> SpectrumStats:
    """Statistics of a descending spectrum ``s``.

    stable rank = ‖ΔW‖_F² / σ₁²; effective rank = exp(H(p)), pᵢ = σᵢ / Σσ (Roy & Vetterli 2007);
    energy_rank[τ] = smallest k with Σ_{i≤k} σᵢ² ≥ τ‖ΔW‖_F².
    """
    s = s.double().cpu()
    energy = s.square()
    total = float(energy.sum()) if total_energy is None else float(total_energy)
    sigma1 = float(s[0]) if s.numel() else 0.0
    if total <= 0 or sigma1 <= 0:
        return SpectrumStats(0.0, 0.0, 0.0, 0.0, {str(t): 0 for t in ENERGY_LEVELS}, [0.0] * 0)
    p = s[s > 0] / s.sum()
    entropy = float(-(p * p.log()).sum())
    cum = torch.cumsum(energy, 0)
    ranks = {}
    for t in ENERGY_LEVELS:
        hit = (cum >= t * total * (1 - 1e-9)).nonzero()
        ranks[str(t)] = int(hit[0]) + 1 if hit.numel() else int(s.numel())
    return SpectrumStats(
        fro_norm=math.sqrt(total),
        spectral_norm=sigma1,
        stable_rank=total / sigma1**2,
        effective_rank=math.exp(entropy),
        energy_rank=ranks,
        singular_values=[float(x) for x in s],
    )


def layer_spectrum(layer: Layer) -> torch.Tensor:
    """Exact singular values of a layer's ΔW from its structure (float32 math, float64 for float64 input).

    Factored SVD of the exact factors; LoKr through the products σᵢ(W₁)σⱼ(W₂) (see loratools.layers).
    """
    dtype = torch.float64 if layer.dtype == torch.float64 else torch.float32
    return spectrum(layer, dtype)


def layer_type(layer: Layer) -> str:
    """``lora``, ``loha``, ``lokr``, ``full``; a LoRA with a magnitude is ``dora``, others get ``+dora``."""
    if layer.magnitude is None:
        return layer.kind
    return "dora" if layer.kind == "lora" else layer.kind + "+dora"


def layer_report(name: str, layer: Layer, base_norm: float | None = None) -> dict:
    """One inspect row: identity of the layer plus its spectrum statistics."""
    finite = all(bool(torch.isfinite(t).all()) for t in layer.tensors().values() if t.is_floating_point())
    s = layer_spectrum(layer) if finite else torch.zeros(0)
    st = spectrum_stats(s)
    row: dict = {
        "name": name,
        "type": layer_type(layer),
        "shape": list(layer.shape),
        "rank": layer.rank,
        "structural_rank": layer.rank,
        "dim": getattr(layer, "dim", layer.rank),
        "magnitude_axis": layer.magnitude_axis if layer.magnitude is not None else None,
        "alpha": getattr(layer, "effective_alpha", None),
        "scale": getattr(layer, "scale", None),
        "dtype": str(layer.dtype).replace("torch.", ""),
        **asdict(st),
    }
    row["singular_values"] = [x for x in st.singular_values if x > 0]
    if not finite:
        row.update(fro_norm=float("nan"), spectral_norm=float("nan"), stable_rank=float("nan"),
                   effective_rank=float("nan"), nonfinite=True)
    if base_norm is not None:
        row["base_fro_norm"] = base_norm
        row["relative_norm"] = st.fro_norm / base_norm if base_norm > 0 else None
    return row


def adapter_summary(adapter: Adapter, rows: list[dict]) -> dict:
    """Totals for the inspect report."""
    meta_keys = sorted(adapter.metadata)
    interesting = {
        k: adapter.metadata[k]
        for k in meta_keys
        if k in ("ss_network_dim", "ss_network_alpha", "ss_network_module", "ss_base_model_version", "ss_output_name")
    }
    cfg = {k: adapter.config[k] for k in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules") if k in adapter.config}
    if adapter.config.get("target_parameters"):  # PEFT LoRA on parameters (fused MoE experts)
        cfg["target_parameters"] = adapter.config["target_parameters"]
    return {
        "format": adapter.format,
        "layers": len(rows),
        "params": adapter.num_params,
        "conv_layers": sum(1 for layer in adapter.layers.values() if layer.is_conv),
        "ranks": sorted({r["rank"] for r in rows}),
        "metadata_keys": len(meta_keys),
        "metadata": interesting,
        "config": cfg,
        "extra_tensors": sorted(adapter.extra_tensors),
        "names_resolved": adapter.resolved,
        "warnings": list(adapter.warnings),
    }
