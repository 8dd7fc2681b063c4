"""PNG plots for ``inspect`` / ``spectrum`` (matplotlib is an optional extra, imported lazily).

Left: σᵢ/σ₁ per layer, coloured by module type. Right: the entropy effective rank per layer against a
second rank (the stored rank for an adapter, the 90 % energy rank for ``spectrum``):

* up to :data:`MAX_BAR_LAYERS` layers, one bar per layer (naturally sorted within its module type) with
  the second rank drawn on top as a black tick;
* beyond that, two heatmaps (block × module), so the figure keeps a bounded size however many layers.

Heights are capped at :data:`MAX_HEIGHT_PX`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratools.errors import LoraToolsError
from loratools.formats.common import atomic_path

MAX_BAR_LAYERS = 60
DPI = 110
MAX_HEIGHT_PX = 2000
_MAX_HEIGHT_IN = MAX_HEIGHT_PX / DPI
_NUM = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key comparing digit runs as numbers: ``layers.2`` < ``layers.10`` (not ``1, 10, 11, …, 2``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _NUM.split(name) if part)


def natural_sorted(names: Sequence[str]) -> list[str]:
    return sorted(names, key=natural_key)


def module_type(name: str) -> str:
    """Grouping key for a layer: its last name component (q_proj, to_k, conv1...)."""
    parts = [p for p in name.replace("_lora", "").split(".") if not p.isdigit()]
    return parts[-1] if parts else name


def block_and_module(name: str) -> tuple[str, str]:
    """Split a layer name at its last numeric component: ``model.layers.12.self_attn.q_proj`` →
    (``model.layers.12``, ``self_attn.q_proj``). Names without a block number go to block ``-``."""
    parts = name.split(".")
    idx = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    if idx < 0 or idx == len(parts) - 1:
        return "-", module_type(name)
    return ".".join(parts[:idx + 1]), ".".join(parts[idx + 1:])


def _clip(label: str, width: int) -> str:
    """Long names keep their informative end: ``…transformer_blocks_0_attn1_to_q``."""
    return label if len(label) <= width else "…" + label[-(width - 1):]


def _short_blocks(blocks: list[str]) -> dict[str, str]:
    """Block labels without their common dotted prefix (``model.layers.12`` → ``12``)."""
    real = [b.split(".") for b in blocks if b != "-"]
    common = 0
    if len(real) > 1:
        while all(len(p) > common + 1 for p in real) and len({tuple(p[:common + 1]) for p in real}) == 1:
            common += 1
    return {b: (b if b == "-" else ".".join(b.split(".")[common:])) for b in blocks}


def plot_spectra(layers: list[dict], out: str | Path, title: str = "", force: bool = False,
                 outline_key: str = "rank", outline_label: str = "stored rank") -> None:
    """Write the spectra plot of ``layers`` (rows with ``name``, ``singular_values``, ``effective_rank``,
    ``outline_key``) to ``out``; a missing value (``None``) draws nothing for that layer."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LoraToolsError("--plot needs matplotlib: pip install 'loratools[plot]'") from None
    layers = sorted(layers, key=lambda r: (module_type(r["name"]), natural_key(r["name"])))
    types = sorted({module_type(r["name"]) for r in layers}, key=natural_key)
    cmap = plt.get_cmap("tab10" if len(types) <= 10 else "tab20")
    color = {t: cmap(i % cmap.N) for i, t in enumerate(types)}
    large = len(layers) > MAX_BAR_LAYERS
    if large:
        fig = _heatmap_figure(plt, layers, outline_key, outline_label)
        ax1 = fig.axes[0]
    else:
        height = min(max(5.5, 0.16 * len(layers) + 2.5 + 0.15 * len(types) / 2), _MAX_HEIGHT_IN)
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, height), width_ratios=[1.1, 1], layout="constrained")
        _bars(ax2, layers, color, outline_key, outline_label)
    seen = set()
    for r in layers:
        sv = [x for x in r["singular_values"] if x > 0]
        if not sv:
            continue
        t = module_type(r["name"])
        ax1.semilogy(range(1, len(sv) + 1), [x / sv[0] for x in sv], color=color[t], alpha=0.35 if large else 0.6,
                     lw=0.8 if large else 1.2, label=_clip(t, 32) if t not in seen else None)
        seen.add(t)
    ax1.set_xlabel("index i")
    ax1.set_ylabel("σᵢ / σ₁")
    ax1.set_title(f"normalized singular values ({len(layers)} layers)")
    ax1.grid(True, which="both", alpha=0.3)
    if seen:  # below the axes, never over the curves or the title
        widest = max(len(_clip(t, 32)) for t in seen)
        ax1.legend(fontsize=8, title="module type", loc="upper center", bbox_to_anchor=(0.5, -0.14),
                   ncol=max(1, min(len(seen), 60 // (widest + 4), 5)), frameon=False)
    if title:
        fig.suptitle(title)
    out = Path(out)
    with atomic_path(out, force, is_dir=False) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)


def _bars(ax: Any, layers: list[dict], color: dict, outline_key: str, outline_label: str) -> None:
    """One bar per layer (effective rank) with the outline rank as a black tick drawn over it."""
    y = range(len(layers))
    ax.barh(y, [r["effective_rank"] or 0 for r in layers], color=[color[module_type(r["name"])] for r in layers],
            alpha=0.85, label="effective rank")
    marks = [(r[outline_key], i) for i, r in enumerate(layers) if r.get(outline_key) is not None]
    if marks:
        ax.scatter([m for m, _ in marks], [i for _, i in marks], marker="|", s=140, linewidths=2.2, color="black",
                   zorder=3, label=outline_label)
    ax.set_yticks(list(y))
    ax.set_yticklabels([_clip(r["name"], 48) for r in layers], fontsize=6 if len(layers) > 20 else 8)
    ax.set_ylim(len(layers) - 0.5, -0.5)
    ax.set_xlabel(f"effective rank (bars) and {outline_label} (black ticks)")
    ax.set_title("effective rank per layer (by module type)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08 if len(layers) > 20 else -0.12), ncol=2,
              frameon=False)


def _heatmap_figure(plt: Any, layers: list[dict], outline_key: str, outline_label: str) -> Any:
    """Spectra on the left; effective rank and the outline rank as block × module heatmaps on the right."""
    import numpy as np

    cells = [(*block_and_module(r["name"]), r) for r in layers]
    modules = sorted({m for _, m, _ in cells}, key=natural_key)
    if len(modules) > 40:  # odd naming: fall back to the last name component
        cells = [(b, module_type(r["name"]), r) for b, _, r in cells]
        modules = sorted({m for _, m, _ in cells}, key=natural_key)
    blocks = natural_sorted(list({b for b, _, _ in cells}))
    labels = _short_blocks(blocks)
    col = {b: i for i, b in enumerate(blocks)}
    row = {m: i for i, m in enumerate(modules)}
    grids = []
    for key in ("effective_rank", outline_key):
        total = np.zeros((len(modules), len(blocks)))
        count = np.zeros_like(total)
        for b, m, r in cells:
            if r.get(key) is not None:
                total[row[m], col[b]] += r[key]
                count[row[m], col[b]] += 1
        grids.append(np.where(count > 0, total / np.maximum(count, 1), np.nan))
    height = min(max(6.0, 2 * (0.28 * len(modules) + 1.6) + 1.0), _MAX_HEIGHT_IN)
    fig = plt.figure(figsize=(16, height), layout="constrained")
    spec = fig.add_gridspec(2, 2, width_ratios=[1, 1.5])
    fig.add_subplot(spec[:, 0])  # fig.axes[0]: the spectra, drawn by the caller
    vmax = max((float(np.nanmax(g)) for g in grids if np.isfinite(g).any()), default=1.0)
    step = max(1, len(blocks) // 40)
    for i, (grid, what) in enumerate(zip(grids, ("entropy effective rank", outline_label))):
        ax = fig.add_subplot(spec[i, 1])
        im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                       interpolation="nearest")
        ax.set_yticks(range(len(modules)))
        ax.set_yticklabels([_clip(m, 32) for m in modules], fontsize=7)
        ax.set_xticks(range(0, len(blocks), step))
        ax.set_xticklabels([_clip(labels[b], 24) for b in blocks[::step]], fontsize=7, rotation=90)
        ax.set_title(f"{what} (block × module; {len(layers)} layers)", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.9, label="rank")
    return fig
