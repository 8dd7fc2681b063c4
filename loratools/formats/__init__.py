"""Adapter formats: detection, reading into the canonical model, writing, and name resolution."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from loratools.adapter import Adapter, LoraLayer
from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError
from loratools.formats import diffusers, kohya, lycoris, peft
from loratools.formats.common import (
    adapter_component,
    check_single_component,
    mangle,
    read_tensors,
    split_component,
    take_extra_tensors,
)

FORMATS = ("peft", "kohya", "diffusers")
#: formats written as one safetensors file (the others are folders)
SINGLE_FILE_FORMATS = ("kohya", "diffusers", "lycoris")


def check_output_name(format: str, out: str | Path) -> None:
    """Refuse, before any work, an output name the format's file cannot carry.

    kohya / diffusers outputs are single safetensors files: a name ending in another suffix (``.bin``, ``.pt``,
    ``.ckpt``…) makes loaders take it for a pickle (ComfyUI, sd-webui and diffusers pick the reader by suffix).
    A name without any suffix is accepted (loratools recognises the file by its content).
    """
    if format not in SINGLE_FILE_FORMATS:
        return
    suffix = Path(out).suffix
    if suffix and suffix.lower() != ".safetensors":
        raise LoraToolsError(
            f"{out}: a {format} adapter is a .safetensors file, but the output name ends in {suffix!r}; "
            "name it *.safetensors"
        )


def drop_empty_layers(adapter: Adapter, why: str = "") -> None:
    """Drop rank-0 layers (they hold no delta and no reader accepts them) with one warning; none left is an error."""
    empty = [n for n, la in adapter.layers.items() if isinstance(la, LoraLayer) and la.rank == 0]
    if not empty:
        return
    if len(empty) == len(adapter.layers):
        raise LoraToolsError(f"every layer has rank 0{why} (e.g. {empty[0]}); nothing to write")
    adapter.layers = {n: la for n, la in adapter.layers.items() if la.rank > 0}
    adapter.warnings.append(f"{len(empty)} layer(s) have rank 0{why} (e.g. {empty[0]}); dropped")


def _classify(key: str) -> str:
    if key.startswith("base_model.model."):
        return "peft"
    if diffusers.is_diffusers_key(key):
        return "diffusers"
    if kohya.is_kohya_key(key):
        return "kohya"
    return "unknown"


def _adapter_file(path: Path) -> Path:
    if path.is_file():
        return path
    cands = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if len(cands) == 1:
        return cands[0]
    if not cands:
        raise LoraToolsError(f"{path}: no adapter found (no adapter_config.json, no .safetensors file)")
    raise LoraToolsError(f"{path}: several weight files ({', '.join(c.name for c in cands[:4])}); name the file")


def detect_format(path: Path, keys: list[str] | None = None) -> str:
    """Format of an adapter path; raises with the offending keys on mixed or unknown layouts."""
    if peft.detect(path):
        return "peft"
    if keys is None:
        tensors, metadata = read_tensors(_adapter_file(path))
        take_extra_tensors(tensors, metadata, path)
        keys = list(tensors)
    kinds = Counter(_classify(k) for k in keys)
    if not keys:
        raise LoraToolsError(f"{path}: file holds no tensors")
    if kinds.get("unknown"):
        first = next(k for k in keys if _classify(k) == "unknown")
        raise LoraToolsError(f"{path}: unknown key layout: {first!r} ({kinds['unknown']} key(s) not recognised)")
    if len(kinds) > 1:
        examples = "; ".join(f"{n} {k} key(s), e.g. {next(x for x in keys if _classify(x) == k)!r}" for k, n in kinds.items())
        raise LoraToolsError(f"{path}: mixed key conventions in one file: {examples}")
    return next(iter(kinds))


def load_adapter(
    path: str | Path,
    format: str | None = None,
    base: Checkpoint | str | Path | None = None,
    allow_nonfinite: bool = False,
) -> Adapter:
    """Read an adapter into the canonical model; resolve its names against ``base`` if given."""
    path = Path(path)
    if not path.exists():
        raise LoraToolsError(f"{path}: no such file or folder")
    if format not in (None, "auto") and format not in FORMATS:
        raise LoraToolsError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if format in (None, "auto"):
        format = detect_format(path)
    if format == "peft":
        if not peft.detect(path):
            raise LoraToolsError(f"{path}: not a PEFT adapter folder (no adapter_config.json)")
        adapter = peft.read(path)
    else:
        f = _adapter_file(path)
        tensors, metadata = read_tensors(f)
        extra = take_extra_tensors(tensors, metadata, f)
        reader = kohya if format == "kohya" else diffusers
        adapter = reader.read_tensors_map(tensors, metadata, str(f))
        adapter.extra_tensors = extra
    adapter.check_finite(allow_nonfinite)
    if base is not None:
        ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base)
        resolve_names(adapter, ckpt)
        lycoris.fit_base(adapter, ckpt)
    return adapter


def resolve_names(adapter: Adapter, base: Checkpoint) -> list[str]:
    """Map mangled (kohya) names to the base's module paths, in place. Returns unmatched names.

    A stem matches a module when their mangled forms are equal, or when one is a ``_``-suffix of
    the other (a base with or without a wrapper prefix); several candidates is an error.
    """
    modules = base.modules()
    by_mangled: dict[str, list[str]] = {}
    for m in modules:
        by_mangled.setdefault(mangle(m), []).append(m)
    unmatched: list[str] = []
    renamed: dict[str, object] = {}
    for name, layer in adapter.layers.items():
        stem = layer.meta.get("kohya_stem")
        if stem is None:
            path = split_component(name)[1]
            if path not in modules and name not in modules:
                unmatched.append(name)
            renamed[name] = layer
            continue
        tail = kohya.split_prefix(stem)[1]
        cands = by_mangled.get(tail) or by_mangled.get(stem) or [
            m for mm, ms in by_mangled.items() for m in ms if mm.endswith("_" + tail) or tail.endswith("_" + mm)
        ]
        shape_ok = [m for m in cands if tuple(base.shape(modules[m]))[: len(layer.shape)] == layer.shape
                    or tuple(base.shape(modules[m])) == layer.shape]
        cands = shape_ok or cands
        if len(cands) > 1:
            raise LoraToolsError(f"{stem}: ambiguous against base, matches {', '.join(sorted(cands)[:4])}")
        if not cands:
            unmatched.append(name)
            renamed[name] = layer
            continue
        if cands[0] in renamed:
            raise LoraToolsError(f"{stem}: resolves to {cands[0]}, which another layer already targets")
        renamed[cands[0]] = layer
    adapter.layers = renamed  # type: ignore[assignment]
    adapter.resolved = not any(adapter.layers[n].meta.get("kohya_stem") == n for n in unmatched)
    if unmatched:
        adapter.warnings.append(
            f"{len(unmatched)} layer(s) match no module of the base checkpoint, e.g. {unmatched[0]}"
        )
    return unmatched


def save_adapter(
    adapter: Adapter,
    out: str | Path,
    format: str,
    force: bool = False,
    dtype: torch.dtype | None = None,
    kohya_prefix: str | None = None,
    component: str | None = None,
    force_component: bool = False,
) -> None:
    """Write ``adapter`` in ``format`` atomically (temp file/folder + rename). ``component`` is the pipeline
    component (``unet``, ``transformer``, …) of layers whose names carry none, for kohya and diffusers output
    (default: :func:`~loratools.formats.common.adapter_component`'s guess, else unet); with ``force_component``
    it is every layer's component (the user's ``--component``; refused for a multi-component adapter)."""
    out = Path(out)
    check_output_name(format, out)
    drop_empty_layers(adapter)
    if force_component and component:
        check_single_component(adapter, component)
    component = component or adapter_component(adapter.layers)
    if format == "lycoris":  # LyCORIS files are kohya-layout files: LoRA layers (+ dora_scale) go back as kohya
        format = "kohya"
    if format == "peft":
        peft.write(adapter, out, force, dtype)
    elif format == "kohya":
        kohya.write(adapter, out, force, dtype, kohya_prefix, component, force_component)
    elif format == "diffusers":
        diffusers.write(adapter, out, force, dtype, component, force_component)
    else:
        raise LoraToolsError(f"unknown output format {format!r}; expected one of {', '.join(FORMATS)}")
