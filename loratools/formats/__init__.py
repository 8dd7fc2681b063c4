"""Adapter formats: detection, reading into the canonical model, writing, and name resolution."""

from __future__ import annotations

from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.checkpoint import Checkpoint
from loratools.errors import LoraToolsError
from loratools.formats import comfy, diffusers, experts, gguf, kohya, lycoris, peft
from loratools.formats.common import adapter_file, file_keys
from loratools.formats.naming import adapter_component, check_single_component
from loratools.formats.resolve import resolve, resolve_names  # noqa: F401  (resolve_names: public API)
from loratools.formats.spec import AdapterFormat, WriteOptions

#: every format, in detection order (a new format is one module with a ``FORMAT`` and one entry here)
REGISTRY: dict[str, AdapterFormat] = {
    f.name: f for f in (peft.FORMAT, kohya.FORMAT, diffusers.FORMAT, lycoris.FORMAT, comfy.FORMAT, gguf.FORMAT)
}
#: formats that can be written (output choices)
FORMATS = tuple(name for name, f in REGISTRY.items() if f.write is not None)
#: formats that can be read (detected from a file's keys or a folder); write-only formats (gguf) are not
READ_FORMATS = tuple(name for name, f in REGISTRY.items() if f.read is not None)


def get_format(name: str) -> AdapterFormat:
    """The registered format ``name`` (one-line error listing the known ones otherwise)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise LoraToolsError(f"unknown format {name!r}; expected one of {', '.join(REGISTRY)}") from None


def writer_of(name: str) -> AdapterFormat:
    """The format that writes adapters read as ``name`` (a read-only format names its writer in ``writes_as``)."""
    spec = get_format(name)
    return get_format(spec.writes_as) if spec.write is None and spec.writes_as else spec


def output_is_folder(format: str | None) -> bool | None:
    """Whether ``format`` writes a folder (None: the format is not known yet, e.g. "same as the input")."""
    return None if format is None else writer_of(format).folder


def check_output_name(format: str, out: str | Path) -> None:
    """Refuse, before any work, an output name the format's file cannot carry.

    Single-file formats write one file of their own kind (``spec.suffix``: safetensors, or ``.gguf``): a
    safetensors file named ``.bin``, ``.pt``, ``.ckpt``… makes loaders take it for a pickle (ComfyUI, sd-webui and
    diffusers pick the reader by suffix). A name without any suffix is accepted (loratools recognises the file by
    its content).
    """
    spec = writer_of(format)
    if spec.folder:
        return
    suffix = Path(out).suffix
    if suffix and suffix.lower() != spec.suffix:
        raise LoraToolsError(
            f"{out}: a {spec.name} adapter is a {spec.suffix} file, but the output name ends in {suffix!r}; "
            f"name it *{spec.suffix}"
        )


def check_base_for(format: str, base: str | Path | Checkpoint | None) -> None:
    """Refuse, before any work, a missing or unusable ``--base`` for a format that needs the base model to write
    (GGUF names the base's own tensors); nothing for the others."""
    spec = writer_of(format)
    if spec.check_base is not None:
        spec.check_base(None if base is None else base.path if isinstance(base, Checkpoint) else Path(base))


def drop_empty_layers(adapter: Adapter, why: str = "") -> None:
    """Drop rank-0 layers (they hold no delta and no reader accepts them) with one warning; none left is an error."""
    empty = [n for n, la in adapter.layers.items() if isinstance(la, LoraLayer) and la.rank == 0]
    if not empty:
        return
    if len(empty) == len(adapter.layers):
        raise LoraToolsError(f"every layer has rank 0{why} (e.g. {empty[0]}); nothing to write")
    adapter.layers = {n: la for n, la in adapter.layers.items() if la.rank > 0}
    adapter.warnings.append(f"{len(empty)} layer(s) have rank 0{why} (e.g. {empty[0]}); dropped")


def fuse_for(adapter: Adapter, format: str, kohya_style: str | None = None) -> bool:
    """Group ``adapter``'s layers in place as ``format``'s file will hold them (a DiT family's fused tensors in
    sd-scripts / ComfyUI names), so that rank rules act on the fused ΔW the file stores; notes go to the adapter's
    warnings. Returns whether anything was grouped."""
    spec = writer_of(format)
    got = spec.fused_layers(adapter, WriteOptions(kohya_style=kohya_style)) if spec.fused_layers else None
    if got is None:
        return False
    adapter.layers, notes = got
    adapter.warnings.extend(notes)
    return True


def refusal(format: str, layers: dict[str, Layer]) -> str | None:
    """The first reason ``format`` cannot hold one of ``layers`` (``"<name>: <why>"``), or None."""
    spec = writer_of(format)
    for name, layer in layers.items():
        why = spec.refuse(name, layer)
        if why:
            return f"{name}: {why}"
    return None


def _claimants(key: str) -> list[str]:
    return [name for name, f in REGISTRY.items() if f.claims is not None and f.claims(key)]


def detect_format(path: Path, keys: list[str] | None = None) -> str:
    """Format of an adapter path; raises with the offending keys on mixed or unknown layouts.

    Folder formats answer from the path; for a single file, the format that claims every key wins (the higher
    ``priority`` where several do); a key no format claims, or keys only different formats claim, is an error.
    """
    for name, f in REGISTRY.items():
        if f.detect is not None and f.detect(path):
            return name
    if keys is None:
        keys = file_keys(adapter_file(path))
    if not keys:
        raise LoraToolsError(f"{path}: file holds no tensors")
    claims = {k: set(_claimants(k)) for k in keys}
    unknown = [k for k, c in claims.items() if not c]
    if unknown:
        raise LoraToolsError(f"{path}: unknown key layout: {unknown[0]!r} ({len(unknown)} key(s) not recognised)")
    common = set.intersection(*claims.values())
    if common:
        return max(common, key=lambda n: REGISTRY[n].priority)
    groups: dict[str, list[str]] = {}
    for k, c in claims.items():
        groups.setdefault(max(c, key=lambda n: REGISTRY[n].priority), []).append(k)
    examples = "; ".join(f"{len(ks)} {n} key(s), e.g. {ks[0]!r}" for n, ks in groups.items())
    raise LoraToolsError(f"{path}: mixed key conventions in one file: {examples}")


def load_adapter(
    path: str | Path,
    format: str | None = None,
    base: Checkpoint | str | Path | None = None,
    allow_nonfinite: bool = False,
    family: str | None = None,
) -> Adapter:
    """Read an adapter into the canonical model; name its layers canonically where a model family knows their
    convention (``family``: a family name, or None/"auto" to detect), and resolve them against ``base`` if given
    (see :mod:`loratools.formats.resolve`)."""
    path = Path(path)
    if not path.exists():
        raise LoraToolsError(f"{path}: no such file or folder")
    if format in (None, "auto"):
        format = detect_format(path)
    spec = get_format(format)
    if spec.detect is not None and not spec.detect(path):
        raise LoraToolsError(f"{path}: not a {spec.name} adapter ({spec.summary})")
    if spec.detect is None:
        found = detect_format(path)
        if found != format and writer_of(found).name == format:  # a variant the named format's files may hold
            spec = get_format(found)
    if spec.read is None:
        raise LoraToolsError(f"{path}: reading {spec.name} adapters is not supported (loratools writes them)")
    adapter = spec.read(path)
    adapter.check_finite(allow_nonfinite)
    ckpt = None if base is None else base if isinstance(base, Checkpoint) else Checkpoint(base)
    resolve(adapter, ckpt, family)
    if ckpt is not None:
        lycoris.fit_base(adapter, ckpt)
    experts.settle(adapter, ckpt)
    return adapter


def save_adapter(
    adapter: Adapter,
    out: str | Path,
    format: str,
    force: bool = False,
    dtype: torch.dtype | None = None,
    kohya_prefix: str | None = None,
    component: str | None = None,
    force_component: bool = False,
    kohya_style: str | None = None,
    base: Checkpoint | str | Path | None = None,
) -> None:
    """Write ``adapter`` in ``format`` atomically (temp file/folder + rename). ``component`` is the pipeline
    component (``unet``, ``transformer``, …) of layers whose names carry none, for formats that name components
    (default: :func:`~loratools.formats.naming.adapter_component`'s guess, else unet); with ``force_component``
    it is every layer's component (the user's ``--component``; refused for a multi-component adapter). ``base`` is the
    base model (a :class:`~loratools.checkpoint.Checkpoint` or its path) for formats that need it (GGUF)."""
    out = Path(out)
    spec = writer_of(format)
    check_output_name(spec.name, out)
    check_base_for(spec.name, base)
    base_path = None if base is None else base.path if isinstance(base, Checkpoint) else Path(base)
    drop_empty_layers(adapter)
    why = refusal(spec.name, adapter.layers)
    if why:
        raise LoraToolsError(why)
    native = [n for n in adapter.layers if comfy.is_comfy_name(n)] if spec is not comfy.FORMAT else []
    if native:  # ComfyUI keys no family resolved: no other format has a name for them
        raise LoraToolsError(
            f"{native[0]}: a ComfyUI key that no known model family resolves ({len(native)} layer(s)); only --to comfy "
            "can keep it (pass --base CKPT or --family for an SD model)"
        )
    if force_component and component:
        check_single_component(adapter, component)
    options = WriteOptions(dtype=dtype, kohya_prefix=kohya_prefix, component=component or adapter_component(adapter.layers),
                           force_component=force_component, kohya_style=kohya_style, base=base_path)
    spec.write(adapter, out, force, options)
