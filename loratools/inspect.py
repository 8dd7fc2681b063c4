"""Library side of ``inspect``: an adapter's per-layer spectra and totals as plain data."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from loratools.checkpoint import Checkpoint
from loratools.formats import load_adapter
from loratools.formats.experts import coverage, expert_matcher
from loratools.formats.trainer import guess_trainer
from loratools.stats import adapter_summary, layer_report

Progress = Callable[[Iterable, int], Iterable]


def inspect_adapter(
    path: str | Path,
    base: str | Path | None = None,
    format: str | None = None,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
    family: str | None = None,
) -> dict:
    """``{"format", "layers": [row...], "summary": {...}}`` — see :func:`loratools.stats.layer_report`."""
    ckpt = Checkpoint(base) if base else None
    adapter = load_adapter(path, format=format, base=ckpt, allow_nonfinite=allow_nonfinite, family=family)
    items = list(adapter.layers.items())
    rows = []
    unmatched = []
    held = expert_matcher(ckpt) if ckpt is not None else None
    for name, layer in (progress(items, len(items)) if progress else items):
        base_norm = None
        if ckpt is not None:
            ref = ckpt.module_ref(name)
            if ref is None:
                if not held(name):  # an expert slice of a fused 3-D tensor has no module weight of its own here
                    unmatched.append(name)
            else:
                w = ckpt.module_weight(name)
                if tuple(w.shape) != tuple(layer.shape):
                    adapter.warnings.append(f"{name}: adapter shape {tuple(layer.shape)} != base {ref.key} {tuple(w.shape)}")
                base_norm = float(w.float().norm())
        rows.append(layer_report(name, layer, base_norm))
    summary = adapter_summary(adapter, rows)
    conventions = Counter(la.meta["convention"] for la in adapter.layers.values() if la.meta.get("convention"))
    summary["family"] = adapter.family
    summary["convention"] = conventions.most_common(1)[0][0] if conventions else adapter.format
    summary["trainer"] = guess_trainer(adapter)
    if ckpt is not None:
        summary["unmatched"] = unmatched
        summary["base"] = str(base)
    summary["total_fro_norm"] = math.sqrt(sum(r["fro_norm"] ** 2 for r in rows))
    summary["experts"] = coverage(adapter, ckpt)
    if summary["experts"] is not None and summary["experts"]["experts_touched"] == 0:
        summary["warnings"].append(
            f"the adapter touches none of the {summary['experts']['experts_total']} routed experts of the base "
            f"({len(summary['experts']['modules'])} MoE layer(s)): only attention / shared / router modules change")
    return {"format": adapter.format, "source": str(path), "layers": rows, "summary": summary}
