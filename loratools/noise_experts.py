"""Two-expert DiT pipelines (Wan 2.2 A14B): one adapter per expert transformer, in one run.

A diffusers Wan 2.2 A14B pipeline folder holds two transformers of the same structure: ``transformer`` (the high-noise
expert, used for timesteps at or above the pipeline's boundary) and ``transformer_2`` (the low-noise expert). A LoRA
adapts one expert, so extraction between two such folders gives two adapters: each component of BASE against the same
component of TUNED, written next to the output asked for as ``OUT_high_noise…`` and ``OUT_low_noise…`` (diffusers loads
the second with ``load_lora_weights(…, load_into_transformer_2=True)``; its names are ``transformer.…`` like the first).
"""

from __future__ import annotations

import os
from pathlib import Path

from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError

#: (output label, pipeline component) of each expert, high noise first
EXPERTS: tuple[tuple[str, str], ...] = (("high_noise", "transformer"), ("low_noise", "transformer_2"))


def expert_pairs(base: str | os.PathLike, tuned: str | os.PathLike) -> list[tuple[str, Path, Path]]:
    """``(label, base component folder, tuned component folder)`` per expert when BASE is a pipeline folder with a
    second transformer (``transformer_2``); [] otherwise. A TUNED without the same experts is an error."""
    b = Checkpoint(base)
    if not b.is_pipeline or EXPERTS[1][1] not in b.components:
        return []
    t = Checkpoint(tuned)
    missing = [comp for _, comp in EXPERTS if comp not in t.components]
    if missing:
        raise LoraToolsError(f"{tuned}: BASE {base} is a two-expert pipeline (transformer, transformer_2) but TUNED has "
                             f"no {', '.join(missing)} component; give a pipeline folder of the same model")
    return [(label, b.components[comp], t.components[comp]) for label, comp in EXPERTS]


def expert_output(out: str | os.PathLike, label: str) -> Path:
    """The output path of one expert: ``x.safetensors`` → ``x_high_noise.safetensors``, folder ``x`` → ``x_high_noise``."""
    p = Path(out)
    return p.with_name(f"{p.stem}_{label}{p.suffix}")
