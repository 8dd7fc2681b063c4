"""Key-set helpers and convention prefixes shared by the DiT family descriptions (SD3, Wan, Qwen-Image,
HunyuanVideo; Flux.1 keeps its own copy in ``flux.py``).

A DiT family module describes its transformer as ``(diffusers path, original path, rows)`` pairs generated
from a structure; ``module_maps`` turns those pairs into ``FluxModuleMap`` objects (the canonical name is
``<component>.<diffusers path>``, the original key carries the checkpoint's prefix, ``row_order`` marks
row permutations). Everything here is about *names*: no tensor math, nothing from ``loratools.formats``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .flux import COMFY_PREFIX, ORIGINAL_PREFIXES, FluxModuleMap, strip_prefix
from .flux import _count as count_blocks
from .flux import _keyset as keyset

#: kohya "original" stem prefix: sd-scripts / musubi-tuner write ``lora_unet_`` + the original path with
#: every ``.`` replaced by ``_`` (one stem for a fused original tensor)
KOHYA_ORIGINAL_PREFIX = "lora_unet_"
#: kohya "diffusers" stem prefix: OneTrainer writes ``lora_transformer_`` + the diffusers path mangled
KOHYA_DIFFUSERS_PREFIX = "lora_transformer_"
#: SimpleTuner's LyCORIS stems: ``lycoris_`` + the diffusers path mangled
LYCORIS_PREFIX = "lycoris_"
#: diffusers / PEFT LoRA keys: ``transformer.<diffusers path>`` (pipeline level) or the bare path
#: (``load_lora_adapter`` on the model, DiffSynth)
DIFFUSERS_PREFIXES = ("transformer.", "")
#: the prefix of an original checkpoint key that makes its layout "original"; the others are
#: "original_unprefixed"
PREFIXED = "model.diffusion_model."

Pair = tuple[str, str, tuple[int, int] | None]

__all__ = [
    "COMFY_PREFIX",
    "DIFFUSERS_PREFIXES",
    "KOHYA_DIFFUSERS_PREFIX",
    "KOHYA_ORIGINAL_PREFIX",
    "LYCORIS_PREFIX",
    "ORIGINAL_PREFIXES",
    "PREFIXED",
    "Pair",
    "any_block",
    "build_maps",
    "count_blocks",
    "find_prefix",
    "fused_rows",
    "keyset",
    "layout_of",
    "mangle",
    "rows_of",
    "strip_prefix",
    "swap_halves",
]


def mangle(path: str) -> str:
    """kohya-style mangling: every ``.`` becomes ``_`` (``blocks.0.self_attn.q`` → ``blocks_0_self_attn_q``)."""
    return path.replace(".", "_")


def find_prefix(
    keys: list[str], has: Callable[[str, list[str]], bool], prefixes: Iterable[str] = ORIGINAL_PREFIXES
) -> str | None:
    """The first of ``prefixes`` (longest first) for which ``has(prefix, keys)`` holds, else None."""
    for p in prefixes:
        if has(p, keys):
            return p
    return None


def layout_of(prefix: str) -> str:
    """Layout name of an original key set read with ``prefix``: "original" or "original_unprefixed"."""
    return "original" if prefix == PREFIXED else "original_unprefixed"


def any_block(keys: list[str], prefix: str, block: str, child: str) -> bool:
    """True when some key is ``<prefix><block>.<N>.<child>…`` (``child`` a dotted path start)."""
    pat = re.compile(re.escape(prefix + block) + r"\.\d+\." + re.escape(child))
    return any(pat.match(k) for k in keys)


def rows_of(keys: Iterable[str] | Mapping[str, Any], key: str, dim: int = 0) -> int | None:
    """Size ``dim`` of the tensor ``key`` when ``keys`` maps names to things with a ``.shape``, else None."""
    if not isinstance(keys, Mapping):
        return None
    shape = getattr(keys.get(key), "shape", None)
    return int(shape[dim]) if shape is not None and len(shape) > dim else None


def fused_rows(original: str, children: Iterable[str], sizes: Iterable[int]) -> list[Pair]:
    """Pairs of a fused original holding ``children`` stacked by rows of the given sizes, in row order."""
    out: list[Pair] = []
    start = 0
    for child, size in zip(children, sizes, strict=True):
        out.append((child, original, (start, start + size)))
        start += size
    return out


def swap_halves(rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``row_order`` of an (original shift, scale) → (diffusers scale, shift) modulation of ``rows`` rows."""
    h = rows // 2
    return ((h, rows), (0, h))


def build_maps(
    pairs: Iterable[Pair],
    prefix: str,
    row_orders: Mapping[str, tuple[tuple[int, int], ...]] | None = None,
    component: str = "transformer",
) -> list[FluxModuleMap]:
    """``FluxModuleMap``s of ``(diffusers path, original path, rows)`` pairs.

    Canonical ``<component>.<diffusers path>``, original ``prefix + original path``, weight key
    ``original + ".weight"``; ``row_orders`` maps a diffusers path to the original row blocks whose
    concatenation is the canonical weight (a permuted, unfused module).
    """
    orders = row_orders or {}
    out = []
    for d, o, rows in pairs:
        orig = prefix + o
        out.append(FluxModuleMap(f"{component}.{d}", orig, rows, f"{orig}.weight", row_order=orders.get(d)))
    return out
