"""PNG plots for ``inspect`` / ``spectrum`` (matplotlib is an optional extra, imported lazily)."""

from __future__ import annotations

from pathlib import Path

from loratools.errors import LoraToolsError
from loratools.formats.common import atomic_path


def module_type(name: str) -> str:
    """Grouping key for a layer: its last name component (q_proj, to_k, conv1...)."""
    parts = [p for p in name.replace("_lora", "").split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def plot_spectra(layers: list[dict], out: str | Path, title: str = "", force: bool = False,
                 outline_key: str = "rank", outline_label: str = "stored rank") -> None:
    """Left: σᵢ/σ₁ per layer on a log axis, coloured by module type. Right: effective rank per layer.

    The right panel outlines each bar with ``row[outline_key]`` (the stored rank for an adapter, an
    energy rank for ``spectrum``); a missing effective rank (``None``) draws no bar.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoraToolsError("--plot needs matplotlib: pip install 'loratools[plot]'") from None
    types = sorted({module_type(r["name"]) for r in layers})
    cmap = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    color = {t: cmap(i % cmap.N) for i, t in enumerate(types)}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, max(4.5, 0.16 * len(layers) + 1.5)),
                                   gridspec_kw={"width_ratios": [1.1, 1]})
    seen = set()
    for r in layers:
        sv = [x for x in r["singular_values"] if x > 0]
        if not sv:
            continue
        t = module_type(r["name"])
        ax1.semilogy(range(1, len(sv) + 1), [x / sv[0] for x in sv], color=color[t], alpha=0.6, lw=1.2,
                     label=t if t not in seen else None)
        seen.add(t)
    ax1.set_xlabel("index i")
    ax1.set_ylabel("σᵢ / σ₁")
    ax1.set_title("normalized singular values")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8, title="module type")
    grouped = sorted(layers, key=lambda r: (module_type(r["name"]), r["name"]))
    names = [r["name"] for r in grouped]
    ax2.barh(range(len(grouped)), [r["effective_rank"] or 0 for r in grouped],
             color=[color[module_type(n)] for n in names])
    ax2.barh(range(len(grouped)), [r[outline_key] or 0 for r in grouped], fill=False, edgecolor="0.5", lw=0.6)
    ax2.set_yticks(range(len(grouped)))
    ax2.set_yticklabels(names, fontsize=6 if len(grouped) > 20 else 8)
    ax2.invert_yaxis()
    ax2.set_xlabel(f"effective rank (bars) vs {outline_label} (outline)")
    ax2.set_title("entropy effective rank per layer (grouped by module type)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, force, is_dir=False) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
